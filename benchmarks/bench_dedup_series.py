#!/usr/bin/env python3
"""Registry bytes of a three-version python app series: OCI gzip vs remora, with and without a chunk
dictionary, fixed vs content-defined chunking.

Each version is Debian bookworm + python3 (shared base) + a dependency layer that is rebuilt whole
(one package upgraded, as `RUN pip install -r requirements.txt` does when one requirement changes)
+ a small app layer. "Registry bytes" is the size of the unique blobs (layers, configs, bootstraps)
the three tags need, measured in the same run, with OCI gzip as the baseline (ratio 1.00).

    python benchmarks/bench_dedup_series.py [--cache /var/cache/remora-test] [--chunkings fixed:1M,cdc:1M]
                                            [--json out.json]

Target (issue 2): the series stored in at most 60 % of its OCI unique-blob bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from remora import oci
from remora.converter.convert import ConvertOptions, convert
from remora.format.chunker import ChunkingSpec
from remora.imagestore import open_store
from remora_testing.imagebuild import LayerSpec, debian_rootfs, python_app_layers, write_image
from remora_testing.registry import LocalRegistry


def unique_blob_bytes(refs: list[str]) -> int:
    seen: dict[str, int] = {}
    for ref in refs:
        store = open_store(ref)
        desc, data = store.resolve()
        m = oci.parse_manifest(data, desc.media_type)
        for d in [m.config, *m.layers]:
            seen[d.digest] = d.size
    return sum(seen.values())


def _pigz6_size(path) -> int:
    with open(path, "rb") as f:
        return len(subprocess.run(["pigz", "-6", "-c"], stdin=f, stdout=subprocess.PIPE, check=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("REMORA_TEST_CACHE", "/var/cache/remora-test"))
    ap.add_argument("--chunkings", default="fixed:1M,cdc:1M,fixed:256K,cdc:256K",
                    help="comma-separated chunking specs to measure (default: %(default)s)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    base = debian_rootfs(args.cache)
    versions = python_app_layers(args.cache, 3)
    rows = []
    with LocalRegistry() as reg:
        oci_refs, layer_tars = [], {}
        for v, (deps, app) in enumerate(versions, 1):
            ref = f"{reg.host}/series/app:{v}"
            built = write_image(ref, None, [LayerSpec(base), LayerSpec(deps), LayerSpec(app)],
                                config={"Cmd": ["python3", "/app/main.py"]})
            layer_tars.update({d.digest: (d.size, tar) for d, tar in zip(built.layers, (base, deps, app))})
            oci_refs.append(ref)
        oci_bytes = unique_blob_bytes(oci_refs)
        rows.append(("OCI tar+gzip (ISA-L level 2, as pushed)", oci_bytes, 0.0, 0))
        # what `docker build` would have pushed: the same layers at zlib level 6
        gzip6 = oci_bytes + sum(_pigz6_size(tar) - size for size, tar in layer_tars.values())
        rows.append(("OCI tar+gzip (pigz -6, docker's level)", gzip6, 0.0, 0))
        for chunking in [c.strip() for c in args.chunkings.split(",") if c.strip()]:
            spec = ChunkingSpec.parse(chunking)
            for use_dict in (False, True):
                repo = f"{reg.host}/series-{chunking.replace(':', '-').lower()}-{'dict' if use_dict else 'plain'}/app"
                refs, seconds, uploaded = [], 0.0, 0
                for v, src in enumerate(oci_refs, 1):
                    dst = f"{repo}:{v}"
                    opts = ConvertOptions(chunking=spec, progress=False,
                                          chunk_dict=refs[-1] if (use_dict and refs) else None)
                    t = time.monotonic()
                    r = convert(src, dst, opts)
                    seconds += time.monotonic() - t
                    uploaded += r.uploaded_bytes
                    refs.append(dst)
                rows.append((f"remora {chunking}{' + chunk dict' if use_dict else ''}", unique_blob_bytes(refs),
                             seconds, uploaded))
    t = Table(title="Registry bytes of 3 versions (base + rebuilt deps layer + app layer)")
    for col in ("image format", "unique blob bytes", "x OCI gzip (ISA-L 2)", "x OCI gzip (pigz -6)", "bytes uploaded",
                "convert time (3 images)"):
        t.add_column(col, justify="right" if col != "image format" else "left")
    for name, size, seconds, uploaded in rows:
        t.add_row(name, f"{size / 1e6:.1f} MB", f"{size / oci_bytes:.2f}", f"{size / gzip6:.2f}",
                  f"{uploaded / 1e6:.1f} MB" if uploaded else "-", f"{seconds:.1f} s" if seconds else "-")
    Console(width=140).print(t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"format": n, "bytes": s, "ratio": s / oci_bytes, "ratio_gzip6": s / gzip6, "seconds": sec,
                        "uploaded": up}
                       for n, s, sec, up in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
