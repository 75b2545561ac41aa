"""OCI / Docker image data model: media types, descriptors, manifests, indexes, configs.

Everything that crosses a registry or layout boundary is parsed here with strict validation, so the
rest of remora can trust the objects it gets: a manifest that is not JSON, lacks required fields,
names an unknown media type or is larger than registries accept is rejected up front with a clear
:class:`~remora.errors.InvalidInput` / :class:`~remora.errors.UnsupportedMediaType`, instead of
failing later with a ``KeyError`` deep in the converter.

The dataclasses keep unknown fields out of the way but preserve what matters for round trips
(annotations, urls, platform). Bytes that were fetched are never re-serialised for digesting: the
digest of a manifest is always the digest of the exact bytes received or written.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from remora.digest import validate_digest
from remora.errors import InvalidInput, NotFound, UnsupportedMediaType, UsageError

# --- media types -------------------------------------------------------------------------------

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
MEDIA_TYPE_OCI_EMPTY = "application/vnd.oci.empty.v1+json"

MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Not in the schema2 spec but emitted by some tools (buildkit with uncompressed/zstd layers).
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

MANIFEST_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST})
CONFIG_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_DOCKER_CONFIG})
#: What we ask registries for, most preferred first (the Accept header of a manifest GET).
MANIFEST_ACCEPT = (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
                   MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_DOCKER_MANIFEST)

_LAYER_COMPRESSION = {
    MEDIA_TYPE_OCI_LAYER: "none",
    MEDIA_TYPE_OCI_LAYER_GZIP: "gzip",
    MEDIA_TYPE_OCI_LAYER_ZSTD: "zstd",
    MEDIA_TYPE_OCI_LAYER_NONDIST: "none",
    MEDIA_TYPE_OCI_LAYER_NONDIST_GZIP: "gzip",
    MEDIA_TYPE_OCI_LAYER_NONDIST_ZSTD: "zstd",
    MEDIA_TYPE_DOCKER_LAYER: "none",
    MEDIA_TYPE_DOCKER_LAYER_GZIP: "gzip",
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP: "gzip",
    MEDIA_TYPE_DOCKER_LAYER_ZSTD: "zstd",
}
LAYER_MEDIA_TYPES = frozenset(_LAYER_COMPRESSION)
OCI_LAYER_MEDIA_TYPE_FOR = {"gzip": MEDIA_TYPE_OCI_LAYER_GZIP, "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
                            "none": MEDIA_TYPE_OCI_LAYER}

# --- annotations -------------------------------------------------------------------------------

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_BASE_NAME = "org.opencontainers.image.base.name"
ANNOTATION_BASE_DIGEST = "org.opencontainers.image.base.digest"
#: containerd passes layer annotations under this prefix to snapshotters as labels.
ANNOTATION_SNAPSHOT_PREFIX = "containerd.io/snapshot/"
#: containerd's annotation carrying the uncompressed digest of a layer.
ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"

#: distribution's limit on manifest bodies (registry/handlers: maxManifestBodySize = 4 MiB).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

OCI_LAYOUT_VERSION = "1.0.0"


def layer_compression(media_type: str) -> str:
    """Return ``"gzip"``, ``"zstd"`` or ``"none"`` for a layer media type.

    Raises :class:`UnsupportedMediaType` for anything that is not a known layer type, so a converter
    never silently treats e.g. an encrypted layer as a plain tar.
    """
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedMediaType(f"unsupported layer media type {media_type!r}") from None


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no insignificant whitespace, UTF-8.

    Same input always gives the same bytes, hence the same digest: this is what makes converted
    and built images reproducible.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _require(d: dict, key: str, typ: type | tuple, what: str) -> Any:
    if key not in d:
        raise InvalidInput(f"{what}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise InvalidInput(f"{what}: field {key!r} has wrong type {type(value).__name__}")
    return value


def _opt_str_map(d: dict, key: str, what: str) -> dict[str, str]:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidInput(f"{what}: {key!r} must be a map of strings")
    return dict(value)


@dataclass(frozen=True)
class Platform:
    """An image platform (``os``/``architecture``/``variant``), as in an index entry or a config."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, s: str) -> Platform:
        """Parse ``os/arch[/variant]`` (e.g. ``linux/arm64/v8``)."""
        parts = s.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"bad platform {s!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        if self.os_version:
            d["os.version"] = self.os_version
        if self.os_features:
            d["os.features"] = list(self.os_features)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Platform:
        if not isinstance(d, dict):
            raise InvalidInput("platform must be an object")
        return cls(os=_require(d, "os", str, "platform"),
                   architecture=_require(d, "architecture", str, "platform"),
                   variant=d.get("variant") or None, os_version=d.get("os.version") or None,
                   os_features=tuple(d.get("os.features") or ()))

    def matches(self, other: Platform) -> bool:
        """True if ``other`` satisfies this platform; a missing variant here matches any variant."""
        if self.os != other.os or self.architecture != other.architecture:
            return False
        return self.variant is None or self.variant == (other.variant or _default_variant(other.architecture))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _default_variant(arch: str) -> str | None:
    return {"arm64": "v8"}.get(arch)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and size, plus optional metadata."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    artifact_type: str | None = None

    def __post_init__(self):
        validate_digest(self.digest)
        if not isinstance(self.size, int) or self.size < 0:
            raise InvalidInput(f"descriptor {self.digest}: bad size {self.size!r}")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform.to_dict()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d

    @classmethod
    def from_dict(cls, d: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(d, dict):
            raise InvalidInput(f"{what} must be an object")
        size = _require(d, "size", int, what)
        if size < 0:
            raise InvalidInput(f"{what}: negative size {size}")
        urls = d.get("urls") or ()
        if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) for u in urls):
            raise InvalidInput(f"{what}: 'urls' must be a list of strings")
        return cls(media_type=_require(d, "mediaType", str, what),
                   digest=validate_digest(_require(d, "digest", str, what)),
                   size=size,
                   annotations=_opt_str_map(d, "annotations", what),
                   platform=Platform.from_dict(d["platform"]) if d.get("platform") is not None else None,
                   urls=tuple(urls), artifact_type=d.get("artifactType"))

    def with_annotations(self, **extra: str) -> Descriptor:
        """A copy with ``extra`` merged into the annotations (keyword names are used verbatim)."""
        return Descriptor(self.media_type, self.digest, self.size, {**self.annotations, **extra},
                          self.platform, self.urls, self.artifact_type)


