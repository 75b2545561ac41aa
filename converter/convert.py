"""``remora convert``: read an OCI image, write a lazy-loadable remora image.

Pipeline (one pass over the source layers, bounded memory)::

    source blob --verify digest--> decompress --verify diff_id--> tar merge (OCI semantics)
        regular file content --> chunker --> Packer (dedup, batching, zstd on a thread pool) --> data blob
    merged tree + chunk table + prefetch order --> bootstrap (SQLite) --> tar+zstd layer
    push: data blobs, bootstrap, config, then the manifest (or an index with --with-oci-fallback)

Blobs are pushed before the manifest, so a tag never points at a partial image, and nothing is pushed
at all until every layer is converted and verified locally (the data blobs then go up on a thread
while the bootstrap is built).
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from remora import oci
from remora.compression import open_layer_stream
from remora.converter.chunkdict import ChunkDict, load_chunk_dict
from remora.converter.merge import LayerMerger
from remora.converter.packer import Packer
from remora.converter.progress import Progress
from remora.converter.report import ConvertReport
from remora.converter.workdir import work_dir
from remora.digest import sha256_digest
from remora.errors import DigestMismatch, InvalidInput, NotFound, StorageError
from remora.format import FORMAT_VERSION
from remora.format import annotations as ann
from remora.format.bootstrap import write_bootstrap
from remora.format.bootstrap_layer import encode_bootstrap_layer
from remora.format.chunker import ChunkingSpec, read_exact
from remora.format.chunktable import ChunkTable
from remora.format.tree import ChunkRef, split_path
from remora.imagestore import open_store

log = logging.getLogger(__name__)

@dataclass
class ConvertOptions:
    chunking: ChunkingSpec = field(default_factory=ChunkingSpec)
    level: int = 3                         # zstd level of data frames
    batch_size: int = 256 * 1024           # small chunks share frames up to this many bytes
    prefetch_list: list[str] = field(default_factory=list)
    chunk_dict: str | None = None          # file or image reference
    with_oci_fallback: bool = False
    platform: str = "linux/amd64"
    plain_http: bool | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    workdir: Path | None = None
    keep_workdir: bool = False
    progress: bool | None = None           # None: when stderr is a terminal


class _Counting(io.RawIOBase):
    """Pass-through reader that counts bytes (progress) and optionally hashes them (diff_id).

    ``read`` hands on the source's bytes objects as they are (``RawIOBase.read`` would copy every
    block twice through ``readinto``): this sits on the layer's hot path.
    """

    def __init__(self, src: BinaryIO, on_bytes=None, hash_it: bool = False):
        self.src, self.on_bytes = src, on_bytes
        self.count = 0
        self.hasher = hashlib.sha256() if hash_it else None

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.src.read(-1 if size is None else size)
        n = len(data)
        self.count += n
        if self.hasher is not None:
            self.hasher.update(data)
        if self.on_bytes and n:
            self.on_bytes(n)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _ThreadedReader(io.RawIOBase):
    """Read ``src`` on a background thread into a bounded queue of blocks.

    Decompression (isal/zstandard release the GIL) and digest checks of a layer then run on one core
    while tar parsing, chunk hashing and packing run on the other. An exception on the reader thread
    is re-raised to the consumer at the point it reaches it, so a corrupt stream never looks short.
    """

    _EOF = object()

    def __init__(self, src: BinaryIO, block: int = 1 << 20, depth: int = 8):
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(depth)
        self._buf = memoryview(b"")
        self._stop = threading.Event()
        self._done = False
        self._t = threading.Thread(target=self._run, args=(src, block), name="layer-reader", daemon=True)
        self._t.start()

    def _run(self, src: BinaryIO, block: int) -> None:
        try:
            while not self._stop.is_set():
                data = src.read(block)
                if not data:
                    break
                self._q.put(data)
            self._q.put(self._EOF)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._q.put(exc)

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        while not self._buf:
            if self._done:
                return False
            item = self._q.get()
            if item is self._EOF:
                self._done = True
                return False
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._buf = memoryview(item)
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (at most one block; ``b""`` at the end). A whole block is handed out
        without a copy, so the tar reader above gets the decompressor's blocks as they are."""
        if not self._fill():
            return b""
        buf = self._buf
        if size is None or size < 0 or size >= len(buf):
            self._buf = memoryview(b"")
            whole = type(buf.obj) is bytes and len(buf) == len(buf.obj)
            return buf.obj if whole else bytes(buf)
        self._buf = buf[size:]
        return bytes(buf[:size])

    def readinto(self, b) -> int:
        if not self._fill():
            return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        while self._t.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except Exception:  # noqa: BLE001
                self._t.join(0.05)
        super().close()


