"""remora trace: records the files a real workload reads, in order, and feeds --prefetch-list."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from remora.converter.convert import ConvertOptions, convert
from remora.converter.trace import exec_interpreter, resolve_in_root, trace_image
from remora_testing.imagebuild import LayerSpec, busybox_rootfs, debian_rootfs, write_image
from remora_testing.tarbuild import LayerBuilder


def test_resolve_in_root_follows_links_inside_the_root(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/real").write_text("x")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "usr/bin/abs").symlink_to("/usr/bin/real")
    (tmp_path / "usr/bin/escape").symlink_to("../../../../etc/passwd")
    assert resolve_in_root(tmp_path, "/bin/abs") == "/usr/bin/real"
    assert resolve_in_root(tmp_path, "/bin/escape") is None  # stays inside the root: /etc/passwd there is absent
    assert resolve_in_root(tmp_path, "/nope") is None


def test_exec_interpreter_of_scripts_and_elf_programs(tmp_path):
    script = tmp_path / "run"
    script.write_bytes(b"#!/usr/bin/env  python3 -u\nprint(1)\n")
    assert exec_interpreter(script) == "/usr/bin/env"
    (tmp_path / "empty").write_bytes(b"#!\n")
    assert exec_interpreter(tmp_path / "empty") is None
    (tmp_path / "text").write_bytes(b"hello\n")
    assert exec_interpreter(tmp_path / "text") is None
    # a dynamically linked program of this machine names its loader; a static one has none
    loader = exec_interpreter(Path(shutil.which("ls")))
    assert loader and loader.startswith("/") and "ld-linux" in loader
    assert exec_interpreter(Path(shutil.which("busybox"))) is None
    (tmp_path / "truncated").write_bytes(Path(shutil.which("ls")).read_bytes()[:40])
    assert exec_interpreter(tmp_path / "truncated") is None


def test_trace_busybox_workload_in_order(registry, tmp_path):
    app = (LayerBuilder().add_file("etc/first", b"1\n").add_file("etc/second", b"2\n").add_file("etc/unread", b"3\n")
           .add_file("app/run.sh", b"#!/bin/sh\ncat /etc/second; cat /etc/first\n", mode=0o755).build("none"))
    src = f"{registry.host}/trace/bb:1"
    write_image(src, None, [LayerSpec(busybox_rootfs(tmp_path / "bb")), LayerSpec(app)])
    result = trace_image(src, ["/app/run.sh"])
    assert result.exit_code == 0, result.output
    files = result.files
    # the runtime's reads first; then the script, and the shell the kernel opened for its #! line
    assert files[:2] == ["/etc/passwd", "/etc/group"]
    assert files[2:4] == ["/app/run.sh", "/bin/busybox"]
    assert files.index("/etc/second") < files.index("/etc/first")
    assert "/etc/unread" not in files


@pytest.mark.slow
def test_trace_python_then_convert_with_the_list(registry, cache_dir, tmp_path):
    src = f"{registry.host}/trace/py:1"
    write_image(src, None, [LayerSpec(debian_rootfs(cache_dir))])
    hot = tmp_path / "hot.txt"
    proc = subprocess.run(["remora", "trace", src, "-o", str(hot), "--", "python3", "-c", "import json, email.parser"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    files = hot.read_text().split()
    assert files[:2] == ["/etc/passwd", "/etc/group"]  # what containerd and runc read before the command
    assert files[2] == "/usr/bin/python3.11"          # the interpreter is executed first,
    assert files[3].endswith("/ld-linux-x86-64.so.2")  # and the kernel opens its loader
    # python reads the byte-compiled modules (the .py is only stat'ed, which needs no data)
    assert any(f.startswith("/usr/lib/python3.11/json/") for f in files)
    assert any(f.startswith("/usr/lib/python3.11/email/") and "parser" in f for f in files)
    assert not any("/tkinter/" in f for f in files)
    report = convert(src, f"{registry.host}/trace/py:1-remora",
                     ConvertOptions(progress=False, prefetch_list=files))
    assert report.prefetch_files == len(files)
