"""remora trace: records the files a real workload reads, in order, and feeds --prefetch-list."""
from __future__ import annotations

import subprocess

import pytest

from remora.converter.convert import ConvertOptions, convert
from remora.converter.trace import resolve_in_root, trace_image
from remora.imagebuild import LayerSpec, busybox_rootfs, debian_rootfs, write_image
from remora.tarbuild import LayerBuilder


def test_resolve_in_root_follows_links_inside_the_root(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/real").write_text("x")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "usr/bin/abs").symlink_to("/usr/bin/real")
    (tmp_path / "usr/bin/escape").symlink_to("../../../../etc/passwd")
    assert resolve_in_root(tmp_path, "/bin/abs") == "/usr/bin/real"
    assert resolve_in_root(tmp_path, "/bin/escape") is None  # stays inside the root: /etc/passwd there is absent
    assert resolve_in_root(tmp_path, "/nope") is None


def test_trace_busybox_workload_in_order(registry, tmp_path):
    app = LayerBuilder().add_file("etc/first", b"1\n").add_file("etc/second", b"2\n").add_file("etc/unread", b"3\n").build("none")
    src = f"{registry.host}/trace/bb:1"
    write_image(src, None, [LayerSpec(busybox_rootfs(tmp_path / "bb")), LayerSpec(app)])
    result = trace_image(src, ["/bin/sh", "-c", "cat /etc/second; cat /etc/first"])
    assert result.exit_code == 0, result.output
    files = result.files
    assert "/bin/busybox" in files
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
    assert files[0] == "/usr/bin/python3.11"          # the interpreter is executed first
    # python reads the byte-compiled modules (the .py is only stat'ed, which needs no data)
    assert any(f.startswith("/usr/lib/python3.11/json/") for f in files)
    assert any(f.startswith("/usr/lib/python3.11/email/") and "parser" in f for f in files)
    assert not any("/tkinter/" in f for f in files)
    report = convert(src, f"{registry.host}/trace/py:1-remora",
                     ConvertOptions(progress=False, prefetch_list=files))
    assert report.prefetch_files == len(files)
