"""The converter's speed work must not change a byte or lose an error (issue 15, part 5).

* zstd contexts are reused per thread: frames must stay byte-identical to a fresh context's and
  correct when several threads compress at once;
* data blobs are pushed on a thread while the bootstrap is built: an upload error must still fail
  the conversion, and no manifest or tag may appear;
* single-chunk files take a fast path in the sink: the result must equal the generic chunker's;
* plain regular files are merged by a fused loop that hands their bytes over whole
  (``LayerMerger._fast_regulars``): the image must be byte-identical to the general path's.
"""
from __future__ import annotations

import io
import sys
import threading

import pytest
import zstandard

from remora.converter.convert import ConvertOptions, convert
from remora.format.blob import _compressor, compress_frame, decompress_frame
from remora.format.chunker import ChunkingSpec
from remora.imagestore import LayoutStore, open_store
from remora_testing.imagebuild import LayerSpec, write_image
from remora_testing.tarbuild import LayerBuilder


def _payloads(n: int) -> list[bytes]:
    rnd = __import__("random").Random(15)
    out = []
    for i in range(n):
        words = [b"alpha", b"beta", b"gamma", b"delta", bytes([65 + i % 26])]
        text = b" ".join(rnd.choice(words) for _ in range(20000))
        out.append(text + rnd.randbytes(rnd.randint(0, 50000)))
    return out


def test_reused_context_gives_the_bytes_of_a_fresh_one():
    assert _compressor(3) is _compressor(3)
    fresh = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    for data in _payloads(8):
        assert compress_frame(data) == fresh.compress(data)
        assert compress_frame(bytearray(data)) == fresh.compress(data)   # batch buffers are bytearrays


def test_frames_compressed_on_many_threads_at_once_are_each_correct():
    payloads = _payloads(24)
    expected = [zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False).compress(p)
                for p in payloads]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for k in range(offset, len(payloads), 4):
                results[k] = compress_frame(payloads[k])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[k] for k in range(len(payloads))] == expected
    for k, p in enumerate(payloads):
        assert decompress_frame(results[k], len(p)) == p


def _image(tmp_path, files: dict[str, bytes]) -> str:
    b = LayerBuilder()
    for name, data in files.items():
        b.add_file(name, data, mtime=1_700_000_000)
    src = f"oci:{tmp_path / 'src'}:v1"
    write_image(src, None, [LayerSpec(b.build("none"))], config={"Cmd": ["sh"]})
    return src


def test_an_upload_error_on_the_push_thread_fails_the_conversion(tmp_path, monkeypatch):
    src = _image(tmp_path, {"a": b"A" * 300_000, "b": b"small\n"})
    calls = []

    def failing_push(self, desc, path):
        calls.append((threading.current_thread().name, desc.media_type))
        raise OSError(5, "injected upload failure")

    monkeypatch.setattr(LayoutStore, "push_blob", failing_push)
    before = sys.getswitchinterval()
    with pytest.raises(OSError, match="injected upload failure"):
        convert(src, f"oci:{tmp_path / 'dst'}:v1", ConvertOptions(progress=False, workdir=tmp_path / "work"))
    assert calls and calls[0][0] == "blob-push"          # the data blob went up on the push thread
    assert sys.getswitchinterval() == before            # restored after a failure too
    dst = tmp_path / "dst" / "index.json"
    assert not dst.exists() or b"v1" not in dst.read_bytes()   # no tag points at a partial image


@pytest.mark.parametrize("chunking", ["fixed:64K", "cdc:256K"])
def test_single_chunk_fast_path_matches_the_chunker(tmp_path, chunking):
    spec = ChunkingSpec.parse(chunking)
    limit = spec.whole_file_max
    files = {"zero": b"", "one": b"1", "at-limit": b"L" * limit, "over-limit": bytes(range(256)) * (limit // 128 + 3),
             "small": b"s" * 1000}
    src = _image(tmp_path, files)
    dst = f"oci:{tmp_path / 'dst'}:v1"
    report = convert(src, dst, ConvertOptions(chunking=spec, progress=False))
    assert report.files == len(files) - 1       # the empty file has no content to chunk
    assert report.file_bytes == sum(len(v) for v in files.values())
    from remora.converter.image import LocalBlobs, RemoraImage

    img = RemoraImage.open(open_store(dst), tmp_path / "meta")
    blobs = LocalBlobs(img, tmp_path / "blobs")
    try:
        for name, data in files.items():
            node = img.bootstrap.lookup_path("/" + name)
            plan = img.bootstrap.read_plan(node.ino, 0, len(data))
            expected = [len(c) for c in spec.chunks(io.BytesIO(data), len(data))]
            assert [e.chunk.size for e in plan] == expected, name
            assert b"".join(blobs.chunk(e) for e in plan) == data, name
    finally:
        img.close()


def test_fused_regular_file_loop_gives_a_byte_identical_image(tmp_path, monkeypatch):
    """Two layers of many small files (a whiteout, an opaque directory, a replaced file, a hard link,
    files big enough for frames of their own, a prefetch list that takes some of them through the
    hot spool) convert to the same manifest, i.e. the same bootstrap and data blobs, with the fused
    loop and with every member on the general path."""
    from remora.converter.merge import LayerMerger

    rnd = __import__("random").Random(7)
    words = [b"import", b"def", b"return", b"self", b"class", b"value", b"\n"]
    layers = []
    for n in range(2):
        b = LayerBuilder()
        for d in range(8):
            for i in range(60):
                size = rnd.choice([0, 10, 700, 3000, 9000, 300_000]) if i % 7 == 0 else rnd.randint(50, 6000)
                data = f"# {n}/{d}/{i}\n".encode() + b" ".join(rnd.choice(words) for _ in range(size // 5))
                b.add_file(f"src/m{d}/f{i}.py", data, mtime=1_700_000_000)
        if n:
            b.whiteout("src/m1/f3.py").opaque("src/m2").add_hardlink("src/m3/link.py", "src/m3/f1.py")
        layers.append(LayerSpec(b.build("none")))
    src = f"oci:{tmp_path / 'src'}:v1"
    write_image(src, None, layers, config={"Cmd": ["sh"]})
    hot = ["/src/m0/f2.py", "/src/m4/f14.py", "/src/m3/link.py"]

    def run(name: str):
        dst = f"oci:{tmp_path / name}:v1"
        report = convert(src, dst, ConvertOptions(prefetch_list=hot, progress=False))
        return report.manifest_digest, report.files, report.prefetch_files

    fused = run("fused")
    monkeypatch.setattr(LayerMerger, "_fast_regulars", lambda self, tf, reader, whole, stats: None)
    general = run("general")
    assert fused == general
    assert fused[1] > 900 and fused[2] == 3
