"""Sub-commands of the converter: ``convert``, ``dict build``, ``check``, ``unpack``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONVERT_EPILOG = """\
SRC and DST are registry references (host/repo:tag) or OCI layouts (oci:DIR[:TAG]).
Plain HTTP is used for loopback registries (127.0.0.1, localhost) or with --plain-http;
credentials come from the docker config file ($DOCKER_CONFIG or ~/.docker/config.json).

examples:
  remora convert 127.0.0.1:5000/app:1 127.0.0.1:5000/app:1-remora
  remora convert oci:./app-layout:1 oci:./out:1-remora
  remora convert reg.local/app:2 reg.local/app:2-remora --chunk-dict reg.local/app:1-remora
  remora convert reg.local/app:1 reg.local/app:1-remora --prefetch-list hot.txt --with-oci-fallback
  remora convert reg.local/app:1 reg.local/app:1-remora --json > report.json

exit codes: 0 ok, 2 usage, 3 invalid input (corrupt/digest mismatch/unsupported), 4 auth,
5 not found, 6 registry unreachable or failing, 7 local storage (disk full).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an OCI image into a lazy-loadable remora image",
                       description="Convert an OCI image into a remora image: a bootstrap (file tree, chunk "
                                   "table, prefetch order) plus content-addressed zstd chunk blobs.",
                       epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    p.add_argument("--chunking", default="fixed:1M",
                   help="chunking: 'fixed' or 'cdc' with an optional size, e.g. fixed:1M, cdc:512K (default fixed:1M)")
    p.add_argument("--compression-level", type=int, default=3, help="zstd level of data frames (default 3)")
    p.add_argument("--batch-size", default="256K",
                   help="small chunks are packed together into frames of this size (default 256K)")
    p.add_argument("--prefetch-list", metavar="FILE",
                   help="paths in access order (e.g. from 'remora trace'): laid out first, prefetched first")
    p.add_argument("--chunk-dict", metavar="REF|FILE",
                   help="reuse chunks of converted images: a dictionary file ('remora dict build') or an image "
                        "reference")
    p.add_argument("--with-oci-fallback", action="store_true",
                   help="tag an index holding the original manifest and the remora one, so runtimes without remora "
                        "still run it")
    p.add_argument("--platform", default="linux/amd64",
                   help="platform to convert when SRC is an index (default linux/amd64)")
    p.add_argument("--plain-http", action="store_true", default=None, help="use plain HTTP for non-loopback registries")
    p.add_argument("--workers", type=int, default=None, help="compression threads (default: number of CPUs)")
    p.add_argument("--workdir", help="where to build blobs (default: a temp dir; $REMORA_TMPDIR)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (for CI)")
    p.add_argument("--no-progress", action="store_true", help="never show progress bars")
    p.set_defaults(func=run_convert)

    d = sub.add_parser("dict", help="chunk dictionaries for cross-image dedup",
                       description="Manage chunk dictionaries: a dictionary lists chunks that already live in the "
                                   "registry, so 'remora convert --chunk-dict' references them instead of uploading "
                                   "them.",
                       epilog="examples:\n"
                              "  remora dict build app.dict reg.local/app:1-remora reg.local/base:12-remora\n"
                              "  remora convert reg.local/app:2 reg.local/app:2-remora --chunk-dict app.dict\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = d.add_subparsers(dest="dict_command", metavar="ACTION", required=True)
    b = dsub.add_parser("build", help="build a dictionary from converted images")
    b.add_argument("output", metavar="FILE")
    b.add_argument("images", metavar="IMAGE", nargs="+",
                   help="converted remora images (or bootstrap / dictionary files)")
    b.add_argument("--plain-http", action="store_true", default=None)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=run_dict_build)

    c = sub.add_parser("check", help="verify every digest and the file tree of a remora image",
                       description="Download a remora image and verify manifest, config, bootstrap, every data blob, "
                                   "frame and chunk digest, and the consistency of the file tree.",
                       epilog="examples:\n  remora check 127.0.0.1:5000/app:1-remora\n"
                              "  remora check oci:./out:1-remora --json\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("--plain-http", action="store_true", default=None)
    c.add_argument("--platform", default="linux/amd64")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_check)

    u = sub.add_parser("unpack", help="materialise the root file system of a remora image",
                       description="Write the merged root file system of a remora image into DIR: content, modes, "
                                   "owners, mtimes, links, devices and xattrs (run as root for owners and devices).",
                       epilog="example:\n  remora unpack 127.0.0.1:5000/app:1-remora ./rootfs\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("image", metavar="IMAGE")
    u.add_argument("directory", metavar="DIR")
    u.add_argument("--plain-http", action="store_true", default=None)
    u.add_argument("--platform", default="linux/amd64")
    u.add_argument("--force", action="store_true",
                   help="unpack into a non-empty DIR, replacing what is in the way (symlinks there are never followed)")
    u.add_argument("--no-progress", action="store_true", help="never show progress bars")
    u.set_defaults(func=run_unpack)

    t = sub.add_parser("trace", help="run a workload in an image and record the files it reads, in order",
                       description="Run COMMAND once inside IMAGE's root file system (materialised in a temp dir, "
                                   "private mount and PID namespaces) under strace, and print the regular files it "
                                   "opened or executed, in first-access order: the --prefetch-list of "
                                   "'remora convert'.",
                       epilog="examples:\n  remora trace reg.local/app:1 -o hot.txt -- python3 -c 'import json'\n"
                              "  remora convert reg.local/app:1 reg.local/app:1-remora --prefetch-list hot.txt\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("image", metavar="IMAGE", help="a remora or OCI image")
    t.add_argument("command", metavar="-- COMMAND", nargs=argparse.REMAINDER, help="the workload, after '--'")
    t.add_argument("-o", "--output", metavar="FILE", help="write the list here (default: stdout)")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds the workload may run (default 120)")
    t.add_argument("--plain-http", action="store_true", default=None)
    t.set_defaults(func=run_trace)


def run_convert(args) -> int:
    from remora.converter.convert import ConvertOptions, convert, read_prefetch_list
    from remora.format.chunker import ChunkingSpec, parse_size

    opts = ConvertOptions(chunking=ChunkingSpec.parse(args.chunking), level=args.compression_level,
                          batch_size=parse_size(args.batch_size), with_oci_fallback=args.with_oci_fallback,
                          chunk_dict=args.chunk_dict, platform=args.platform, plain_http=args.plain_http,
                          progress=False if (args.no_progress or args.json) else None,
                          workdir=Path(args.workdir) if args.workdir else None)
    if args.workers:
        opts.workers = args.workers
    if args.prefetch_list:
        opts.prefetch_list = read_prefetch_list(args.prefetch_list)
    report = convert(args.source, args.destination, opts)
    report.print(as_json=args.json)
    return 0


def run_dict_build(args) -> int:
    from remora.converter.chunkdict import build_dict
    from remora.converter.progress import Progress

    with Progress(None if not args.json else False) as progress:
        stats = build_dict(args.images, Path(args.output), args.plain_http, progress)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"wrote {args.output}: {stats['chunks']:,} chunks in {stats['blobs']} blobs "
              f"({stats['bytes'] / 1e6:.1f} MB) from {stats['images']} image(s)")
    return 0


def _open_image(args, tmp: Path):
    from remora.converter.image import LocalBlobs, RemoraImage
    from remora.imagestore import open_store

    store = open_store(args.image, plain_http=args.plain_http)
    image = RemoraImage.open(store, tmp / "meta", args.platform)
    return image, LocalBlobs(image, tmp / "blobs")


class _FrameProgress:
    """LocalBlobs as check uses it, advancing a progress bar by each frame's compressed size."""

    def __init__(self, blobs, progress):
        self._blobs, self._progress = blobs, progress

    def frame(self, blob: str, offset: int, csize: int, usize: int) -> bytes:
        data = self._blobs.frame(blob, offset, csize, usize)
        self._progress.advance(csize)
        return data

    def __getattr__(self, name):
        return getattr(self._blobs, name)


def run_check(args) -> int:
    from remora.converter.check import check
    from remora.converter.progress import Progress
    from remora.converter.workdir import work_dir

    with Progress(None if not args.json else False) as progress, work_dir("check") as tmp:
        progress.phase("image metadata")
        image, blobs = _open_image(args, Path(tmp))
        progress.phase("verify blobs", sum(d.size for d in image.blob_descs.values()) or None)
        blobs = _FrameProgress(blobs, progress)
        try:
            res = check(image, blobs)
        finally:
            image.close()
    if args.json:
        print(json.dumps({"ok": res.ok, "blobs": res.blobs, "frames": res.frames, "chunks": res.chunks,
                          "inodes": res.inodes, "entries": res.entries, "bytes_verified": res.bytes_verified,
                          "problems": res.problems}, indent=2))
    else:
        print(f"{args.image}: {res.blobs} blobs, {res.frames} frames, {res.chunks} chunks "
              f"({res.bytes_verified / 1e6:.1f} MB), {res.inodes} inodes, {res.entries} entries")
        for p in res.problems:
            print(f"  PROBLEM: {p}", file=sys.stderr)
        print("OK" if res.ok else f"FAILED: {len(res.problems)} problem(s)")
    return 0 if res.ok else 3


def run_unpack(args) -> int:
    from remora.converter.progress import Progress
    from remora.converter.unpack import check_target, unpack
    from remora.converter.workdir import work_dir

    check_target(Path(args.directory), args.force)     # refuse before downloading anything
    with Progress(False if args.no_progress else None) as progress, \
            work_dir("unpack") as tmp:
        progress.phase("image metadata")
        image, blobs = _open_image(args, Path(tmp))
        try:
            stats = unpack(image, Path(args.directory), blobs, force=args.force, progress=progress)
        finally:
            image.close()
    for w in stats.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"unpacked {stats.entries:,} entries ({stats.files:,} files, {stats.bytes / 1e6:.1f} MB, "
          f"{stats.hardlinks} hard links) into {args.directory}")
    return 0


def run_trace(args) -> int:
    from remora.converter.trace import trace_image

    # argparse hands everything after IMAGE to COMMAND: options given there (before "--") are ours
    rest = list(args.command)
    if "--" in rest:
        cut = rest.index("--")
        opts, rest = rest[:cut], rest[cut + 1:]
        if opts:
            extra = argparse.ArgumentParser(prog="remora trace", add_help=False)
            extra.add_argument("-o", "--output")
            extra.add_argument("--timeout", type=float)
            extra.add_argument("--plain-http", action="store_true", default=None)
            parsed = extra.parse_args(opts)
            for key, value in vars(parsed).items():
                if value is not None:
                    setattr(args, key, value)
    from remora.converter.progress import Progress

    with Progress() as progress:
        result = trace_image(args.image, rest, timeout=args.timeout, plain_http=args.plain_http, progress=progress)
    text = "".join(f"{p}\n" for p in result.files)
    if args.output:
        Path(args.output).write_text(text)
        print(f"{len(result.files)} files (workload exit code {result.exit_code}) written to {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    if result.exit_code != 0:
        print(f"warning: the workload exited with {result.exit_code}:\n{result.output[-2000:]}", file=sys.stderr)
    return 0