class _HotSpool:
    """Content of prefetch-list files, kept aside until every layer is merged.

    Hot files are written last into their own blob, in access order, so the snapshotter's first range
    request brings them together. Only the final version of a path ends up in the blob (a later layer may
    overwrite or delete it), which is only known once every layer has been read.
    """

    def __init__(self, workdir: Path):
        self.f = open(workdir / "hot.spool", "w+b")
        self.chunks: dict[bytes, tuple[int, int]] = {}

    def add(self, digest: bytes, data: bytes) -> None:
        if digest not in self.chunks:
            off = self.f.seek(0, io.SEEK_END)
            self.f.write(data)
            self.chunks[digest] = (off, len(data))

    def read(self, digest: bytes) -> bytes:
        off, size = self.chunks[digest]
        self.f.seek(off)
        return self.f.read(size)

    def close(self) -> None:
        self.f.close()


def _norm(path: str | bytes) -> bytes:
    return b"/" + b"/".join(split_path(path))


def read_prefetch_list(path: str | Path) -> list[str]:
    """One absolute path per line, in access order; blank lines and ``#`` comments ignored."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def convert(source: str, destination: str, opts: ConvertOptions | None = None) -> ConvertReport:
    opts = opts or ConvertOptions()
    started = time.monotonic()
    report = ConvertReport(source=source, destination=destination, chunking=str(opts.chunking))
    with ExitStack() as stack:
        if opts.workdir is None:
            # locked while we run, swept by the next run if we are killed (converter/workdir.py)
            workdir = stack.enter_context(work_dir("convert", keep=opts.keep_workdir))
        else:
            workdir = Path(opts.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        interval = sys.getswitchinterval()
        # The pipeline thread is pure Python; the decompressing, compressing and writing threads
        # need the GIL for a moment after each block. At the default 5 ms they wait that long each
        # time (CPython's GIL convoy), idling a core; 0.5 ms keeps them busy for a few % more
        # context switches.
        sys.setswitchinterval(min(interval, 0.0005))
        try:
            with Progress(opts.progress) as progress:
                _convert(source, destination, opts, report, workdir, progress)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageError(f"disk full in {workdir} while converting (no manifest was pushed): {exc}") from None
            raise
        finally:
            sys.setswitchinterval(interval)
    report.seconds = time.monotonic() - started
    return report


def _convert(source: str, destination: str, opts: ConvertOptions, report: ConvertReport, workdir: Path,
             progress: Progress) -> None:
    """The pipeline of the module docstring, one phase per function."""
    src = open_store(source, plain_http=opts.plain_http)
    dst = open_store(destination, plain_http=opts.plain_http)
    image = _read_source(src, source, opts)
    chunk_dict = load_chunk_dict(opts.chunk_dict, workdir, opts.plain_http) if opts.chunk_dict else None
    packing = _Packing(workdir, opts, chunk_dict, report)
    tree, layer_blobs, hot_blob, prefetch_inos = packing.run(src, image, progress)
    blobs, boot = _write_bootstrap(dst, image, packing, tree, layer_blobs, hot_blob, prefetch_inos, opts, report,
                                   progress, workdir)
    out = _remora_manifest(dst, image, packing.table, blobs, boot, bool(prefetch_inos), report)
    _push_image(src, dst, source, image, out, boot, chunk_dict, opts, report, progress, workdir)


@dataclass
class _SourceImage:
    mdesc: oci.Descriptor        # the platform manifest converted (not the index)
    mbytes: bytes
    manifest: oci.Manifest
    config: oci.ImageConfig


def _read_source(src, source: str, opts: ConvertOptions) -> _SourceImage:
    """Phase 1: the source manifest (for ``opts.platform`` when it is an index) and its config, with
    every check that can fail before any layer is read."""
    top_desc, top_bytes = src.resolve()
    top = oci.parse_manifest_or_index(top_bytes, top_desc.media_type)
    if isinstance(top, oci.Index):
        mdesc = oci.select_platform(top, opts.platform)
        mbytes = src.get_manifest(mdesc)
        manifest = oci.parse_manifest(mbytes, mdesc.media_type)
    else:
        mdesc, mbytes, manifest = top_desc, top_bytes, top
    if ann.is_remora_manifest(manifest.to_dict()):
        raise InvalidInput(f"{source} is already a remora image")
    if manifest.config.size > oci.MAX_MANIFEST_SIZE:
        raise InvalidInput(f"{source}: image config of {manifest.config.size} bytes is over the "
                           f"{oci.MAX_MANIFEST_SIZE}-byte limit")
    config = oci.ImageConfig.from_bytes(oci.read_limited(src.open_blob(manifest.config), oci.MAX_MANIFEST_SIZE,
                                                         f"{source}: image config"))
    if len(config.diff_ids) != len(manifest.layers):
        raise InvalidInput(f"{source}: manifest has {len(manifest.layers)} layers but config has "
                           f"{len(config.diff_ids)} diff_ids")
    for layer in manifest.layers:
        oci.layer_compression(layer.media_type)  # UnsupportedMediaType before any work
    return _SourceImage(mdesc, mbytes, manifest, config)


class _Packing:
    """Phases 2 and 3: merge the layers (OCI semantics) and pack their content into data blobs, one
    per layer, then the hot files' chunks into a blob of their own in access order."""

    def __init__(self, workdir: Path, opts: ConvertOptions, chunk_dict: ChunkDict | None, report: ConvertReport):
        self.table = ChunkTable()
        self.packer = Packer(workdir, self.table, level=opts.level, batch_size=opts.batch_size,
                             workers=opts.workers, chunk_dict=chunk_dict.table if chunk_dict else None)
        self.hot_order = [_norm(p) for p in opts.prefetch_list]
        self.hot = set(self.hot_order)
        self.spool = _HotSpool(workdir)
        self.merger = LayerMerger()
        self.report = report
        self.whole_file_max = opts.chunking.whole_file_max
        self.chunks_of = opts.chunking.chunks

    def sink(self, fileobj: BinaryIO, size: int) -> list[ChunkRef]:
        """The merger's callback for one regular file's content: its chunk references."""
        report, add = self.report, self.packer.add
        is_hot = self.hot and self.merger.current_path in self.hot
        if not is_hot and 0 < size <= self.whole_file_max:
            # most files are one chunk: no generator, one read (per-file cost matters on images
            # of many small files)
            report.files += 1
            report.file_bytes += size
            return [add(read_exact(fileobj, size))]
        refs = []
        for data in self.chunks_of(fileobj, size):
            if is_hot:
                digest = hashlib.sha256(data).digest()
                self.spool.add(digest, data)
                refs.append(ChunkRef(digest, len(data)))
            else:
                refs.append(add(data))
        report.files += 1
        report.file_bytes += size
        return refs

    def whole(self, data: memoryview) -> list[ChunkRef]:
        """The merger's callback for a regular file whose content it holds whole (most small files):
        what :meth:`sink` returns for it, without a file object or a copy of the bytes."""
        size = len(data)
        if size > self.whole_file_max or (self.hot and self.merger.current_path in self.hot):
            return self.sink(io.BytesIO(data), size)
        report = self.report
        report.files += 1
        report.file_bytes += size
        return [self.packer.add(data)]

    def run(self, src, image: _SourceImage, progress: Progress):
        """``(tree, layer blob ids, hot blob id or None, prefetch inodes)``; on any error the packer's
        files are removed."""
        try:
            layer_blobs = [b for i, layer in enumerate(image.manifest.layers)
                           if (b := self._layer(src, i, layer, image, progress)) is not None]
            tree = self.merger.finish()
            hot_blob, prefetch_inos = self._hot_blob(tree, progress)
            self.packer.close()
        except BaseException:
            self.packer.abort()
            raise
        finally:
            self.spool.close()
        report, st = self.report, self.packer.stats
        report.prefetch_files = len(prefetch_inos)
        report.chunks_seen, report.chunks_stored = st.chunks_seen, st.chunks_stored
        report.chunks_deduped, report.bytes_deduped = st.chunks_deduped, st.bytes_deduped
        report.chunks_reused, report.bytes_reused = st.chunks_reused, st.bytes_reused
        report.layers = len(image.manifest.layers)
        return tree, layer_blobs, hot_blob, prefetch_inos

    def _layer(self, src, i: int, layer: oci.Descriptor, image: _SourceImage, progress: Progress) -> int | None:
        """Merge and pack layer ``i``, verifying its diff_id; its data blob id (None if it added no new
        chunk)."""
        manifest, diff_id = image.manifest, image.config.diff_ids[i]
        progress.phase(f"layer {i + 1}/{len(manifest.layers)} {layer.digest[7:19]}", layer.size)
        self.report.input_compressed_bytes += layer.size
        compressed = _Counting(src.open_blob(layer), on_bytes=progress.advance)
        tar_stream = _Counting(open_layer_stream(compressed, layer.media_type), hash_it=True)
        reader = _ThreadedReader(tar_stream)
        self.packer.open_blob()
        try:
            self.merger.apply_layer(reader, self.sink, label=layer.digest[:19], whole=self.whole)
            while reader.read(1 << 20):
                pass
        finally:
            reader.close()
            compressed.close()
        actual = "sha256:" + tar_stream.hasher.hexdigest()
        if actual != diff_id:
            raise DigestMismatch(f"layer {i} ({layer.digest}) uncompressed content", diff_id, actual)
        self.report.input_bytes += tar_stream.count
        sealed = self.packer.close_blob()
        return sealed[0] if sealed else None

    def _hot_blob(self, tree, progress: Progress):
        """The prefetch files' chunks, in access order, in one blob: ``(blob id or None, inodes)``."""
        table, packer, spool = self.table, self.packer, self.spool
        progress.phase("prefetch blob", sum(size for _, size in spool.chunks.values()))
        prefetch_inos = []
        packer.open_blob(ordered=True)
        for path in dict.fromkeys(self.hot_order):
            node = tree.lookup(path)
            if node is None or not node.is_reg:
                continue
            for ref in node.chunks:
                if ref.digest not in table.by_digest:
                    packer.add(spool.read(ref.digest), ref.digest)
                    progress.advance(ref.size)
            prefetch_inos.append(node)
        # Spooled content still referenced through another path (a hard link made before the hot path
        # was replaced) goes into the hot blob too; every chunk of the tree must be in the table.
        # Without spooled chunks every chunk went through Packer.add, which tables it: no walk.
        for _, node in (tree.walk() if spool.chunks else ()):
            for ref in node.chunks or ():
                if ref.digest not in table.by_digest:
                    if ref.digest not in spool.chunks:
                        raise InvalidInput(f"internal error: chunk {ref.digest.hex()} of the tree was never packed")
                    packer.add(spool.read(ref.digest), ref.digest)
                    progress.advance(ref.size)
        sealed = packer.close_blob()
        return (sealed[0] if sealed else None), prefetch_inos


