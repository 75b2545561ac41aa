"""``remora trace IMAGE -- CMD``: run a workload once and record the files it reads, in order.

The output feeds ``remora convert --prefetch-list``: those files are laid out first and contiguously
and the snapshotter prefetches them in that order, so a cold start fetches what it needs in a few
large requests.

How: the image's root file system is materialised in a temporary directory (a remora image is
unpacked; an OCI image is first converted into a temporary OCI layout), then the command runs in it
under ``strace`` inside private mount and PID namespaces (``unshare``), with ``/proc`` and ``/dev``
mounted. Every successful open/openat/execve made after the ``chroot`` — by the command and all its
children — is recorded; paths are resolved inside the image root (symlinks included) and only regular
files are kept, each once, in first-access order.

Two kinds of reads make no system call strace can see, so they are added by rule:

* the kernel itself opens what an ``execve`` needs: a script's ``#!`` interpreter and an ELF
  program's dynamic loader (``PT_INTERP``, e.g. ``ld-linux-x86-64.so.2``); each follows its executable;
* the container runtime reads the image's ``/etc/passwd`` and ``/etc/group`` before the command
  starts (containerd resolves the user and its additional groups from them, runc the user again):
  they go first. A cold start that misses them waits for an on-demand fetch before the container
  even exists.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from remora.errors import RemoraError, UsageError

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
# with several processes, strace splits a call: "PID call(args <unfinished ...>" ... "PID <... call resumed>rest) = R"
_UNFINISHED = re.compile(r"^(\d+)\s+(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+|\?)")
_PATH_ARG = {"open": 0, "openat": 1, "openat2": 1, "execve": 0, "chroot": 0}
RUNTIME_FILES = ("/etc/passwd", "/etc/group")  # read by containerd/runc before the command runs
PT_INTERP = 3


@dataclass
class TraceResult:
    files: list[str]
    exit_code: int
    output: str


def resolve_in_root(root: Path, path: str, max_links: int = 40) -> str | None:
    """The path of ``path`` inside ``root`` with every symlink resolved within the root, or None."""
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def _string_arg(args: str, index: int) -> str | None:
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
    # openat's first argument is a dirfd (AT_FDCWD or a number), not a string: the path is string 0
    if not strings:
        return None
    try:
        return bytes(strings[0], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return strings[0]


def exec_interpreter(path: Path) -> str | None:
    """What the kernel opens to run ``path``: a script's ``#!`` interpreter or an ELF program's
    ``PT_INTERP`` loader (absolute paths inside the image), else None."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(256)
            if head.startswith(b"#!"):
                words = head[2:].split(b"\n", 1)[0].split()
                return words[0].decode("utf-8", "surrogateescape") if words else None
            if head[:4] != b"\x7fELF" or len(head) < 64 or head[4] not in (1, 2) or head[5] not in (1, 2):
                return None
            end = "<" if head[5] == 1 else ">"
            if head[4] == 2:
                phoff, = struct.unpack_from(end + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
                fmt = end + "IIQQQQQQ"  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, ...
            else:
                phoff, = struct.unpack_from(end + "I", head, 28)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
                fmt = end + "IIIIIIII"  # p_type, p_offset, p_vaddr, p_paddr, p_filesz, ...
            for i in range(min(phnum, 64)):
                f.seek(phoff + i * phentsize)
                raw = f.read(struct.calcsize(fmt))
                if len(raw) < struct.calcsize(fmt):
                    return None
                ph = struct.unpack(fmt, raw)
                if ph[0] != PT_INTERP:
                    continue
                offset, size = (ph[2], ph[5]) if head[4] == 2 else (ph[1], ph[4])
                f.seek(offset)
                name = f.read(min(size, 4096)).split(b"\0", 1)[0]
                return name.decode("utf-8", "surrogateescape") or None
    except OSError:
        return None
    return None


def parse_strace(log: str, root: Path) -> list[str]:
    """Files opened/executed inside the chroot, resolved in ``root``, in first-access order.

    The workload runs in a new PID namespace, where clone() returns namespace-local PIDs that do not
    match the PIDs strace prints; so a process counts as "inside" when it called chroot itself or
    first appears after the chroot (only the workload's descendants can appear then).
    """
    before: set[int] = set()
    inside: set[int] = set()
    chrooted = False
    seen: dict[str, None] = {}
    pending: dict[int, tuple[str, str]] = {}

    def add(path: str, executed: bool = False, depth: int = 0) -> None:
        real = resolve_in_root(root, path)
        if not real or real in seen or not stat.S_ISREG(os.lstat(root / real.lstrip("/")).st_mode):
            return
        seen[real] = None
        if executed and depth < 4:  # what the kernel opens for this execve, right after it
            interp = exec_interpreter(root / real.lstrip("/"))
            if interp and interp.startswith("/"):
                add(interp, True, depth + 1)

    for path in RUNTIME_FILES:
        add(path)
    for line in log.splitlines():
        m = _LINE.match(line)
        if m:
            pid, call, args, ret = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        elif (u := _UNFINISHED.match(line)):
            pending[int(u.group(1))] = (u.group(2), u.group(3))
            if not chrooted:
                before.add(int(u.group(1)))
            continue
        elif (r := _RESUMED.match(line)):
            pid, ret = int(r.group(1)), r.group(4)
            call, args = pending.pop(pid, (r.group(2), ""))
            args += r.group(3)
        else:
            continue
        if not chrooted:
            before.add(pid)
        elif pid not in before:
            inside.add(pid)
        if ret == "?" or int(ret) < 0:
            continue
        if call == "chroot":
            chrooted = True
            inside.add(pid)
            continue
        if pid not in inside or call not in _PATH_ARG:
            continue
        path = _string_arg(args, _PATH_ARG[call])
        if not path or not path.startswith("/"):
            continue
        add(path, executed=call == "execve")
    return list(seen)


def run_traced(root: Path, command: list[str], timeout: float, env: dict[str, str] | None = None) -> TraceResult:
    if not command:
        raise UsageError("no command to trace (give it after '--')")
    for tool in ("strace", "unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise RemoraError(f"'{tool}' is required by remora trace (apt-get install strace util-linux)")
    (root / "proc").mkdir(exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    script = (f"mount -t proc proc {shlex.quote(str(root / 'proc'))} && "
              f"mount --rbind /dev {shlex.quote(str(root / 'dev'))} && exec chroot {shlex.quote(str(root))} \"$@\"")
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        argv = ["strace", "-f", "-qq", "-o", log.name, "-e", "trace=process,chroot,open,openat,openat2",
                "-e", "signal=none", "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                "sh", "-c", script, "sh", *command]
        run_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                   "LANG": "C.UTF-8", **(env or {})}
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=run_env)
        except subprocess.TimeoutExpired:
            raise RemoraError(f"the traced command did not finish within {timeout:.0f}s") from None
        files = parse_strace(Path(log.name).read_text(errors="replace"), root)
    return TraceResult(files, proc.returncode, proc.stdout + proc.stderr)


def trace_image(image: str, command: list[str], *, timeout: float = 120.0, plain_http: bool | None = None,
                env: dict[str, str] | None = None, progress=None) -> TraceResult:
    """Materialise ``image`` (converting it first if it is a plain OCI image) and trace ``command``
    in it. ``progress`` (a converter.progress.Progress) shows each step as it runs."""
    from remora.converter.convert import ConvertOptions, convert
    from remora.converter.image import LocalBlobs, RemoraImage
    from remora.converter.unpack import unpack
    from remora.converter.workdir import work_dir
    from remora.errors import InvalidInput
    from remora.imagestore import open_store

    def phase(text: str, total: int | None = None) -> None:
        if progress is not None:
            progress.phase(text, total)

    with work_dir("trace") as tmp_path:
        ref = image
        phase("image metadata")
        try:
            remora_image = RemoraImage.open(open_store(ref, plain_http=plain_http), tmp_path / "meta")
        except InvalidInput:
            ref = f"oci:{tmp_path / 'converted'}:trace"
            phase("convert (not a remora image)")
            convert(image, ref, ConvertOptions(progress=False, plain_http=plain_http))
            remora_image = RemoraImage.open(open_store(ref), tmp_path / "meta")
        try:
            root = tmp_path / "rootfs"
            unpack(remora_image, root, LocalBlobs(remora_image, tmp_path / "blobs"), progress=progress)
        finally:
            remora_image.close()
        phase("run the workload under strace")
        return run_traced(root, command, timeout, env)
