"""OCI image layout directories (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``).

A layout is both a source (read an image by tag or digest) and a destination (write blobs and
manifests, tag them). Writes are crash-safe: a blob goes to a temp file under ``blobs/.tmp``, is
hashed while written, fsynced, and renamed into place only if its digest matches; ``index.json`` is
replaced by rename under an exclusive ``flock`` on the layout directory, so concurrent writers in
different processes never lose each other's tags. Reads are verified against the digest.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast

from remora.digest import CHUNK, VerifyingReader, new_hasher, sha256_digest, split_digest, validate_digest
from remora.errors import DigestMismatch, InvalidInput, NotFound, StorageError, UsageError
from remora.oci import (
    ANNOTATION_REF_NAME,
    INDEX_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_OCI_INDEX,
    OCI_LAYOUT_VERSION,
    Descriptor,
    Index,
    canonical_json,
    parse_index,
    parse_manifest_or_index,
    read_limited,
)

_TMP_DIR = ".tmp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (+ directory fsync)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextmanager
def _suppress_oserror():
    try:
        yield
    except OSError:
        pass


@contextmanager
def _storage_errors(what: str):
    """Turn OS-level failures (ENOSPC, EACCES, EIO) into StorageError with context."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"{what}: {e.strerror or e}") from e


class OCILayout:
    """An OCI image layout at ``path``. Use :meth:`open` for an existing one, :meth:`init` to create."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- creation / opening ----------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | Path) -> OCILayout:
        """Create the layout (directory, ``oci-layout``, empty ``index.json``) unless it exists.

        Safe against concurrent initialisation of the same directory (serialised by ``flock``).
        """
        layout = cls(path)
        with _storage_errors(f"creating OCI layout {layout.path}"):
            layout.path.mkdir(parents=True, exist_ok=True)
            with layout._locked():
                marker = layout.path / "oci-layout"
                if marker.exists():
                    return cls.open(path)
                if any(layout.path.iterdir()):
                    raise UsageError(f"{layout.path} exists, is not empty and is not an OCI layout")
                (layout.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
                atomic_write(layout.path / "index.json", canonical_json(Index([]).to_dict()))
                atomic_write(marker, canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
        return layout

    @classmethod
    def open(cls, path: str | Path) -> OCILayout:
        """Open an existing layout, checking its ``oci-layout`` marker."""
        layout = cls(path)
        marker = layout.path / "oci-layout"
        try:
            meta = json.loads(marker.read_bytes())
        except FileNotFoundError:
            raise NotFound(f"{layout.path} is not an OCI image layout (no oci-layout file)") from None
        except ValueError as e:
            raise InvalidInput(f"{marker}: not valid JSON: {e}") from None
        version = meta.get("imageLayoutVersion") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise InvalidInput(f"{marker}: unsupported imageLayoutVersion {version!r}")
        return layout

    # --- blobs -----------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = split_digest(digest)
        return self.path / "blobs" / algo / hexpart

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """True if the blob file exists (with ``size`` bytes, when given). Content is checked on read."""
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def open_blob(self, digest: str, size: int | None = None) -> VerifyingReader:
        """A stream of the blob that raises DigestMismatch/InvalidInput at EOF if the file is bad."""
        try:
            f = open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in OCI layout {self.path}") from None
        return VerifyingReader(f, digest, size, what=f"blob {digest} in {self.path}")

    def read_blob(self, digest: str, size: int | None = None, max_size: int | None = None) -> bytes:
        """Whole blob in memory, verified. ``max_size`` guards against huge 'manifests'."""
        path = self.blob_path(digest)
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in OCI layout {self.path}") from None
        if max_size is not None and actual > max_size:
            raise InvalidInput(f"blob {digest} in {self.path} is {actual} bytes, over the {max_size}-byte limit")
        if max_size is None:
            with self.open_blob(digest, size) as r:
                return r.read()
        # the limit applies while reading too: the file may grow after the stat
        return read_limited(self.open_blob(digest, size), max_size, f"blob {digest} in {self.path}")

    def write_blob(self, src: BinaryIO, digest: str | None = None, size: int | None = None) -> tuple[str, int]:
        """Store a blob from a stream; return ``(digest, size)``.

        With ``digest`` given the content is verified while written, and an already present blob is
        not rewritten (``src`` is then left unread). Without it the digest is computed (sha256).
        A bad stream leaves nothing behind.
        """
        if digest is not None:
            validate_digest(digest)
            if self.has_blob(digest, size):
                return digest, self.blob_path(digest).stat().st_size
        tmpdir = self.path / "blobs" / _TMP_DIR
        with _storage_errors(f"writing blob to {self.path}"):
            tmpdir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="blob-", dir=tmpdir)
        try:
            h = new_hasher(digest or "sha256:")
            n = 0
            with os.fdopen(fd, "wb") as f:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    if size is not None and n > size:
                        raise InvalidInput(f"blob {digest}: more data than the declared {size} bytes")
                    with _storage_errors(f"writing blob to {self.path}"):
                        f.write(chunk)
                with _storage_errors(f"writing blob to {self.path}"):
                    f.flush()
                    os.fsync(f.fileno())
            algo = (digest or "sha256:").partition(":")[0]
            actual = f"{algo}:{h.hexdigest()}"
            if size is not None and n != size:
                raise InvalidInput(f"blob {digest or actual}: truncated: got {n} of {size} bytes")
            if digest is not None and actual != digest:
                raise DigestMismatch(f"blob written to {self.path}", digest, actual)
            final = self.blob_path(actual)
            with _storage_errors(f"writing blob to {self.path}"):
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, final)
                _fsync_dir(final.parent)
            return actual, n
        except BaseException:
            with _suppress_oserror():
                os.unlink(tmp)
            raise

    def write_blob_bytes(self, data: bytes, digest: str | None = None) -> tuple[str, int]:
        """Store an in-memory blob (manifest, config); return ``(digest, size)``."""
        return self.write_blob(io.BytesIO(data), digest or sha256_digest(data), len(data))

    def write_blob_file(self, path: str | Path, digest: str | None = None, size: int | None = None) -> tuple[str, int]:
        """Copy a file into the layout as a blob (streamed, verified against ``digest`` if given)."""
        with open(path, "rb") as f:
            return self.write_blob(f, digest, size)

    def blobs(self) -> Iterator[str]:
        """Digests of all stored blobs (for GC and inspection)."""
        root = self.path / "blobs"
        if not root.is_dir():
            return
        for algo_dir in sorted(root.iterdir()):
            if algo_dir.name == _TMP_DIR or not algo_dir.is_dir():
                continue
            for f in sorted(algo_dir.iterdir()):
                yield f"{algo_dir.name}:{f.name}"

    # --- index.json ------------------------------------------------------------------------------

    def read_index(self) -> Index:
        try:
            f = open(self.path / "index.json", "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.path} has no index.json") from None
        data = read_limited(f, MAX_MANIFEST_SIZE, f"{self.path}/index.json")
        # index.json may omit mediaType (allowed by the spec before 1.1); the shape says it is an index.
        return parse_index(data)

    def tags(self) -> dict[str, Descriptor]:
        """``{tag: descriptor}`` of every entry with an ``org.opencontainers.image.ref.name``."""
        return {d.annotations[ANNOTATION_REF_NAME]: d for d in self.read_index().manifests
                if ANNOTATION_REF_NAME in d.annotations}

    def resolve(self, tag: str | None = None, digest: str | None = None) -> Descriptor:
        """Find the top-level descriptor for a tag, a digest, or the layout's only image.

        A digest that is not listed in index.json but stored as a blob still resolves (it may be a
        child manifest of an index); its media type then comes from the blob itself.
        """
        entries = self.read_index().manifests
        if digest is not None:
            for d in entries:
                if d.digest == digest:
                    return d
            if self.has_blob(digest):
                data = self.read_blob(digest, max_size=MAX_MANIFEST_SIZE)
                m = parse_manifest_or_index(data)
                return Descriptor(m.media_type, digest, len(data))
            raise NotFound(f"no manifest {digest} in OCI layout {self.path}")
        if tag is not None:
            for d in entries:
                if d.annotations.get(ANNOTATION_REF_NAME) == tag:
                    return d
            have = ", ".join(sorted(self.tags())) or "none"
            raise NotFound(f"no tag {tag!r} in OCI layout {self.path} (tags: {have})")
        if len(entries) == 1:
            return entries[0]
        if not entries:
            raise NotFound(f"OCI layout {self.path} is empty")
        have = ", ".join(sorted(self.tags())) or "untagged"
        raise UsageError(f"OCI layout {self.path} holds {len(entries)} images ({have}); "
                         f"name one as oci:{self.path}:TAG or oci:{self.path}@DIGEST")

    @contextmanager
    def _locked(self):
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def add_manifest(self, desc: Descriptor, tag: str | None = None) -> Descriptor:
        """Record a manifest/index (whose blob must already be stored) in index.json.

        With ``tag``, any entry carrying that tag is replaced (tags are unique per layout). Without,
        the descriptor is added untagged unless an identical untagged entry exists. Returns the
        descriptor as written.
        """
        if not self.has_blob(desc.digest, desc.size):
            raise NotFound(f"cannot add {desc.digest} to {self.path}/index.json: blob missing or wrong size")
        entry = desc.with_annotations(**{ANNOTATION_REF_NAME: tag}) if tag else desc
        with self._locked():
            index = self.read_index()
            kept = []
            for d in index.manifests:
                if tag and d.annotations.get(ANNOTATION_REF_NAME) == tag:
                    continue
                if d == entry:
                    continue
                kept.append(d)
            kept.append(entry)
            index.manifests = kept
            if index.media_type not in INDEX_MEDIA_TYPES:
                index.media_type = MEDIA_TYPE_OCI_INDEX
            with _storage_errors(f"updating {self.path}/index.json"):
                atomic_write(self.path / "index.json", canonical_json(index.to_dict()))
        return entry

    def copy_blob_from(self, other: OCILayout, digest: str, size: int | None = None) -> bool:
        """Copy a blob from another layout; False if ``other`` lacks it.

        The source is verified first (a corrupt blob raises and is not propagated); then it is
        hard-linked when both layouts share a file system (blobs are immutable), copied otherwise.
        """
        if self.has_blob(digest, size):
            return True
        if not other.has_blob(digest, size):
            return False
        with other.open_blob(digest, size) as r:
            while r.read(CHUNK):
                pass
        src = other.blob_path(digest)
        dst = self.blob_path(digest)
        with _storage_errors(f"copying blob {digest} into {self.path}"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
                _fsync_dir(dst.parent)
                return True
            except FileExistsError:
                return True
            except OSError:
                pass  # EXDEV, EPERM...: fall back to a verified copy
        with other.open_blob(digest, size) as r:
            self.write_blob(cast(BinaryIO, r), digest, size)  # a file-like reader
        return True

    def __repr__(self) -> str:
        return f"OCILayout({str(self.path)!r})"


__all__ = ["OCILayout", "atomic_write"]