@dataclass
class _Bootstrap:
    path: Path
    digest: str
    size: int
    diff_id: str


def _write_bootstrap(dst, image: _SourceImage, packing: _Packing, tree, layer_blobs: list[int],
                     hot_blob: int | None, prefetch_inos, opts: ConvertOptions, report: ConvertReport,
                     progress: Progress, workdir: Path):
    """Phase 4: the bootstrap and its layer, while the data blobs go up on a thread (every layer is
    merged and verified by now, so the registry's hashing and the upload overlap SQLite work instead
    of following it). Returns ``([(blob id, path or None, bytes pushed)] in manifest order, the
    bootstrap layer)``; the hot blob, when there is one, comes first."""
    table, packer = packing.table, packing.packer
    progress.phase("bootstrap", len(table.chunks) * 48 or None)   # a first guess, corrected below
    files = {bid: packer.blob_path(bid) for bid in range(len(table.blobs))}
    remap = table.drop_unused_blobs()
    blob_files = {remap[old]: path for old, path in files.items() if old in remap and path is not None}
    order = [remap[b] for b in ([hot_blob] if hot_blob is not None else []) + layer_blobs]
    order += [b for b in range(len(table.blobs)) if b not in order]
    meta = {"source_manifest": image.mdesc.digest, "chunking": str(opts.chunking), "zstd_level": str(opts.level),
            "batch_size": str(opts.batch_size), "created_by": "remora convert"}
    db_path = workdir / "bootstrap.db"
    pusher = _BlobPusher(dst, [(oci.Descriptor(ann.BLOB_MEDIA_TYPE, *table.blobs[b]), blob_files[b])
                               for b in order if b in blob_files])
    try:
        write_bootstrap(db_path, tree, table, [n.ino for n in prefetch_inos], meta)
        boot = _Bootstrap(*encode_bootstrap_layer(db_path, workdir))
    except BaseException:
        pusher.join(raise_error=False)     # never leave the thread running past the work dir
        raise
    pushed = pusher.join()                 # re-raises an upload error
    report.bootstrap_bytes = boot.size
    progress.complete(boot.size)
    hot_bid = remap.get(hot_blob) if hot_blob is not None else None
    blobs = [(bid, blob_files.get(bid), pushed.get(table.blobs[bid][0], 0), bid == hot_bid) for bid in order]
    return blobs, boot


