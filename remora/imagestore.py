"""One interface over where images live: a registry repository or an OCI layout directory.

The converter, ``remora demo`` and the tests talk to :class:`ImageStore` only, so every source can be
every destination (registry -> layout, layout -> registry, ...). Both implementations give the same
guarantees: manifests and blobs are verified against their digests on the way in and out, a missing
thing is :class:`NotFound`, and bytes are never re-serialised (a manifest's digest is the digest of
the exact bytes fetched or pushed).

    store = open_store("localhost:5000/app:v1")        # or "oci:/tmp/layout:v1"
    desc, data = store.resolve()
    manifest = parse_manifest(data, desc.media_type)
    with store.open_blob(manifest.layers[0]) as f: ...
"""
from __future__ import annotations

import io
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, cast

from remora.digest import VerifyingReader, sha256_digest, validate_digest, verify_bytes
from remora.errors import DigestMismatch, InvalidInput, NotFound, UsageError
from remora.layout import OCILayout
from remora.oci import (
    INDEX_MEDIA_TYPES,
    MANIFEST_ACCEPT,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    Descriptor,
    parse_manifest_or_index,
)
from remora.reference import ImageRef, LayoutRef, parse_reference

#: Configs are small JSON documents; refuse to buffer anything absurd in memory.
MAX_CONFIG_SIZE = 16 * 1024 * 1024
_MANIFEST_OR_INDEX = MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES


class ImageStore(ABC):
    """A place images can be read from and written to. See the module docstring."""

    ref: ImageRef | LayoutRef

    @abstractmethod
    def resolve(self) -> tuple[Descriptor, bytes]:
        """The manifest or index the reference names: its descriptor and exact bytes (verified)."""

    @abstractmethod
    def get_manifest(self, desc_or_digest: Descriptor | str) -> bytes:
        """A manifest/index by digest (e.g. a platform's manifest from an index), verified."""

    @abstractmethod
    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """A stream of the blob; raises DigestMismatch/InvalidInput at EOF if the bytes are bad."""

    @abstractmethod
    def blob_exists(self, desc: Descriptor) -> bool:
        """Whether the destination already has this blob (so pushing it can be skipped)."""

    @abstractmethod
    def push_blob(self, desc: Descriptor, path: str | Path) -> None:
        """Upload a blob from a file (streamed); the file must match ``desc``."""

    @abstractmethod
    def mount_blob(self, desc: Descriptor, from_repository: str) -> bool:
        """Make a blob available without uploading it; True on success, False if not possible."""

    @abstractmethod
    def push_manifest(self, desc: Descriptor, data: bytes, tag: str | None = None) -> None:
        """Store a manifest/index (its blobs must be present) and point ``tag`` at it if given."""

    def read_blob(self, desc: Descriptor, max_size: int = MAX_CONFIG_SIZE) -> bytes:
        """Small blob (config) in memory, verified."""
        if desc.size > max_size:
            raise InvalidInput(f"blob {desc.digest} is {desc.size} bytes, over the {max_size}-byte limit")
        with self.open_blob(desc) as f:
            return f.read()

    def push_bytes(self, data: bytes, media_type: str) -> Descriptor:
        """Store a small blob (config) from memory, returning its descriptor."""
        desc = Descriptor(media_type, sha256_digest(data), len(data))
        if not self.blob_exists(desc):
            with tempfile.NamedTemporaryFile(prefix="remora-blob-") as f:
                f.write(data)
                f.flush()
                self.push_blob(desc, f.name)
        return desc

    def close(self) -> None:  # noqa: B027 - optional: a store without connections has nothing to release
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return str(self.ref)


def _digest_of(desc_or_digest: Descriptor | str) -> tuple[str, int | None]:
    if isinstance(desc_or_digest, Descriptor):
        return desc_or_digest.digest, desc_or_digest.size
    return validate_digest(desc_or_digest), None


def _check_manifest_desc(desc: Descriptor, data: bytes, what: str) -> None:
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidInput(f"{what}: manifest is {len(data)} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")
    verify_bytes(data, desc.digest, what)
    if desc.size != len(data):
        raise InvalidInput(f"{what}: descriptor says {desc.size} bytes, data has {len(data)}")