@dataclass
class Manifest:
    """An image manifest (OCI or Docker schema2; ``media_type`` says which)."""

    config: Descriptor
    layers: list[Descriptor]
    media_type: str = MEDIA_TYPE_OCI_MANIFEST
    annotations: dict[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type,
                             "config": self.config.to_dict(), "layers": [layer.to_dict() for layer in self.layers]}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.subject is not None:
            d["subject"] = self.subject.to_dict()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d

    def to_bytes(self) -> bytes:
        """Canonical bytes of this manifest (what you push and digest)."""
        return canonical_json(self.to_dict())


@dataclass
class Index:
    """An image index / Docker manifest list."""

    manifests: list[Descriptor]
    media_type: str = MEDIA_TYPE_OCI_INDEX
    annotations: dict[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type,
                             "manifests": [m.to_dict() for m in self.manifests]}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.subject is not None:
            d["subject"] = self.subject.to_dict()
        return d

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())


#: deepest JSON nesting accepted in a manifest, index or config (real ones nest fewer than 10 levels);
#: deeper input is InvalidInput instead of a RecursionError in the parser or in a later re-encode
MAX_JSON_DEPTH = 100
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def read_limited(stream, limit: int, what: str) -> bytes:
    """Read a small object (manifest, index, config) from ``stream`` with the size limit applied
    while reading: at most ``limit + 1`` bytes are ever read, so a 600 MiB "config" costs no more
    memory than a 4 MiB one. The stream is closed."""
    try:
        parts, got = [], 0
        while got <= limit:
            block = stream.read(min(1 << 20, limit + 1 - got))
            if not block:
                break
            parts.append(block)
            got += len(block)
    finally:
        stream.close()
    if got > limit:
        raise InvalidInput(f"{what} is over the {limit}-byte limit")
    return b"".join(parts)


def _json_depth_ok(data: bytes) -> bool:
    """True when ``data`` nests at most MAX_JSON_DEPTH deep. Cheap for normal input: only a body
    with more brackets than the limit is scanned token by token (strings skipped)."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return True
    depth = 0
    for m in _JSON_TOKENS.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif c in (b"]", b"}"):
            depth -= 1
    return True


def load_json(data: bytes, what: str, limit: int = MAX_MANIFEST_SIZE) -> Any:
    """``json.loads`` for untrusted bytes: size and nesting bounded, every failure InvalidInput."""
    if len(data) > limit:
        raise InvalidInput(f"{what} is {len(data)} bytes, larger than the {limit}-byte limit")
    if not _json_depth_ok(data):
        raise InvalidInput(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidInput(f"{what} nests JSON too deeply") from None


def _load_json(data: bytes, what: str) -> dict:
    obj = load_json(data, what)
    if not isinstance(obj, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return obj


def parse_manifest_or_index(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse manifest/index bytes, validating structure and media type.

    ``media_type`` is the transport's claim (Content-Type, descriptor); when absent the body's
    ``mediaType`` is used, and bodies without one are classified by shape (``manifests`` vs
    ``config``+``layers``) as the OCI spec allows. A body whose own ``mediaType`` contradicts the
    transport's is rejected: that is how confused-deputy attacks on multi-arch images start.
    """
    obj = _load_json(data, "manifest")
    if obj.get("schemaVersion") != 2:
        if obj.get("schemaVersion") == 1:
            raise UnsupportedMediaType("Docker schema 1 manifests are not supported (re-push the image)")
        raise InvalidInput(f"manifest: schemaVersion must be 2, got {obj.get('schemaVersion')!r}")
    body_mt = obj.get("mediaType")
    if body_mt is not None and not isinstance(body_mt, str):
        raise InvalidInput("manifest: 'mediaType' must be a string")
    if media_type and body_mt and media_type != body_mt:
        raise InvalidInput(f"manifest: media type {media_type!r} does not match the body's {body_mt!r}")
    mt = media_type or body_mt
    if mt is None:
        mt = MEDIA_TYPE_OCI_INDEX if "manifests" in obj else MEDIA_TYPE_OCI_MANIFEST
    if mt in INDEX_MEDIA_TYPES:
        return _parse_index(obj, mt)
    if mt in MANIFEST_MEDIA_TYPES:
        return _parse_manifest(obj, mt)
    raise UnsupportedMediaType(f"unsupported manifest media type {mt!r}")


