"""Open a converted remora image from any store: its manifest, config, bootstrap and data blobs.

Used by ``remora check``, ``remora unpack`` and ``remora dict build`` (the snapshotter has its own
lazy path but fetches the bootstrap with the same
:func:`remora.format.bootstrap_layer.fetch_bootstrap`). Everything fetched is
digest-verified; the bootstrap is extracted from its tar+zstd layer into a work directory (streamed,
bounded), validated (:func:`remora.format.validate.validate_bootstrap`) and only then opened.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from remora import oci
from remora.errors import DigestMismatch, InvalidInput, NotFound
from remora.format import annotations as ann
from remora.format.blob import decompress_frame, verify_chunk
from remora.format.bootstrap import Bootstrap, Extent
from remora.format.bootstrap_layer import MAX_BOOTSTRAP_CSIZE as MAX_BOOTSTRAP_SIZE  # noqa: F401 - kept for importers
from remora.format.bootstrap_layer import fetch_bootstrap


@dataclass
class RemoraImage:
    store: object
    manifest_desc: oci.Descriptor
    manifest: oci.Manifest
    config: oci.ImageConfig
    bootstrap_desc: oci.Descriptor
    blob_descs: dict[str, oci.Descriptor]
    bootstrap: Bootstrap
    workdir: Path

    @classmethod
    def open(cls, store, workdir: Path, platform: str = "linux/amd64") -> RemoraImage:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        desc, data = store.resolve()
        top = oci.parse_manifest_or_index(data, desc.media_type)
        if isinstance(top, oci.Index):
            candidates = [m for m in top.manifests if ann.MANIFEST_MARKER in m.annotations]
            if not candidates:
                raise InvalidInput("the index holds no remora manifest (convert the image first)")
            want = oci.Platform.parse(platform)
            desc = next((m for m in candidates if m.platform is None or m.platform.matches(want)), candidates[0])
            data = store.get_manifest(desc)
            top = oci.parse_manifest(data, desc.media_type)
        manifest = top
        if not ann.is_remora_manifest(manifest.to_dict()):
            raise InvalidInput("not a remora image: its layers carry no remora annotations (see 'remora convert')")
        boots = [desc for desc in manifest.layers if desc.annotations.get(ann.ROLE) == "bootstrap"]
        if len(boots) != 1:
            raise InvalidInput(f"a remora manifest needs exactly one bootstrap layer, found {len(boots)}")
        config = oci.ImageConfig.from_bytes(store.read_blob(manifest.config))  # size-limited before reading
        db = fetch_bootstrap(store, boots[0], workdir)
        blobs = {desc.digest: desc for desc in manifest.layers if desc.annotations.get(ann.ROLE) == "blob"}
        bootstrap = Bootstrap(db)
        missing = [d for d in bootstrap.blobs if d not in blobs]
        if missing:
            raise InvalidInput(f"bootstrap references blobs missing from the manifest: {', '.join(missing[:3])}")
        return cls(store, desc, manifest, config, boots[0], blobs, bootstrap, workdir)

    def close(self) -> None:
        self.bootstrap.close()


class LocalBlobs:
    """Data blobs downloaded whole into a directory (verified), read frame by frame.

    For check and unpack, which touch every chunk: one sequential download per blob beats many
    range requests.
    """

    def __init__(self, image: RemoraImage, directory: Path):
        self.image = image
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}
        self._frame_cache: tuple[tuple[str, int], bytes] | None = None

    def path(self, digest: str) -> Path:
        p = self._files.get(digest)
        if p is None:
            desc = self.image.blob_descs.get(digest)
            if desc is None:
                raise NotFound(f"blob {digest} is not a layer of the image")
            p = self.dir / digest.replace(":", "-")
            h = hashlib.sha256()
            stream = self.image.store.open_blob(desc)
            try:
                with open(p, "wb") as w:
                    while block := stream.read(1 << 20):
                        h.update(block)
                        w.write(block)
            finally:
                stream.close()
            actual = "sha256:" + h.hexdigest()
            if actual != digest:
                p.unlink(missing_ok=True)
                raise DigestMismatch(f"data blob {digest}", digest, actual)
            self._files[digest] = p
        return p

    def frame(self, blob: str, offset: int, csize: int, usize: int) -> bytes:
        key = (blob, offset)
        if self._frame_cache and self._frame_cache[0] == key:
            return self._frame_cache[1]
        with open(self.path(blob), "rb") as f:
            f.seek(offset)
            raw = f.read(csize)
        if len(raw) != csize:
            raise InvalidInput(f"blob {blob}: frame at {offset} runs past the end of the blob")
        data = decompress_frame(raw, usize, f"blob {blob} frame at {offset}")
        self._frame_cache = (key, data)
        return data

    def chunk(self, ext: Extent) -> bytes:
        data = self.frame(ext.blob, ext.frame.offset, ext.frame.csize, ext.frame.usize)
        piece = data[ext.chunk.frame_offset: ext.chunk.frame_offset + ext.chunk.size]
        return verify_chunk(piece, ext.chunk.digest, f"chunk {ext.chunk_id} in blob {ext.blob}")