class LayoutStore(ImageStore):
    """An image in an OCI layout directory; created on first write if missing."""

    ref: LayoutRef

    def __init__(self, ref: LayoutRef):
        self.ref = ref
        self._layout: OCILayout | None = None

    @property
    def layout(self) -> OCILayout:
        """The layout, opened (for reads) or created (the first time something is written)."""
        if self._layout is None:
            self._layout = OCILayout.open(self.ref.path)
        return self._layout

    def _writable(self) -> OCILayout:
        if self._layout is None:
            self._layout = OCILayout.init(self.ref.path)
        return self._layout

    def resolve(self) -> tuple[Descriptor, bytes]:
        desc = self.layout.resolve(tag=self.ref.tag, digest=self.ref.digest)
        return desc, self.get_manifest(desc)

    def get_manifest(self, desc_or_digest: Descriptor | str) -> bytes:
        digest, size = _digest_of(desc_or_digest)
        return self.layout.read_blob(digest, size, max_size=MAX_MANIFEST_SIZE)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return cast(BinaryIO, self.layout.open_blob(desc.digest, desc.size))  # a file-like reader

    def blob_exists(self, desc: Descriptor) -> bool:
        try:
            return self.layout.has_blob(desc.digest, desc.size)
        except NotFound:
            return False

    def push_blob(self, desc: Descriptor, path: str | Path) -> None:
        self._writable().write_blob_file(path, desc.digest, desc.size)

    def push_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest, size = self._writable().write_blob_bytes(data)
        return Descriptor(media_type, digest, size)

    def mount_blob(self, desc: Descriptor, from_repository: str) -> bool:
        """``from_repository`` is another layout directory (``oci:`` prefix optional)."""
        target = self._writable()
        if target.has_blob(desc.digest, desc.size):
            return True
        src_path = from_repository[4:] if from_repository.startswith("oci:") else from_repository
        try:
            src = OCILayout.open(cast(LayoutRef, parse_reference("oci:" + src_path)).path)  # "oci:": a layout
        except (NotFound, UsageError):
            return False
        return target.copy_blob_from(src, desc.digest, desc.size)

    def push_manifest(self, desc: Descriptor, data: bytes, tag: str | None = None) -> None:
        _check_manifest_desc(desc, data, f"manifest for {self.ref}")
        parse_manifest_or_index(data, desc.media_type)
        layout = self._writable()
        layout.write_blob_bytes(data, desc.digest)
        layout.add_manifest(Descriptor(desc.media_type, desc.digest, desc.size, platform=desc.platform,
                                       artifact_type=desc.artifact_type), tag)


