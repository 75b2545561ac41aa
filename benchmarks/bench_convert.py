#!/usr/bin/env python3
"""Conversion speed and output size of ``remora convert``, against baselines measured in the same run.

Images (built from cached tars, pushed as OCI tar+gzip to a private registry on loopback):

* ``debian``: Debian bookworm minbase + python3, one layer (``remora.imagebuild.debian_rootfs``);
* ``python``: that base + a pip dependency layer (numpy, pandas, ...) + an app layer
  (``remora.imagebuild.python_app_layers``, version 1).

For each image, best of ``--repeat`` runs:

* ``zstd -3 -T0`` over the same uncompressed layer tars (the speed of compressing the bytes at all);
* ``remora convert`` registry -> registry with default settings (fixed 1 MiB chunks, zstd 3), and
  with ``--chunking cdc`` (FastCDC, 1 MiB average);
* ``ctr-remote image convert --estargz --oci`` (stargz-snapshotter) on a private containerd that
  pulled the same image; the eStargz image is pushed to the registry to read its layer sizes.

Throughput is MB/s of *uncompressed* layer bytes over wall time. The machine these run on is
shared and loaded, so wall figures swing; the ratios of runs made minutes apart are what to read, and
the CPU columns (user+sys of the whole process, main thread for remora) do not depend on the load:
``2-core est.`` is input / max(CPU/2, main thread CPU), what two idle cores would give.

Sizes: the remora image (data blobs + bootstrap) against the image's OCI gzip blobs as pushed (ISA-L
level 2) and against ``pigz -6`` of the same layers (zlib level 6, what ``docker build`` produces).

    python benchmarks/bench_convert.py [--images debian,python] [--repeat 3] [--estargz-repeat 1]
                                       [--no-estargz] [--no-cdc] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from remora import oci
from remora.converter.convert import ConvertOptions, convert
from remora.format.chunker import ChunkingSpec
from remora.imagebuild import LayerSpec, debian_rootfs, python_app_layers, write_image
from remora.imagestore import open_store
from remora.registry.local import LocalRegistry


@dataclass
class Subject:
    name: str
    ref: str
    tars: list[Path]
    gzip_bytes: int                      # layer blobs as pushed
    input_bytes: int = 0                 # uncompressed layer bytes
    pigz6_bytes: int = 0


@dataclass
class Run:
    """Best-of-N measurement of one tool on one image."""

    tool: str
    wall: float = float("inf")
    cpu: float = 0.0                     # CPU seconds (all threads / the child) of the best run
    main_cpu: float | None = None        # remora's main thread
    out_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def keep(self, wall: float, cpu: float, main_cpu: float | None = None, **extra) -> None:
        if wall < self.wall:
            self.wall, self.cpu, self.main_cpu = wall, cpu, main_cpu
            self.extra.update(extra)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def build_subjects(reg: LocalRegistry, cache: str, names: list[str]) -> list[Subject]:
    base = debian_rootfs(cache)
    out = []
    for name in names:
        tars = [base] if name == "debian" else [base, *python_app_layers(cache, 1)[0]]
        ref = f"{reg.host}/bench/{name}:oci"
        built = write_image(ref, None, [LayerSpec(t) for t in tars], config={"Cmd": ["python3"]})
        s = Subject(name, ref, tars, sum(d.size for d in built.layers))
        s.input_bytes = sum(t.stat().st_size for t in tars)
        for t in tars:
            with open(t, "rb") as f:
                proc = subprocess.run(["pigz", "-6", "-c"], stdin=f, stdout=subprocess.PIPE, check=True)
            s.pigz6_bytes += len(proc.stdout)
        out.append(s)
    return out


def bench_zstd(s: Subject, repeat: int) -> Run:
    run = Run("zstd -3 -T0")
    for _ in range(repeat):
        c0, t0 = _children_cpu(), time.perf_counter()
        proc = subprocess.run(["zstd", "-3", "-T0", "-q", "-c", *map(str, s.tars)], stdout=subprocess.PIPE,
                              check=True)
        run.keep(time.perf_counter() - t0, _children_cpu() - c0)
        run.out_bytes = len(proc.stdout)
    return run


def bench_remora(s: Subject, reg: LocalRegistry, chunking: str, repeat: int) -> Run:
    run = Run(f"remora convert ({chunking})")
    for i in range(repeat):
        # a fresh repository every time: the registry would otherwise skip the uploads of run 2+
        dst = f"{reg.host}/bench/{s.name}-{chunking.replace(':', '-').lower()}-{i}:remora"
        opts = ConvertOptions(chunking=ChunkingSpec.parse(chunking), progress=False)
        c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
        report = convert(s.ref, dst, opts)
        run.keep(time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0,
                 bootstrap=report.bootstrap_bytes, digest=report.manifest_digest)
        run.out_bytes = report.output_bytes
        assert report.input_bytes == s.input_bytes, (report.input_bytes, s.input_bytes)
    return run


def bench_estargz(s: Subject, reg: LocalRegistry, repeat: int, workdir: Path) -> Run:
    from remora.testenv.containerd import PrivateContainerd

    run = Run("ctr-remote convert --estargz")
    with PrivateContainerd(workdir / f"ctd-{s.name}", ctr="ctr-remote") as ctd:
        ctd.ctr("images", "pull", "--plain-http", s.ref, timeout=900)
        target = ""
        for i in range(repeat):
            target = f"{reg.host}/bench/{s.name}-estargz:{i}"
            c0, t0 = _children_cpu(), time.perf_counter()
            ctd.ctr("image", "convert", "--estargz", "--oci", s.ref, target, timeout=1800)
            run.keep(time.perf_counter() - t0, _children_cpu() - c0)
        ctd.ctr("images", "push", "--plain-http", target, timeout=900)
    store = open_store(target)
    desc, data = store.resolve()
    top = oci.parse_manifest_or_index(data, desc.media_type)
    if isinstance(top, oci.Index):
        mdesc = oci.select_platform(top, "linux/amd64")
        top = oci.parse_manifest(store.get_manifest(mdesc), mdesc.media_type)
    run.out_bytes = sum(d.size for d in top.layers)
    return run


def _mbps(n: int, seconds: float) -> float:
    return n / seconds / 1e6 if seconds else 0.0


def report(subjects: list[Subject], results: dict[str, list[Run]], console: Console) -> list[dict]:
    rows = []
    for s in subjects:
        runs = results[s.name]
        zstd = runs[0]
        t = Table(title=f"{s.name}: {s.input_bytes / 1e6:.1f} MB of layer tars, {len(s.tars)} layer(s) — "
                        f"throughput (best of runs, MB/s of uncompressed input)")
        for col in ("tool", "wall MB/s", "x zstd -3 -T0", "CPU s", "main thread CPU s", "2-core est. MB/s",
                    "x zstd (CPU)"):
            t.add_column(col, justify="left" if col == "tool" else "right")
        zstd_cpu_rate = _mbps(s.input_bytes, zstd.cpu)
        for r in runs:
            wall_rate = _mbps(s.input_bytes, r.wall)
            est = _mbps(s.input_bytes, max(r.cpu / 2, r.main_cpu or 0.0)) if r.cpu else 0.0
            cpu_ratio = _mbps(s.input_bytes, r.cpu) / zstd_cpu_rate if r.cpu and zstd_cpu_rate else 0.0
            t.add_row(r.tool, f"{wall_rate:.1f}", f"{wall_rate / _mbps(s.input_bytes, zstd.wall):.2f}",
                      f"{r.cpu:.2f}", f"{r.main_cpu:.2f}" if r.main_cpu is not None else "-",
                      f"{est:.0f}" if est else "-", f"{cpu_ratio:.2f}" if cpu_ratio else "-")
            rows.append({"image": s.name, "tool": r.tool, "wall_s": r.wall, "cpu_s": r.cpu, "main_cpu_s": r.main_cpu,
                         "mb_per_s": wall_rate, "x_zstd": wall_rate / _mbps(s.input_bytes, zstd.wall),
                         "est_2core_mb_per_s": est, "out_bytes": r.out_bytes, **r.extra})
        console.print(t)
        t = Table(title=f"{s.name}: image size (registry bytes of the layers)")
        for col in ("format", "bytes", "x OCI gzip (ISA-L 2, as pushed)", "x gzip -6 (docker default)"):
            t.add_column(col, justify="left" if col == "format" else "right")
        sizes = [("uncompressed tar", s.input_bytes), ("OCI tar+gzip, ISA-L level 2", s.gzip_bytes),
                 ("OCI tar+gzip, pigz -6", s.pigz6_bytes), ("zstd -3 (whole tars)", zstd.out_bytes)]
        sizes += [(r.tool.replace(" convert", ""), r.out_bytes) for r in runs[1:]]
        for label, n in sizes:
            t.add_row(label, f"{n / 1e6:.2f} MB", f"{n / s.gzip_bytes:.3f}", f"{n / s.pigz6_bytes:.3f}")
        console.print(t)
        for r in runs[1:]:
            if "bootstrap" in r.extra:
                b = r.extra["bootstrap"]
                console.print(f"  {s.name} {r.tool}: bootstrap {b / 1e3:.1f} kB = {100 * b / r.out_bytes:.2f} % of "
                              f"the remora image, {100 * b / s.pigz6_bytes:.2f} % of the gzip -6 image")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("REMORA_TEST_CACHE", "/var/cache/remora-test"))
    ap.add_argument("--images", default="debian,python", help="comma-separated: debian, python")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    ap.add_argument("--estargz-repeat", type=int, default=1,
                    help="runs of ctr-remote (default 1: it is ~30x slower than remora, noise does not matter)")
    ap.add_argument("--no-estargz", action="store_true", help="skip ctr-remote (needs containerd, root)")
    ap.add_argument("--no-cdc", action="store_true", help="skip the content-defined chunking run")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args()
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    if any(n not in ("debian", "python") for n in names):
        ap.error("--images takes debian and/or python")
    console = Console(width=max(140, shutil.get_terminal_size().columns))
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=os.environ.get("REMORA_TMPDIR")))
    try:
        with LocalRegistry(root=work / "registry") as reg:
            subjects = build_subjects(reg, args.cache, names)
            results: dict[str, list[Run]] = {}
            for s in subjects:
                runs = [bench_zstd(s, args.repeat), bench_remora(s, reg, "fixed:1M", args.repeat)]
                if not args.no_cdc:
                    runs.append(bench_remora(s, reg, "cdc:1M", args.repeat))
                if not args.no_estargz:
                    runs.append(bench_estargz(s, reg, args.estargz_repeat, work))
                results[s.name] = runs
                console.print(f"[dim]{s.name}: measured {', '.join(r.tool for r in runs)}[/dim]")
            rows = report(subjects, results, console)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
