"""Kept manifests: what lets a node start an image it holds while the registry cannot be reached.

Why: a preheat leaves every blob of an image on the node, but a pull starts with the manifest, and the
mirror used to ask the registry for it every time; with the registry down from the start, nothing could
start. The peer now keeps, in ``<data-dir>/manifests/``:

* the **bodies** of manifests (index and platform manifest) it fetched, content-addressed by their
  sha256 (the file name) and hashed again every time one is served;
* a **record** (``records.json``): for each kept manifest, the repositories it was fetched from and the
  digests it names (config, layers, child manifests); for each ``registry repository tag`` the digest
  the registry answered and the wall-clock time it was seen.

Who writes: a preheat (plugins/peer/preheat.py) and every manifest the mirror passes through from the
registry (which refreshes the tag's record). Who reads: the mirror, only when the registry cannot be
reached (see mirror.py), and the access checker (:meth:`KeptManifests.holds`: an object belongs to
what this peer keeps for a repository, so an earlier "yes" of the registry for that repository covers
it while the registry is down; see access.py).

By digest an answer is always safe (content-addressed, re-hashed before it goes out); by tag it is
served only from a record younger than the max age (``--offline-tag-max-age``, default
:data:`DEFAULT_TAG_MAX_AGE`). A kept manifest is served only under a repository it was fetched from.

Bounded: at most :data:`MAX_MANIFESTS` bodies totalling :data:`MAX_BYTES` and :data:`MAX_TAGS` tag
records; the least recently seen go first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Default max age of a tag record served while the registry is unreachable: 24 h, the same window as
#: the access checker's offline grace (access.OFFLINE_GRACE): past it the registry's earlier "yes" no
#: longer counts, so an older tag record could not be served anyway; shorter would break the common case
#: "preheated yesterday, started this morning during an outage". containerd itself never re-resolves a
#: tag it holds locally (imagePullPolicy IfNotPresent), and Spegel serves the tag its nodes hold without
#: any age: 24 h is the conservative end of that.
DEFAULT_TAG_MAX_AGE = 24 * 3600.0
MAX_MANIFESTS = 4096
MAX_TAGS = 4096
MAX_BYTES = 256 << 20
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def _children(body: bytes) -> list[str]:
    """Digests a manifest names: config, layers, an index's manifests (blobs and manifests alike)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    descs = []
    if isinstance(doc.get("config"), dict):
        descs.append(doc["config"])
    for key in ("layers", "manifests"):
        if isinstance(doc.get(key), list):
            descs += [d for d in doc[key] if isinstance(d, dict)]
    return [d["digest"] for d in descs if isinstance(d.get("digest"), str) and _DIGEST_RE.match(d["digest"])]


class Kept:
    """A kept manifest ready to serve: ``age`` is None by digest, the tag record's age otherwise."""

    def __init__(self, body: bytes, media_type: str, digest: str, age: float | None):
        self.body, self.media_type, self.digest, self.age = body, media_type, digest, age


