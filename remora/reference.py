"""Image references: registry references with Docker's normalisation, and OCI layout references.

Accepted forms::

    busybox                         -> docker.io/library/busybox:latest
    user/app:1.2                    -> docker.io/user/app:1.2
    localhost:5000/app@sha256:...   -> registry localhost:5000, digest only
    ghcr.io/o/app:v1@sha256:...     -> tag and digest (the digest wins when fetching)
    oci:/path/to/layout             -> the layout's only image
    oci:/path/to/layout:v1          -> tag v1 (org.opencontainers.image.ref.name)
    oci:/path/to/layout@sha256:...  -> a manifest/index by digest

The grammar follows distribution/reference: a first path component is a registry host when it
contains ``.`` or ``:`` or is ``localhost``; repository components are lower-case.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from remora.errors import UsageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
LAYOUT_PREFIX = "oci:"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$")
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")

_EXAMPLES = "e.g. busybox, docker.io/library/debian:12, localhost:5000/app@sha256:<hex>, oci:/path/layout:tag"


@dataclass(frozen=True)
class ImageRef:
    """A registry reference. ``tag`` is ``"latest"`` only when neither tag nor digest was given."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What to put in ``/v2/<repo>/manifests/<reference>``: the digest if known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def host(self) -> str:
        """The host:port to connect to (Docker Hub's API lives at registry-1.docker.io)."""
        return "registry-1.docker.io" if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def hostname(self) -> str:
        """The registry host without port (and without IPv6 brackets)."""
        h = self.registry
        if h.startswith("["):
            return h[1:h.index("]")]
        return h.rsplit(":", 1)[0] if ":" in h else h

    @property
    def is_loopback(self) -> bool:
        """True for localhost, 127.0.0.0/8 and ::1: where plain HTTP is the sensible default."""
        h = self.hostname
        if h == "localhost" or h.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(h).is_loopback
        except ValueError:
            return False

    def with_tag(self, tag: str) -> ImageRef:
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"bad tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> ImageRef:
        if not _DIGEST_RE.fullmatch(digest):
            raise UsageError(f"bad digest {digest!r}")
        return replace(self, digest=digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


@dataclass(frozen=True)
class LayoutRef:
    """An OCI image layout directory, optionally narrowed to a tag or a digest."""

    path: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        s = LAYOUT_PREFIX + self.path
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def _split_digest(s: str, whole: str) -> tuple[str, str | None]:
    if "@" not in s:
        return s, None
    s, _, digest = s.rpartition("@")
    if not _DIGEST_RE.fullmatch(digest):
        raise UsageError(f"bad digest in reference {whole!r}: expected @sha256:<64 lower-case hex>")
    return s, digest


def parse_layout_reference(s: str) -> LayoutRef:
    """Parse ``oci:DIR[:TAG|@DIGEST]`` (the ``oci:`` prefix is required)."""
    if not s.startswith(LAYOUT_PREFIX):
        raise UsageError(f"not an OCI layout reference {s!r} (expected oci:DIR[:TAG])")
    rest, digest = _split_digest(s[len(LAYOUT_PREFIX):], s)
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        # Layout tags are free-form annotation values, but keep them sane for file-system tools.
        if not tag or not _TAG_RE.fullmatch(tag):
            raise UsageError(f"bad tag {tag!r} in {s!r}: tags are [A-Za-z0-9_][A-Za-z0-9_.-]*, max 128")
    if not rest:
        raise UsageError(f"missing directory in {s!r}; {_EXAMPLES}")
    if tag and digest:
        raise UsageError(f"{s!r}: give a tag or a digest for an OCI layout, not both")
    return LayoutRef(path=rest, tag=tag, digest=digest)


def parse_image_reference(s: str) -> ImageRef:
    """Parse a registry reference with Docker's defaults (docker.io, library/, latest)."""
    if not s or s != s.strip() or any(c.isspace() for c in s):
        raise UsageError(f"bad image reference {s!r}; {_EXAMPLES}")
    if "://" in s:
        raise UsageError(f"bad image reference {s!r}: drop the scheme (use --plain-http for HTTP); {_EXAMPLES}")
    rest, digest = _split_digest(s, s)
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"bad tag {tag!r} in {s!r}: tags are [A-Za-z0-9_][A-Za-z0-9_.-]*, max 128")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repo = first, remainder
        if not _HOST_RE.fullmatch(registry):
            raise UsageError(f"bad registry host {registry!r} in {s!r}")
        if registry == "index.docker.io" or registry == "registry-1.docker.io":
            registry = DEFAULT_REGISTRY
    else:
        registry, repo = DEFAULT_REGISTRY, rest
    if registry == DEFAULT_REGISTRY and repo and "/" not in repo:
        repo = "library/" + repo
    if not repo or not _REPO_RE.fullmatch(repo):
        hint = " (repository names must be lower-case)" if repo and repo.lower() != repo else ""
        raise UsageError(f"bad repository {repo!r} in {s!r}{hint}; {_EXAMPLES}")
    if len(f"{registry}/{repo}") > 255:
        raise UsageError(f"image name in {s!r} is longer than 255 characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=repo, tag=tag, digest=digest)


def parse_reference(s: str) -> ImageRef | LayoutRef:
    """Parse either form; ``oci:`` selects an OCI layout, anything else is a registry reference."""
    if not isinstance(s, str):
        raise UsageError(f"image reference must be a string, got {type(s).__name__}")
    if s.startswith(LAYOUT_PREFIX):
        return parse_layout_reference(s)
    return parse_image_reference(s)


__all__ = ["ImageRef", "LayoutRef", "parse_reference", "parse_image_reference", "parse_layout_reference",
           "DEFAULT_REGISTRY", "DEFAULT_TAG"]
