"""Size and shape limits on the small JSON objects of an image, applied while reading.

A 600 MiB image config used to be read whole before its 4 MiB limit applied (1.25 GB RSS); a
deeply nested JSON config gave a RecursionError traceback (exit 1). Both are exit 3 now, with the
converter's memory bounded, measured in a subprocess of a parent of its own.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remora import oci
from remora.imagestore import open_store
from remora.layout import OCILayout
from remora_testing.imagebuild import LayerSpec, write_image
from remora_testing.tarbuild import LayerBuilder

_RUSAGE_WRAPPER = ("import resource, subprocess, sys; "
                   "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                   "sys.stderr.write(p.stderr); "
                   "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _run_measured(*cmd: str) -> tuple[int, float, str, float]:
    """``(exit code, peak RSS MB, stderr, seconds)`` of ``cmd``."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _RUSAGE_WRAPPER, *cmd], capture_output=True, text=True, timeout=300)
    code, peak_kb = proc.stdout.split()[-2:]
    return int(code), int(peak_kb) / 1024, proc.stderr, time.monotonic() - started


def _image_with_config(tmp_path: Path, write_config, declared_size=None) -> str:
    """An OCI layout image whose config blob is written by ``write_config(file) -> None``."""
    layout = tmp_path / "src"
    img = write_image(f"oci:{layout}:1", None, [LayerSpec(LayerBuilder().add_file("a", b"abc").build("none"))])
    lay = OCILayout.open(layout)
    tmp = tmp_path / "config.part"
    with open(tmp, "wb") as f:
        write_config(f)
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = "sha256:" + h.hexdigest()
    size = tmp.stat().st_size
    tmp.rename(lay.blob_path(digest))
    manifest = oci.parse_manifest(img.manifest)
    new = oci.Manifest(config=oci.Descriptor(oci.MEDIA_TYPE_OCI_CONFIG, digest, declared_size or size),
                       layers=manifest.layers)
    data = new.to_bytes()
    open_store(f"oci:{layout}:1").push_manifest(
        oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(), len(data)),
        data, "big")
    return f"oci:{layout}:big"


def _600mib(f) -> None:
    f.write(b'{"rootfs": {"type": "layers", "diff_ids": []}, "pad": "')
    block = b"x" * (1 << 20)
    for _ in range(600):
        f.write(block)
    f.write(b'"}')


@pytest.mark.parametrize("lie", [False, True], ids=["honest-size", "descriptor-says-1000-bytes"])
def test_600mib_config_is_rejected_with_bounded_memory(tmp_path, lie):
    ref = _image_with_config(tmp_path, _600mib, declared_size=1000 if lie else None)
    code, peak_mb, err, seconds = _run_measured("remora", "convert", ref, f"oci:{tmp_path}/out:1", "--no-progress")
    print(f"600 MiB config ({'lying' if lie else 'honest'} descriptor): exit {code}, peak RSS {peak_mb:.0f} MB, "
          f"{seconds:.2f} s")
    assert code == 3, err
    assert "Traceback" not in err
    assert "limit" in err or "size" in err or "bytes" in err, err
    assert 5 < peak_mb < 250, f"peak RSS {peak_mb:.0f} MB"


@pytest.mark.parametrize("what", ["config", "manifest"])
def test_deeply_nested_json_is_invalid_input_not_recursion(tmp_path, what):
    nested = b'{"rootfs": {"type": "layers", "diff_ids": []}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if what == "config":
        ref = _image_with_config(tmp_path, lambda f: f.write(nested))
    else:
        layout = tmp_path / "src"
        write_image(f"oci:{layout}:1", None, [LayerSpec(LayerBuilder().add_file("a", b"abc").build("none"))])
        lay = OCILayout.open(layout)
        digest, size = lay.write_blob_bytes(nested.replace(b'"rootfs"', b'"schemaVersion": 2, "r"', 1))
        lay.add_manifest(oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, digest, size), "deep")
        ref = f"oci:{layout}:deep"
    proc = subprocess.run(["remora", "convert", ref, f"oci:{tmp_path}/out:1", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    assert "nest" in proc.stderr


def test_read_limited_reads_at_most_limit_plus_one():
    class Endless:
        read_total = 0
        closed = False

        def read(self, n):
            self.read_total += n
            return b"x" * n

        def close(self):
            self.closed = True

    s = Endless()
    with pytest.raises(oci.InvalidInput, match="limit"):
        oci.read_limited(s, 4 * 1024 * 1024, "config")
    assert s.read_total == 4 * 1024 * 1024 + 1 and s.closed
    assert oci.read_limited(__import__("io").BytesIO(b"{}"), 10, "config") == b"{}"
