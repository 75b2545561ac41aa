"""``remora demo``: the quick start's main job on an embedded default.

Starts a private registry on 127.0.0.1 (Debian's docker-registry), builds a real image — Debian
bookworm minbase with python3 (debootstrap, cached after the first run) plus a small app layer, or
busybox with ``--image busybox`` — pushes it, converts it with ``remora convert``, verifies the
result with ``remora check`` and prints the conversion report.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

DEMO_EPILOG = """\
examples:
  remora demo                       Debian + python3 image (first run builds it with debootstrap, ~1-2 min)
  remora demo --image busybox       a tiny image, seconds
  remora demo --keep-registry       leave the registry running and print how to use it
"""

PYTHON_HOT_FILES = [
    "/usr/bin/python3.11", "/usr/lib/python3.11/encodings/__init__.py", "/usr/lib/python3.11/codecs.py",
    "/usr/lib/python3.11/encodings/aliases.py", "/usr/lib/python3.11/encodings/utf_8.py",
    "/usr/lib/python3.11/io.py", "/usr/lib/python3.11/abc.py", "/usr/lib/python3.11/site.py",
    "/usr/lib/python3.11/os.py", "/usr/lib/python3.11/stat.py", "/usr/lib/python3.11/posixpath.py",
    "/usr/lib/python3.11/genericpath.py", "/usr/lib/python3.11/_collections_abc.py",
    "/usr/lib/python3.11/_sitebuiltins.py", "/app/main.py",
]

APP_MAIN = b'import json, sys\nprint(json.dumps({"hello": "from a lazily loaded remora image"}))\n'


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start a local registry, build a real image, convert and check it",
                       description=__doc__.split("\n\n")[1], epilog=DEMO_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", choices=("debian-python", "busybox"), default="debian-python")
    p.add_argument("--cache", default=os.environ.get("REMORA_TEST_CACHE", "/var/cache/remora-test"),
                   help="where the debootstrapped rootfs is cached (default /var/cache/remora-test)")
    p.add_argument("--keep-registry", action="store_true", help="keep the registry running after the demo")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from remora.converter.check import check
    from remora.converter.convert import ConvertOptions, convert
    from remora.converter.image import LocalBlobs, RemoraImage
    from remora.imagestore import open_store
    from remora_testing.imagebuild import LayerSpec, busybox_rootfs, debian_rootfs, write_image
    from remora_testing.registry import LocalRegistry
    from remora_testing.tarbuild import LayerBuilder

    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="remora-demo-"))
    registry = LocalRegistry(root=work / "registry").start()
    try:
        console.print(f"[bold]registry[/] running at {registry.url} (storage {registry.root})")
        app = LayerBuilder().add_file("app/main.py", APP_MAIN, mode=0o644).build("none")
        if args.image == "busybox":
            base = LayerSpec(busybox_rootfs(work / "busybox"), created_by="busybox-static")
            cmd, hot = ["/bin/sh", "-c", "echo hello from remora"], ["/bin/busybox"]
        else:
            console.print("building Debian bookworm + python3 with debootstrap (cached after the first run) ...")
            base = LayerSpec(debian_rootfs(args.cache), created_by="debootstrap --variant=minbase --include=python3")
            cmd, hot = ["python3", "/app/main.py"], PYTHON_HOT_FILES
        source = f"{registry.host}/demo/app:1"
        target = f"{registry.host}/demo/app:1-remora"
        built = write_image(source, None, [base, LayerSpec(app, created_by="COPY main.py /app/")],
                            config={"Cmd": cmd, "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
        size_mb = sum(layer.size for layer in built.layers) / 1e6
        console.print(f"pushed {source} ({len(built.layers)} layers, {size_mb:.1f} MB)")
        report = convert(source, target, ConvertOptions(prefetch_list=hot, progress=not args.json and None))
        store = open_store(target)
        image = RemoraImage.open(store, work / "check")
        try:
            res = check(image, LocalBlobs(image, work / "check-blobs"))
        finally:
            image.close()
        report.print(as_json=args.json)
        if not res.ok:
            for p in res.problems:
                console.print(f"[red]PROBLEM[/] {p}")
            return 3
        console.print(f"[green]remora check OK[/]: {res.chunks} chunks, {res.inodes} inodes verified")
        if args.keep_registry:
            console.print(f"registry left running (pid {registry.daemon.pid}): try\n"
                          f"  remora check {target}\n  remora unpack {target} ./rootfs")
            registry.daemon = None  # do not stop it
        return 0
    finally:
        if not args.keep_registry:
            registry.stop()
            import shutil

            shutil.rmtree(work, ignore_errors=True)
