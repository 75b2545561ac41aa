"""Chunk dictionaries: reuse chunks that already live in the registry (dedup across images).

A dictionary is a bootstrap-format SQLite file holding only a chunk table (blobs, frames, chunks) and,
in its meta table, where each blob can be found (``blob_repositories``: digest -> "host/repository").
``remora dict build`` makes one from converted images; ``remora convert --chunk-dict`` accepts such a
file, a converted image's bootstrap, or a converted image reference directly.

A chunk found in the dictionary is not uploaded again: the new manifest lists the existing blob as a
layer (so the registry keeps it and the snapshotter knows where to range-read), mounted across
repositories when needed.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from remora.errors import InvalidInput, UsageError
from remora.format.bootstrap import Bootstrap, write_chunk_table
from remora.format.chunktable import ChunkTable
from remora.format.validate import validate_bootstrap

META_REPOS = "blob_repositories"


@dataclass
class ChunkDict:
    table: ChunkTable
    repos: dict[str, str] = field(default_factory=dict)   # blob digest -> "host/repository"
    store: object | None = None                           # where blobs can be copied from

    def repository_of(self, digest: str) -> str | None:
        """The repository path (without host) a blob can be mounted from."""
        where = self.repos.get(digest)
        if not where or where.startswith("oci:"):
            return where
        return where.split("/", 1)[1] if "/" in where else where


def _image_location(store) -> str | None:
    from remora.converter.convert import store_location

    host, repo = store_location(store)
    return f"{host}/{repo}" if host != "oci" else f"oci:{repo}"


def dict_from_image(ref: str, workdir: Path, plain_http: bool | None = None) -> ChunkDict:
    from remora.converter.image import RemoraImage
    from remora.imagestore import open_store

    store = open_store(ref, plain_http=plain_http)
    image = RemoraImage.open(store, Path(workdir) / "dict")
    try:
        table = image.bootstrap.chunk_table()
    finally:
        image.close()
    where = _image_location(store)
    return ChunkDict(table, {d: where for d, _ in table.blobs} if where else {}, store)


def load_chunk_dict(spec: str, workdir: Path, plain_http: bool | None = None) -> ChunkDict:
    path = Path(spec)
    if path.is_file():
        validate_bootstrap(path, require_tree=False)  # a chunk dictionary or an image's bootstrap
        bs = Bootstrap(path)
        try:
            return ChunkDict(bs.chunk_table(), _repositories(bs.meta.get(META_REPOS, "{}"), path))
        finally:
            bs.close()
    if "/" not in spec and ":" not in spec:
        raise UsageError(f"--chunk-dict {spec!r}: no such file, and not an image reference")
    return dict_from_image(spec, workdir, plain_http)


def _repositories(text: str, path: Path) -> dict[str, str]:
    """The ``blob_repositories`` meta value: a flat JSON object of strings, anything else is InvalidInput."""
    try:
        repos = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidInput(f"{path}: {META_REPOS} is not valid JSON") from None
    if not isinstance(repos, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in repos.items()):
        raise InvalidInput(f"{path}: {META_REPOS} must map blob digests to repository names")
    return repos


def build_dict(images: list[str], out: Path, plain_http: bool | None = None, progress=None) -> dict:
    """Merge the chunk tables of converted images into one dictionary file; returns statistics.

    ``progress`` (a :class:`remora.converter.progress.Progress`) gets one row per image: its bootstrap
    fetched and validated, then its chunks merged (counted in the bytes they stand for)."""
    merged, repos = ChunkTable(), {}
    with tempfile.TemporaryDirectory(prefix="remora-dict-") as tmp:
        for i, ref in enumerate(images):
            if progress is not None:
                progress.phase(f"image {i + 1}/{len(images)}: bootstrap")
            d = load_chunk_dict(ref, Path(tmp) / str(i), plain_http)
            if progress is not None:
                progress.phase(f"image {i + 1}/{len(images)}: chunks", sum(c.size for c in d.table.chunks))
            for cid in range(len(d.table.chunks)):
                if d.table.chunks[cid].digest not in merged.by_digest:
                    merged.import_chunk(d.table, cid)
                if progress is not None:
                    progress.advance(d.table.chunks[cid].size)
            for digest, where in d.repos.items():
                repos.setdefault(digest, where)
    write_chunk_table(Path(out), merged, meta={META_REPOS: json.dumps(repos, sort_keys=True)})
    return {"images": len(images), "chunks": len(merged.chunks), "blobs": len(merged.blobs),
            "bytes": sum(c.size for c in merged.chunks)}