@dataclass
class _Output:
    layers: list[tuple[oci.Descriptor, Path | None, int]]     # data blobs: descriptor, local file, pushed
    boot_desc: oci.Descriptor
    config_desc: oci.Descriptor
    config_bytes: bytes
    manifest_desc: oci.Descriptor
    manifest_bytes: bytes


def _remora_manifest(dst, image: _SourceImage, table: ChunkTable, blobs, boot: _Bootstrap, has_prefetch: bool,
                     report: ConvertReport) -> _Output:
    """Phase 5: the remora manifest and config (docs/format.md §2): the data blobs, then the bootstrap
    layer, each annotated with where the bootstrap is and where the blobs live."""
    host, repo = store_location(dst)
    where = f"{host}/{repo}" if host != "oci" else None   # lets the snapshotter find blobs with no client help
    layers: list[tuple[oci.Descriptor, Path | None, int]] = []
    for bid, path, pushed, is_hot in blobs:
        digest, size = table.blobs[bid]
        # The hot blob is nothing but the prefetch files' chunks in access order: a snapshotter may
        # fetch it whole the moment it sees this layer, before it has the bootstrap.
        desc = oci.Descriptor(ann.BLOB_MEDIA_TYPE, digest, size,
                              ann.layer_annotations("blob", boot.digest, boot.size, where,
                                                    prefetch_bytes=size if is_hot and has_prefetch else 0))
        layers.append((desc, path, pushed))
    boot_desc = oci.Descriptor(ann.BOOTSTRAP_MEDIA_TYPE, boot.digest, boot.size,
                               ann.layer_annotations("bootstrap", boot.digest, boot.size, where))
    config = image.config
    new_config = oci.ImageConfig(dict(config.raw))
    new_config.diff_ids = [d.digest for d, _, _ in layers] + [boot.diff_id]
    created = config.raw.get("created")
    new_config.raw["history"] = [
        {**({"created": created} if created else {}), "created_by": f"remora convert (format v{FORMAT_VERSION})",
         "comment": "remora data blob" if d is not boot_desc else "remora bootstrap"}
        for d in [x for x, _, _ in layers] + [boot_desc]]
    config_bytes = new_config.to_bytes()
    config_desc = oci.Descriptor(oci.MEDIA_TYPE_OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes))
    new_manifest = oci.Manifest(config=config_desc, layers=[d for d, _, _ in layers] + [boot_desc],
                                annotations={ann.MANIFEST_SOURCE: image.mdesc.digest,
                                             ann.MANIFEST_MARKER: str(FORMAT_VERSION)})
    manifest_bytes = new_manifest.to_bytes()
    manifest_desc = oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, sha256_digest(manifest_bytes), len(manifest_bytes))
    report.manifest_digest = manifest_desc.digest
    report.blobs = len(layers)
    report.output_bytes = sum(d.size for d, _, _ in layers) + boot.size
    report.new_blob_bytes = sum(d.size for d, p, _ in layers if p is not None) + boot.size
    return _Output(layers, boot_desc, config_desc, config_bytes, manifest_desc, manifest_bytes)