def _parse_manifest(obj: dict, mt: str) -> Manifest:
    config = Descriptor.from_dict(_require(obj, "config", dict, "manifest"), "manifest config")
    layers_raw = _require(obj, "layers", list, "manifest")
    layers = [Descriptor.from_dict(raw, f"manifest layer {i}") for i, raw in enumerate(layers_raw)]
    subject = Descriptor.from_dict(obj["subject"], "manifest subject") if obj.get("subject") else None
    return Manifest(config=config, layers=layers, media_type=mt,
                    annotations=_opt_str_map(obj, "annotations", "manifest"), subject=subject,
                    artifact_type=obj.get("artifactType"))


def _parse_index(obj: dict, mt: str) -> Index:
    raw = _require(obj, "manifests", list, "index")
    manifests = [Descriptor.from_dict(m, f"index entry {i}") for i, m in enumerate(raw)]
    subject = Descriptor.from_dict(obj["subject"], "index subject") if obj.get("subject") else None
    return Index(manifests=manifests, media_type=mt, annotations=_opt_str_map(obj, "annotations", "index"),
                 subject=subject)


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest:
    """Like :func:`parse_manifest_or_index` but insists on an image manifest."""
    m = parse_manifest_or_index(data, media_type)
    if not isinstance(m, Manifest):
        raise InvalidInput(f"expected an image manifest, got an index ({m.media_type})")
    return m


def parse_index(data: bytes, media_type: str | None = None) -> Index:
    """Like :func:`parse_manifest_or_index` but insists on an index."""
    m = parse_manifest_or_index(data, media_type)
    if not isinstance(m, Index):
        raise InvalidInput(f"expected an image index, got a manifest ({m.media_type})")
    return m


def select_platform(index: Index, platform: str | Platform) -> Descriptor:
    """Pick the manifest for ``platform`` (e.g. ``"linux/amd64"``) from an index.

    Attestation manifests (``unknown/unknown`` platform, as buildkit emits) never match a real
    platform. Raises :class:`NotFound` listing the available platforms.
    """
    want = Platform.parse(platform) if isinstance(platform, str) else platform
    for desc in index.manifests:
        if desc.platform is not None and desc.media_type in MANIFEST_MEDIA_TYPES and want.matches(desc.platform):
            return desc
    have = ", ".join(str(d.platform) for d in index.manifests if d.platform) or "none"
    raise NotFound(f"no manifest for platform {want} in index (available: {have})")


@dataclass
class ImageConfig:
    """An image configuration blob. ``raw`` keeps every field so rewrites lose nothing."""

    raw: dict

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageConfig:
        obj = _load_json(data, "image config")
        rootfs = obj.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise InvalidInput("image config: missing rootfs.diff_ids")
        for d in rootfs["diff_ids"]:
            if not isinstance(d, str):
                raise InvalidInput("image config: rootfs.diff_ids must be strings")
            validate_digest(d)
        for key, typ in (("config", dict), ("history", list), ("os", str), ("architecture", str), ("variant", str)):
            if obj.get(key) is not None and not isinstance(obj[key], typ):
                raise InvalidInput(f"image config: {key!r} must be a{'n' if typ is list else ''} "
                                   f"{ {dict: 'object', list: 'array', str: 'string'}[typ]}")
        if not all(isinstance(h, dict) for h in obj.get("history") or ()):
            raise InvalidInput("image config: 'history' entries must be objects")
        return cls(obj)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.raw["rootfs"]["diff_ids"])

    @diff_ids.setter
    def diff_ids(self, value: Iterable[str]) -> None:
        self.raw.setdefault("rootfs", {"type": "layers"})["diff_ids"] = list(value)
        self.raw["rootfs"]["type"] = "layers"

    @property
    def history(self) -> list[dict]:
        return list(self.raw.get("history") or [])

    @property
    def config(self) -> dict:
        """The runtime config (``Env``, ``Cmd``, ``Entrypoint``...); empty if absent."""
        return dict(self.raw.get("config") or {})

    @property
    def platform(self) -> Platform:
        return Platform(os=self.raw.get("os", "linux"), architecture=self.raw.get("architecture", "amd64"),
                        variant=self.raw.get("variant"))

    def to_bytes(self) -> bytes:
        return canonical_json(self.raw)