class KeptManifests:
    """The kept manifests and tag records of one peer (see the module doc). Thread-safe: the mirror
    calls it from the event loop, writes happen in worker threads."""

    def __init__(self, data_dir: Path, tag_max_age: float = DEFAULT_TAG_MAX_AGE):
        self.dir = Path(data_dir) / "manifests"
        self.tag_max_age = tag_max_age
        self._lock = threading.Lock()
        #: digest -> {"media_type", "size", "repos": [key], "children": [digest], "seen": wall}
        self.manifests: dict[str, dict] = {}
        #: "registry repository tag" -> {"digest", "seen": wall}
        self.tags: dict[str, dict] = {}
        self._held: dict[str, set[str]] = {}   # "registry repository" -> digests kept for it
        self._saved = 0.0
        self._load()

    # -- persistence ------------------------------------------------------------------------------------
    @property
    def _records(self) -> Path:
        return self.dir / "records.json"

    def _body_path(self, digest: str) -> Path:
        return self.dir / "sha256" / digest.split(":", 1)[1]

    def _load(self) -> None:
        try:
            doc = json.loads(self._records.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable, starting without kept manifests: %s", self._records, exc)
            return
        if not isinstance(doc, dict):
            return
        try:
            for digest, m in (doc.get("manifests") or {}).items():
                if _DIGEST_RE.match(str(digest)) and isinstance(m, dict) and isinstance(m.get("repos"), list) \
                        and self._body_path(digest).is_file():
                    self.manifests[digest] = {
                        "media_type": str(m.get("media_type", "")), "size": int(m.get("size", 0)),
                        "repos": [str(r) for r in m["repos"]][:64],
                        "children": [c for c in m.get("children") or [] if _DIGEST_RE.match(str(c))],
                        "seen": float(m.get("seen", 0))}
            for key, t in (doc.get("tags") or {}).items():
                if isinstance(t, dict) and t.get("digest") in self.manifests:
                    self.tags[str(key)] = {"digest": t["digest"], "seen": float(t.get("seen", 0))}
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("%s: malformed, starting without kept manifests: %s", self._records, exc)
            self.manifests, self.tags = {}, {}
        self._trim()
        self._reindex()

    def _reindex(self) -> None:
        held: dict[str, set[str]] = {}
        for digest, m in self.manifests.items():
            for repo in m["repos"]:
                held.setdefault(repo, set()).update([digest, *m["children"]])
        self._held = held

    def _save(self) -> None:
        tmp = self._records.with_name("records.json.tmp")
        try:
            tmp.write_text(json.dumps({"manifests": self.manifests, "tags": self.tags}))
            os.replace(tmp, self._records)
        except OSError as exc:
            log.warning("%s: cannot record kept manifests: %s", self._records, exc)

    def _trim(self) -> None:
        while len(self.tags) > MAX_TAGS:
            del self.tags[min(self.tags, key=lambda k: self.tags[k]["seen"])]
        total = sum(m["size"] for m in self.manifests.values())
        while self.manifests and (len(self.manifests) > MAX_MANIFESTS or total > MAX_BYTES):
            old = min(self.manifests, key=lambda d: self.manifests[d]["seen"])
            total -= self.manifests.pop(old)["size"]
            self.tags = {k: t for k, t in self.tags.items() if t["digest"] != old}
            try:
                self._body_path(old).unlink()
            except OSError:
                pass

    # -- writing ----------------------------------------------------------------------------------------
    def keep(self, registry: str, repository: str, ref: str, body: bytes, media_type: str) -> str:
        """Keep ``body`` (fetched from ``registry/repository`` as ``ref``, already digest-checked by the
        caller: checked again here) and, for a tag, record tag -> digest seen now. Returns the digest.
        Blocking (file I/O): call it in a worker thread."""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and ref != digest:
            raise ValueError(f"manifest {ref} hashes to {digest}")
        repo_key, now = f"{registry} {repository}", time.time()
        with self._lock:
            path = self._body_path(digest)
            m = self.manifests.get(digest)
            changed = m is None or repo_key not in m["repos"]
            if m is None or not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(body)
                os.replace(tmp, path)
            if m is None:
                m = self.manifests[digest] = {"media_type": media_type, "size": len(body), "repos": [],
                                              "children": _children(body), "seen": now}
            m["seen"], m["media_type"] = now, media_type or m["media_type"]
            if repo_key not in m["repos"]:
                m["repos"] = [*m["repos"][-63:], repo_key]
            if not ref.startswith("sha256:"):
                tag_key = f"{repo_key} {ref}"
                changed = changed or (self.tags.get(tag_key) or {}).get("digest") != digest
                self.tags[tag_key] = {"digest": digest, "seen": now}
            if changed:
                self._trim()
                self._reindex()
            # Something new is on disk at once; a refreshed "seen" at most once a minute (a restart loses
            # at most a minute of freshness, never an answer).
            if changed or now - self._saved > 60.0:
                self._save()
                self._saved = now
        return digest

    def set_tag_max_age(self, seconds: float) -> None:
        if seconds >= 0 and seconds != self.tag_max_age:
            log.info("offline tag max age: %.0f s (was %.0f s)", seconds, self.tag_max_age)
            self.tag_max_age = seconds

    # -- reading ----------------------------------------------------------------------------------------
    def holds(self, registry: str, repository: str, kind: str, ref: str) -> bool:
        """Whether ``kind`` ``ref`` belongs to what this peer keeps for ``registry/repository``: a kept
        manifest fetched from it, a digest one of those names, or a recorded tag of it."""
        repo_key = f"{registry} {repository}"
        if ref.startswith("sha256:"):
            return ref in self._held.get(repo_key, ())
        return kind == "manifest" and f"{repo_key} {ref}" in self.tags

    def tag_age(self, registry: str, repository: str, tag: str) -> float | None:
        t = self.tags.get(f"{registry} {repository} {tag}")
        return None if t is None else max(0.0, time.time() - t["seen"])

    def get(self, registry: str, repository: str, ref: str) -> Kept | None:
        """The kept manifest for ``ref`` under ``registry/repository`` (by tag: only from a record younger
        than the max age), its bytes hashed again; None when there is none (or it is damaged: dropped).
        Blocking (file I/O): call it in a worker thread."""
        repo_key, age = f"{registry} {repository}", None
        digest = ref
        if not ref.startswith("sha256:"):
            t = self.tags.get(f"{repo_key} {ref}")
            if t is None:
                return None
            age = max(0.0, time.time() - t["seen"])
            if age > self.tag_max_age:
                return None
            digest = t["digest"]
        m = self.manifests.get(digest)
        if m is None or repo_key not in m["repos"]:
            return None
        try:
            body = self._body_path(digest).read_bytes()
        except OSError:
            return None
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            log.error("kept manifest %s no longer matches its digest: dropped", digest)
            with self._lock:
                self.manifests.pop(digest, None)
                self._body_path(digest).unlink(missing_ok=True)
                self._reindex()
                self._save()
            return None
        return Kept(body, m["media_type"] or "application/vnd.oci.image.manifest.v1+json", digest, age)
