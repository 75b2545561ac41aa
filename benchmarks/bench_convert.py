#!/usr/bin/env python3
"""Conversion speed and output size of ``remora convert``, against ``zstd -3 -T0`` in the same run.

Images (built from cached tars, pushed as OCI tar+gzip to a private registry on loopback):

* ``debian``: Debian bookworm minbase + python3, one layer (``remora_testing.imagebuild.debian_rootfs``),
  8.2k members, the image the other benchmarks use;
* ``python``: that base + a pip layer of large binaries (numpy, pandas, ... shared objects) + a small
  app layer (``remora_testing.imagebuild.python_app_layers``, version 1);
* ``smallfiles``: one layer of ~40k small text files (200 B - 16 KiB, a source tree), generated
  deterministically from a seed and cached: the per-file cost of the converter, not its bytes.

Each repetition runs, per image, ``zstd -3 -T0`` over the same uncompressed layer tars and then
``remora convert`` registry -> registry at default settings, alternating, so that both see the same
machine state; figures are medians over ``--repeat`` repetitions (and the ratio is the median of the
per-repetition ratios). The machine these run on is shared, so wall figures swing with its load; the
ratio to zstd in the same repetition and the CPU columns are what to read. ``2-core est.`` =
input / max(CPU / 2, main thread CPU) is what two idle cores would sustain.

Optional: ``--cdc`` adds FastCDC chunking runs, ``--estargz`` ``ctr-remote image convert --estargz``
(stargz-snapshotter, on a private containerd; slow: one run).

Before/after in one run: ``--baseline DIR`` also converts with the code under ``DIR`` (a module tree
laid out as installed: ``DIR/remora`` with the converter at ``DIR/remora/converter``, e.g. a copy
of the committed files). Each conversion then runs in a fresh worker process (``PYTHONPATH=DIR``
for the baseline), both code versions alternate in every repetition (order swapped every other one)
right after the same zstd run, so load swings on a shared machine hit both alike; the rows say
whether both wrote the same blobs (``same_output``: the digests of every layer of the manifests).

    python benchmarks/bench_convert.py [--images debian,python,smallfiles] [--repeat 3] [--levels 3,2]
                                       [--cdc] [--estargz] [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from remora import oci
from remora.converter.convert import ConvertOptions, convert
from remora.format.chunker import ChunkingSpec
from remora.imagestore import open_store
from remora_testing.imagebuild import LayerSpec, debian_rootfs, python_app_layers, write_image
from remora_testing.registry import LocalRegistry

IMAGES = ("debian", "python", "smallfiles")


@dataclass
class Subject:
    name: str
    ref: str
    tars: list[Path]
    gzip_bytes: int                      # layer blobs as pushed (ISA-L level 2)
    input_bytes: int = 0                 # uncompressed layer bytes
    files: int = 0


@dataclass
class Runs:
    """Every repetition of one tool on one image."""

    tool: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)         # all threads / the child process
    main_cpu: list[float] = field(default_factory=list)    # remora's pipeline thread
    out_bytes: int = 0
    extra: dict = field(default_factory=dict)
    digests: list[list[str]] = field(default_factory=list)  # manifest layer digests per run (--baseline)

    def med(self, what: str) -> float:
        values = getattr(self, what)
        return statistics.median(values) if values else 0.0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def smallfiles_tar(cache: str | Path, count: int = 40_000, seed: int = 15) -> Path:
    """A layer tar of ``count`` small text files in 400 directories (cached by its parameters).

    Text is drawn from a Zipf-distributed vocabulary, so it compresses like source code (~3-4x);
    every file starts with its own path, so no two files are equal (no dedup shortcut)."""
    key = hashlib.sha256(f"smallfiles/1/{count}/{seed}".encode()).hexdigest()[:16]
    final = Path(cache) / "bench-smallfiles" / f"smallfiles-{key}.tar"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz_"
    vocab = ["".join(rnd.choices(letters, k=rnd.randint(2, 12))) for _ in range(4000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    words = rnd.choices(vocab, weights, k=600_000)
    lines, line = [], []
    for w in words:
        line.append(w)
        if len(line) >= rnd.randint(4, 12):
            lines.append(" " * 4 * rnd.randint(0, 3) + " ".join(line) + "\n")
            line = []
    pool = "".join(lines).encode()
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(400):
            info = tarfile.TarInfo(f"src/pkg{d // 20}/mod{d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tf.addfile(info)
            for i in range(count // 400):
                path = f"src/pkg{d // 20}/mod{d}/file{i}.py"
                size = min(16384, int(rnd.lognormvariate(7.6, 0.9)) + 200)
                start = rnd.randrange(0, len(pool) - size)
                data = f"# {path}\n".encode() + pool[start:start + size]
                info = tarfile.TarInfo(path)
                info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
                tf.addfile(info, io.BytesIO(data))
    tmp.rename(final)
    return final


def build_subjects(reg: LocalRegistry, cache: str, names: list[str]) -> list[Subject]:
    out = []
    for name in names:
        if name == "smallfiles":
            tars = [smallfiles_tar(cache)]
        else:
            base = debian_rootfs(cache)
            tars = [base] if name == "debian" else [base, *python_app_layers(cache, 1)[0]]
        ref = f"{reg.host}/bench/{name}:oci"
        built = write_image(ref, None, [LayerSpec(t) for t in tars], config={"Cmd": ["sh"]})
        s = Subject(name, ref, tars, sum(d.size for d in built.layers))
        s.input_bytes = sum(t.stat().st_size for t in tars)
        for t in tars:
            with tarfile.open(t) as tf:
                s.files += sum(1 for m in tf if m.isreg())
        out.append(s)
    return out


def run_zstd(s: Subject, runs: Runs, work: Path) -> None:
    out = work / "zstd.out"
    with open(out, "wb") as f:
        c0, t0 = _children_cpu(), time.perf_counter()
        subprocess.run(["zstd", "-3", "-T0", "-q", "-c", *map(str, s.tars)], stdout=f, check=True)
        runs.wall.append(time.perf_counter() - t0)
        runs.cpu.append(_children_cpu() - c0)
    runs.out_bytes = out.stat().st_size
    out.unlink()


def run_remora(s: Subject, reg: LocalRegistry, chunking: str, level: int, runs: Runs, i: int) -> None:
    # a fresh repository every time: the registry would otherwise skip the uploads of run 2+
    dst = f"{reg.host}/bench/{s.name}-{chunking.replace(':', '-').lower()}-l{level}-{i}:remora"
    opts = ConvertOptions(chunking=ChunkingSpec.parse(chunking), level=level, progress=False)
    c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    report = convert(s.ref, dst, opts)
    runs.wall.append(time.perf_counter() - t0)
    runs.cpu.append(time.process_time() - c0)
    runs.main_cpu.append(time.thread_time() - m0)
    runs.out_bytes = report.output_bytes
    runs.extra["bootstrap_bytes"] = report.bootstrap_bytes
    assert report.input_bytes == s.input_bytes, (report.input_bytes, s.input_bytes)


def _convert_in_worker(src: str, dst: str, chunking: str, level: int) -> dict:
    """Worker mode (``--worker``): one conversion in this process; timings and output identity."""
    opts = ConvertOptions(chunking=ChunkingSpec.parse(chunking), level=level, progress=False)
    c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    report = convert(src, dst, opts)
    out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "main_cpu": time.thread_time() - m0,
           "out_bytes": report.output_bytes, "bootstrap_bytes": report.bootstrap_bytes,
           "input_bytes": report.input_bytes}
    store = open_store(dst)
    desc, data = store.resolve()
    manifest = oci.parse_manifest(data, desc.media_type)
    out["layers"] = [d.digest for d in manifest.layers]
    return out


def run_remora_worker(s: Subject, reg: LocalRegistry, chunking: str, level: int, runs: Runs, i: int,
                      pythonpath: str | None, tag: str) -> None:
    """One conversion in a fresh process (``pythonpath`` first on its path: the baseline code)."""
    dst = f"{reg.host}/bench/{s.name}-{chunking.replace(':', '-').lower()}-l{level}-{tag}-{i}:remora"
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, __file__, "--worker", s.ref, dst, chunking, str(level)], env=env,
                          check=True, capture_output=True, text=True, timeout=1800)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["input_bytes"] == s.input_bytes, (res["input_bytes"], s.input_bytes)
    runs.wall.append(res["wall"])
    runs.cpu.append(res["cpu"])
    runs.main_cpu.append(res["main_cpu"])
    runs.out_bytes = res["out_bytes"]
    runs.extra["bootstrap_bytes"] = res["bootstrap_bytes"]
    runs.digests.append(res["layers"])


def run_estargz(s: Subject, reg: LocalRegistry, runs: Runs, workdir: Path) -> None:
    from remora_testing.containerd import PrivateContainerd

    with PrivateContainerd(workdir / f"ctd-{s.name}", ctr="ctr-remote") as ctd:
        ctd.ctr("images", "pull", "--plain-http", s.ref, timeout=900)
        target = f"{reg.host}/bench/{s.name}-estargz:0"
        c0, t0 = _children_cpu(), time.perf_counter()
        ctd.ctr("image", "convert", "--estargz", "--oci", s.ref, target, timeout=1800)
        runs.wall.append(time.perf_counter() - t0)
        runs.cpu.append(_children_cpu() - c0)
        ctd.ctr("images", "push", "--plain-http", target, timeout=900)
    store = open_store(target)
    desc, data = store.resolve()
    top = oci.parse_manifest_or_index(data, desc.media_type)
    if isinstance(top, oci.Index):
        mdesc = oci.select_platform(top, "linux/amd64")
        top = oci.parse_manifest(store.get_manifest(mdesc), mdesc.media_type)
    runs.out_bytes = sum(d.size for d in top.layers)


def _mbps(n: int, seconds: float) -> float:
    return n / seconds / 1e6 if seconds else 0.0


def rows_for(s: Subject, zstd: Runs, tools: list[Runs]) -> list[dict]:
    rows = []
    for r in tools:
        n = min(len(r.wall), len(zstd.wall))
        ratios = [zstd.wall[k] / r.wall[k] for k in range(n)] if r.tool.startswith(("remora", "baseline")) else []
        row = {
            "image": s.name, "tool": r.tool, "layers": len(s.tars), "files": s.files,
            "input_mb": s.input_bytes / 1e6, "runs": len(r.wall),
            "wall_s": r.med("wall"), "cpu_s": r.med("cpu"), "main_cpu_s": r.med("main_cpu") or None,
            "mb_per_s": _mbps(s.input_bytes, r.med("wall")),
            "zstd_mb_per_s": _mbps(s.input_bytes, zstd.med("wall")), "zstd_cpu_s": zstd.med("cpu"),
            "x_zstd_wall": (statistics.median(ratios) if ratios
                            else _mbps(s.input_bytes, r.med("wall")) / _mbps(s.input_bytes, zstd.med("wall"))),
            "x_zstd_cpu": zstd.med("cpu") / r.med("cpu") if r.med("cpu") else None,
            "est_2core_mb_per_s": _mbps(s.input_bytes, max(r.med("cpu") / 2, r.med("main_cpu"))),
            "out_mb": r.out_bytes / 1e6, "gzip_mb": s.gzip_bytes / 1e6,
            "x_gzip_size": r.out_bytes / s.gzip_bytes, "zstd_out_mb": zstd.out_bytes / 1e6,
            "wall_all_s": r.wall, "cpu_all_s": r.cpu, "zstd_wall_all_s": zstd.wall, **r.extra,
        }
        rows.append(row)
    return rows


def print_table(rows: list[dict], console: Console, title: str) -> None:
    t = Table(title=title)
    cols = ("image", "tool", "input MB", "wall s", "CPU s", "main CPU s", "MB/s", "zstd -3 -T0 MB/s",
            "x zstd (wall)", "x zstd (CPU)", "2-core est. MB/s", "out MB", "x gzip src")
    for col in cols:
        t.add_column(col, justify="left" if col in ("image", "tool") else "right")
    for r in rows:
        t.add_row(r["image"], r["tool"].replace("remora convert ", "remora "), f"{r['input_mb']:.1f}",
                  f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                  f"{r['main_cpu_s']:.2f}" if r["main_cpu_s"] else "-", f"{r['mb_per_s']:.1f}",
                  f"{r['zstd_mb_per_s']:.1f}", f"{r['x_zstd_wall']:.2f}",
                  f"{r['x_zstd_cpu']:.2f}" if r["x_zstd_cpu"] else "-",
                  f"{r['est_2core_mb_per_s']:.0f}" if r["main_cpu_s"] else "-",
                  f"{r['out_mb']:.2f}", f"{r['x_gzip_size']:.3f}")
    console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("REMORA_TEST_CACHE", "/var/cache/remora-test"))
    ap.add_argument("--images", default=",".join(IMAGES), help=f"comma-separated: {', '.join(IMAGES)}")
    ap.add_argument("--repeat", type=int, default=3, help="alternating repetitions; medians are reported")
    ap.add_argument("--cdc", action="store_true", help="also convert with --chunking cdc:1M")
    ap.add_argument("--estargz", action="store_true", help="also run ctr-remote --estargz once (needs containerd)")
    ap.add_argument("--levels", default="3", help="zstd levels of data frames to convert with (default: 3, "
                    "the converter's default); e.g. 3,2 adds a level-2 row")
    ap.add_argument("--label", default="", help="a note printed in the title and stored in the JSON")
    ap.add_argument("--json", help="write the rows as JSON to this file (they are also printed)")
    ap.add_argument("--baseline", help="also convert with the module tree in this directory (PYTHONPATH), "
                    "alternating with the current code, each conversion in a fresh process")
    ap.add_argument("--worker", nargs=4, metavar=("SRC", "DST", "CHUNKING", "LEVEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        src, dst, chunking, level = args.worker
        print(json.dumps(_convert_in_worker(src, dst, chunking, int(level))))
        return 0
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    if any(n not in IMAGES for n in names):
        ap.error(f"--images takes {', '.join(IMAGES)}")
    console = Console(width=max(160, shutil.get_terminal_size().columns))
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=os.environ.get("REMORA_TMPDIR")))
    rows: list[dict] = []
    try:
        with LocalRegistry(root=work / "registry") as reg:
            subjects = build_subjects(reg, args.cache, names)
            levels = [int(x) for x in args.levels.split(",") if x.strip()]
            variants = [(c, lv) for c in ["fixed:1M"] + (["cdc:1M"] if args.cdc else []) for lv in levels]
            zstd = {s.name: Runs("zstd -3 -T0") for s in subjects}
            tools = {s.name: [Runs(f"remora convert ({c}{', level ' + str(lv) if lv != 3 else ''})")
                              for c, lv in variants] for s in subjects}
            base = {s.name: [Runs(f"baseline convert ({c}{', level ' + str(lv) if lv != 3 else ''})")
                             for c, lv in variants] for s in subjects} if args.baseline else {}
            for i in range(args.repeat):
                for s in subjects:           # alternate: zstd, remora, zstd, remora ...
                    run_zstd(s, zstd[s.name], work)
                    for k, ((c, lv), runs) in enumerate(zip(variants, tools[s.name])):
                        if not args.baseline:
                            run_remora(s, reg, c, lv, runs, i)
                            continue
                        pair = [(runs, None, "cur"), (base[s.name][k], args.baseline, "base")]
                        for r, path, tag in (pair if i % 2 == 0 else pair[::-1]):
                            run_remora_worker(s, reg, c, lv, r, i, path, tag)
                    for k in range(len(variants) if args.baseline else 0):
                        cur, old = tools[s.name][k], base[s.name][k]
                        same = cur.digests == old.digests
                        cur.extra["same_output"] = old.extra["same_output"] = same
                        if not same:
                            console.print(f"[red]{s.name}: the baseline wrote different blobs[/red]")
                console.print(f"[dim]repetition {i + 1}/{args.repeat} done, load {os.getloadavg()[0]:.1f}[/dim]")
            for name, extra in base.items():
                tools[name] += extra
            for s in subjects:
                if args.estargz:
                    tools[s.name].append(Runs("ctr-remote convert --estargz"))
                    run_estargz(s, reg, tools[s.name][-1], work)
                rows += rows_for(s, zstd[s.name], tools[s.name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    title = (f"remora convert vs zstd -3 -T0, medians of {args.repeat} alternating runs "
             f"(load {load[0]:.1f}/{load[1]:.1f}){' - ' + args.label if args.label else ''}")
    print_table(rows, console, title)
    doc = {"label": args.label, "repeat": args.repeat, "load": load, "rows": rows}
    text = json.dumps(doc, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    console.print(json.dumps({"rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                        if not k.endswith("_all_s")} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