class RegistryStore(ImageStore):
    """A repository in a registry, through :class:`remora.registry.client.RegistryClient`."""

    ref: ImageRef

    def __init__(self, ref: ImageRef, client):
        self.ref = ref
        self.client = client
        self.repository = ref.repository

    def resolve(self) -> tuple[Descriptor, bytes]:
        data, media_type, digest = self.client.get_manifest(self.repository, self.ref.reference,
                                                            accept=list(MANIFEST_ACCEPT))
        actual = sha256_digest(data)
        if self.ref.digest and actual != self.ref.digest:
            raise DigestMismatch(f"manifest {self.ref}", self.ref.digest, actual)
        if digest and digest.startswith("sha256:") and digest != actual:
            raise DigestMismatch(f"manifest {self.ref} (registry's Docker-Content-Digest)", digest, actual)
        if len(data) > MAX_MANIFEST_SIZE:
            raise InvalidInput(f"manifest {self.ref} is {len(data)} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")
        # Registries that answer application/json leave the body to say what it is.
        parsed = parse_manifest_or_index(data, media_type if media_type in _MANIFEST_OR_INDEX else None)
        return Descriptor(parsed.media_type, actual, len(data)), data

    def get_manifest(self, desc_or_digest: Descriptor | str) -> bytes:
        digest, size = _digest_of(desc_or_digest)
        media = [desc_or_digest.media_type] if isinstance(desc_or_digest, Descriptor) else []
        data, _, _ = self.client.get_manifest(self.repository, digest,
                                              accept=media + [m for m in MANIFEST_ACCEPT if m not in media])
        if len(data) > MAX_MANIFEST_SIZE:
            raise InvalidInput(f"manifest {digest} is {len(data)} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")
        verify_bytes(data, digest, f"manifest {self.ref.name}@{digest}")
        if size is not None and size != len(data):
            raise InvalidInput(f"manifest {digest}: descriptor says {size} bytes, registry sent {len(data)}")
        return data

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        stream = self.client.open_blob(self.repository, desc.digest)
        return io.BufferedReader(VerifyingReader(stream, desc.digest, desc.size,
                                                 what=f"blob {desc.digest} from {self.ref.name}"), 1 << 20)

    def blob_exists(self, desc: Descriptor) -> bool:
        size = self.client.head_blob(self.repository, desc.digest)
        if size is None:
            return False
        if size != desc.size:
            raise InvalidInput(f"registry {self.ref.registry} reports blob {desc.digest} as {size} bytes, "
                               f"the descriptor says {desc.size}")
        return True

    def push_blob(self, desc: Descriptor, path: str | Path) -> None:
        # The registry verifies the digest of what it receives (and the client checks the size and
        # the digest the registry reports), so the file is not hashed a second time here.
        self.client.push_blob(self.repository, desc.digest, desc.size, str(path))

    def mount_blob(self, desc: Descriptor, from_repository: str) -> bool:
        """``from_repository`` is a repository of the same registry (``app/base``, or with the
        registry prefix, ``localhost:5000/app/base``); a different registry cannot mount: False."""
        repo = from_repository
        if "/" in repo:
            first, _, rest = repo.partition("/")
            if "." in first or ":" in first or first == "localhost":
                if first != self.ref.registry:
                    return False
                repo = rest
        if repo == self.repository:
            return self.blob_exists(desc)
        return bool(self.client.mount_blob(self.repository, desc.digest, repo))

    def push_manifest(self, desc: Descriptor, data: bytes, tag: str | None = None) -> None:
        _check_manifest_desc(desc, data, f"manifest for {self.ref.name}")
        parse_manifest_or_index(data, desc.media_type)
        digest = self.client.push_manifest(self.repository, tag or desc.digest, data, desc.media_type)
        if digest and digest != desc.digest:
            raise DigestMismatch(f"manifest pushed to {self.ref.name}", desc.digest, digest)

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


def open_store(ref: str | ImageRef | LayoutRef, *, plain_http: bool | None = None, credentials=None,
               insecure: bool = False, timeout: float = 30.0) -> ImageStore:
    """Open the store for a reference string (``oci:DIR[:TAG]`` or a registry reference).

    ``plain_http=None`` lets the client decide (plain HTTP for loopback registries only).
    ``insecure`` is accepted for symmetry with CLI flags and means plain HTTP is allowed even
    for non-loopback hosts. ``credentials`` is passed through to the registry client.
    """
    parsed = parse_reference(ref) if isinstance(ref, str) else ref
    if isinstance(parsed, LayoutRef):
        return LayoutStore(parsed)
    from remora.registry.client import RegistryClient
    if plain_http is None and insecure:
        plain_http = True
    client = RegistryClient(parsed.host, plain_http=plain_http, credentials=credentials, timeout=timeout)
    return RegistryStore(parsed, client)


def copy_blob(src: ImageStore, dst: ImageStore, desc: Descriptor, tmpdir: str | Path | None = None) -> str:
    """Make ``desc`` available in ``dst``, as cheaply as possible; returns how.

    ``"exists"`` when ``dst`` already has it, ``"mounted"`` for a cross-repository mount (same
    registry) or a layout-to-layout link, else ``"copied"``: streamed through a verified temp file
    (never buffered in memory), so a corrupt source fails before anything reaches ``dst``.
    """
    if dst.blob_exists(desc):
        return "exists"
    if isinstance(src, RegistryStore) and isinstance(dst, RegistryStore) and src.ref.registry == dst.ref.registry:
        if dst.mount_blob(desc, src.repository):
            return "mounted"
    if isinstance(src, LayoutStore) and isinstance(dst, LayoutStore) and dst.mount_blob(desc, src.ref.path):
        return "mounted"
    with tempfile.NamedTemporaryFile(prefix="remora-blob-", dir=tmpdir) as tmp:
        with src.open_blob(desc) as f:
            while chunk := f.read(1 << 20):
                tmp.write(chunk)
        tmp.flush()
        dst.push_blob(desc, tmp.name)
    return "copied"