def _push_image(src, dst, source: str, image: _SourceImage, out: _Output, boot: _Bootstrap,
                chunk_dict: ChunkDict | None, opts: ConvertOptions, report: ConvertReport, progress: Progress,
                workdir: Path) -> None:
    """Phase 6: blobs first (the data blobs are up already), manifest last, so that a tag never names a
    partial image; with ``--with-oci-fallback`` an index over the original and the remora manifest."""
    progress.phase("push", report.new_blob_bytes)
    for desc, path, pushed in out.layers:
        if path is not None:
            report.uploaded_bytes += pushed
            progress.advance(desc.size)
        else:
            report.mounted_blobs += _ensure_foreign_blob(dst, desc, chunk_dict)
    report.uploaded_bytes += _push(dst, out.boot_desc, boot.path, progress)
    cfg_path = workdir / "config.json"
    cfg_path.write_bytes(out.config_bytes)
    report.uploaded_bytes += _push(dst, out.config_desc, cfg_path, progress)
    if not opts.with_oci_fallback:
        dst.push_manifest(out.manifest_desc, out.manifest_bytes, tag=_dst_tag(dst))
        report.tagged_digest = out.manifest_desc.digest
        return
    mdesc = image.mdesc
    _copy_image(src, dst, source, mdesc, image.mbytes, image.manifest, report)
    platform = oci.Platform.parse(opts.platform) if mdesc.platform is None else mdesc.platform
    orig = oci.Descriptor(mdesc.media_type, mdesc.digest, mdesc.size, dict(mdesc.annotations), platform)
    remora_desc = oci.Descriptor(out.manifest_desc.media_type, out.manifest_desc.digest, out.manifest_desc.size,
                                 {ann.MANIFEST_MARKER: str(FORMAT_VERSION)}, platform)
    dst.push_manifest(out.manifest_desc, out.manifest_bytes, tag=None)
    index_bytes = oci.Index(manifests=[orig, remora_desc]).to_bytes()
    index_desc = oci.Descriptor(oci.MEDIA_TYPE_OCI_INDEX, sha256_digest(index_bytes), len(index_bytes))
    dst.push_manifest(index_desc, index_bytes, tag=_dst_tag(dst))
    report.tagged_digest = index_desc.digest


class _BlobPusher:
    """Upload data blobs on one background thread; :meth:`join` waits and returns
    ``{digest: bytes uploaded}`` (0 when the registry already had the blob) or raises the error the
    upload met. The caller must not use the store from another thread until it joined."""

    def __init__(self, dst, blobs: list[tuple[oci.Descriptor, Path]]):
        import threading

        self._dst, self._blobs = dst, blobs
        self._result: dict[str, int] = {}
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="blob-push", daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            for desc, path in self._blobs:
                if self._dst.blob_exists(desc):
                    self._result[desc.digest] = 0
                else:
                    self._dst.push_blob(desc, path)
                    self._result[desc.digest] = desc.size
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            self._error = exc

    def join(self, raise_error: bool = True) -> dict[str, int]:
        self._t.join()
        if self._error is not None and raise_error:
            raise self._error
        return self._result


def _dst_tag(dst) -> str | None:
    ref = dst.ref
    return None if ref.digest and not ref.tag else (ref.tag or "latest")


def store_location(store) -> tuple[str, str]:
    """``(registry host, repository)`` of a registry store, ``("oci", path)`` of a layout."""
    repo = getattr(store, "repository", None)
    if repo is not None:
        return store.ref.host, repo
    return "oci", str(store.ref.path)


def _push(dst, desc: oci.Descriptor, path: Path, progress: Progress) -> int:
    if dst.blob_exists(desc):
        return 0
    dst.push_blob(desc, path)
    progress.advance(desc.size)
    return desc.size


def _ensure_foreign_blob(dst, desc: oci.Descriptor, chunk_dict: ChunkDict | None) -> int:
    """A blob reused from the chunk dictionary must be reachable from the new manifest's repository."""
    if dst.blob_exists(desc):
        return 1
    if chunk_dict is None:
        raise NotFound(f"blob {desc.digest} is missing in the destination")
    repo = chunk_dict.repository_of(desc.digest)
    if repo and dst.mount_blob(desc, repo):
        return 1
    if chunk_dict.store is not None:
        # different registry or no mount support: copy the blob (verified) through a temp file
        from remora.imagestore import copy_blob

        copy_blob(chunk_dict.store, dst, desc)
        return 1
    raise NotFound(f"chunk dictionary blob {desc.digest} is not in the destination and cannot be mounted"
                   f"{' from ' + repo if repo else ''}; convert with a dictionary built from images in the same "
                   "registry")


def _copy_image(src, dst, source: str, mdesc, mbytes: bytes, manifest, report: ConvertReport) -> None:
    """Make the original image's blobs and manifest available next to the remora one (OCI fallback)."""
    from remora.imagestore import copy_blob

    for desc in [manifest.config, *manifest.layers]:
        how = copy_blob(src, dst, desc, tmpdir=os.environ.get("REMORA_TMPDIR"))
        if how == "mounted":
            report.mounted_blobs += 1
        elif how == "copied":
            report.uploaded_bytes += desc.size
    dst.push_manifest(oci.Descriptor(mdesc.media_type, mdesc.digest, len(mbytes)), mbytes, tag=None)
