"""Kubernetes ``kubernetes.io/dockerconfigjson`` secrets, read by reference from the API server.

Why: an operator who keeps registry credentials in cluster secrets (the imagePullSecrets of pods)
should not have to copy them onto every node. The snapshotter (or ``remora credential-provider``)
reads the secrets it is told about - ``namespace/name`` in its credentials config, or the
imagePullSecrets of a named pod - with a minimal REST client: one GET per secret, a connect and read
timeout, a 1 MiB answer at most (the API server's own secret size limit), nothing cached on disk.

Authentication to the API server: a kubeconfig (its current context: server, CA, bearer token or
token file or client certificate) or, inside a pod, the service account
(``KUBERNETES_SERVICE_HOST``/``_PORT`` and /var/run/secrets/kubernetes.io/serviceaccount). The
account needs ``get`` on the named secrets only (RBAC example in docs/credentials.md).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import requests

from remora.errors import AuthError, InvalidInput, NotFound, RegistryError, UsageError
from remora.registry.auth import Credentials

from .store import normalize_host

DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
MAX_ANSWER = 1 << 20
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class SecretRef:
    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str, default_namespace: str = "default") -> SecretRef:
        ns, sep, name = text.strip().partition("/")
        if not sep:
            ns, name = default_namespace, ns
        if not ns or not name or "/" in name:
            raise UsageError(f"secret reference {text!r}: expected NAMESPACE/NAME")
        return cls(ns, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class KubeClient:
    """GETs against one API server. ``server`` like ``https://10.0.0.1:6443``."""

    def __init__(self, server: str, *, token: str | None = None, token_file: str | None = None,
                 ca_file: str | None = None, cert: tuple[str, str] | None = None, verify: bool = True,
                 timeout: float = 10.0, tempdir: str | None = None):
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"Kubernetes API server {server!r}: expected https://HOST[:PORT]")
        self.server = server.rstrip("/")
        self._token, self._token_file = token, token_file
        self.timeout = timeout
        self._tempdir = tempdir  # holds CA/client-certificate data from a kubeconfig; removed by close()
        self.session = requests.Session()
        self.session.verify = ca_file if (verify and ca_file) else verify
        if cert:
            self.session.cert = cert

    @classmethod
    def in_cluster(cls, **kw) -> KubeClient:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise UsageError("not in a pod (KUBERNETES_SERVICE_HOST/PORT unset): pass a kubeconfig")
        host = f"[{host}]" if ":" in host else host
        ca = SERVICE_ACCOUNT / "ca.crt"
        return cls(f"https://{host}:{port}", token_file=str(SERVICE_ACCOUNT / "token"),
                   ca_file=str(ca) if ca.exists() else None, **kw)

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike, context: str | None = None, **kw) -> KubeClient:
        cfg = _load_config(Path(path))
        name = context or cfg.get("current-context")
        ctx = _named(cfg, "contexts", name, path).get("context") or {}
        cluster = _named(cfg, "clusters", ctx.get("cluster"), path).get("cluster") or {}
        user = _named(cfg, "users", ctx.get("user"), path).get("user") or {} if ctx.get("user") else {}
        base = Path(path).parent
        tempdir = None

        def file_of(key: str, section: dict) -> str | None:
            nonlocal tempdir
            if section.get(f"{key}-data"):
                if tempdir is None:
                    tempdir = tempfile.mkdtemp(prefix="remora-kube-")  # 0700: private to this process's user
                out = Path(tempdir) / key
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(section[f"{key}-data"]))
                return str(out)
            if section.get(key):
                return str(base / section[key])
            return None

        cert, key = file_of("client-certificate", user), file_of("client-key", user)
        token_file = user.get("tokenFile")
        return cls(cluster.get("server", ""), token=user.get("token"),
                   token_file=str(base / token_file) if token_file else None,
                   ca_file=file_of("certificate-authority", cluster), cert=(cert, key) if cert and key else None,
                   verify=not cluster.get("insecure-skip-tls-verify", False), tempdir=tempdir, **kw)

    def close(self) -> None:
        self.session.close()
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    def get(self, path: str) -> dict:
        """GET ``path`` (``/api/v1/...``) as a JSON object; API errors become remora errors."""
        headers = {"Accept": "application/json"}
        token = self._token
        if self._token_file:  # re-read each time: projected service-account tokens rotate
            try:
                token = Path(self._token_file).read_text().strip()
            except OSError as exc:
                raise UsageError(f"Kubernetes token file {self._token_file}: {exc.strerror}") from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = self.server + path
        try:
            with self.session.get(url, headers=headers, timeout=(3.0, self.timeout), stream=True) as r:
                body = r.raw.read(MAX_ANSWER + 1, decode_content=True)
                status = r.status_code
        except requests.RequestException as exc:
            raise RegistryError(f"Kubernetes API {self.server}: {type(exc).__name__}") from None
        if len(body) > MAX_ANSWER:
            raise InvalidInput(f"Kubernetes API {path}: answer larger than {MAX_ANSWER} bytes")
        if status == 404:
            raise NotFound(f"Kubernetes API: {path} not found")
        if status in (401, 403):
            raise AuthError(f"Kubernetes API refused GET {path} (HTTP {status}): the account needs 'get' on it")
        if status != 200:
            raise RegistryError(f"Kubernetes API GET {path}: HTTP {status}")
        try:
            obj = json.loads(body)
        except ValueError:
            raise InvalidInput(f"Kubernetes API GET {path}: not JSON") from None
        if not isinstance(obj, dict):
            raise InvalidInput(f"Kubernetes API GET {path}: not a JSON object")
        return obj

    def docker_config(self, ref: SecretRef) -> dict:
        """The decoded ``.dockerconfigjson`` of secret ``ref`` (``{"auths": {...}}``)."""
        secret = self.get(f"/api/v1/namespaces/{quote(ref.namespace, safe='')}/secrets/{quote(ref.name, safe='')}")
        if secret.get("type") != DOCKERCONFIGJSON:
            raise InvalidInput(f"secret {ref} is of type {secret.get('type')!r}, not {DOCKERCONFIGJSON}")
        raw = (secret.get("data") or {}).get(".dockerconfigjson")
        try:
            cfg = json.loads(base64.b64decode(raw or "", validate=True))
        except (ValueError, TypeError):
            raise InvalidInput(f"secret {ref}: .dockerconfigjson is not base64 JSON") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("auths", {}), dict):
            raise InvalidInput(f"secret {ref}: .dockerconfigjson has no 'auths' object")
        return cfg

    def pod_pull_secrets(self, namespace: str, pod: str) -> list[SecretRef]:
        """The imagePullSecrets of a pod (and of nothing else: a pod's service account's are merged
        into the pod spec by the API server at admission)."""
        obj = self.get(f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}")
        names = [(s or {}).get("name") for s in (obj.get("spec") or {}).get("imagePullSecrets") or []]
        return [SecretRef(namespace, n) for n in names if isinstance(n, str) and n]


def credentials_for(config: dict, host: str, repository: str, source: str) -> Credentials | None:
    """The entry of a docker config's ``auths`` that matches ``host/repository``, the most specific
    first: kubelet's matching, where a key may name a path (``registry.example.com/team-a``) that the
    repository must lie under; scheme and a trailing ``/v1/`` are ignored."""
    want_host = normalize_host(host)
    best: tuple[int, dict] | None = None
    for key, entry in (config.get("auths") or {}).items():
        if not isinstance(entry, dict) or not isinstance(key, str):
            continue
        k = key.split("://", 1)[-1].strip("/")
        k_host, _, k_path = k.partition("/")
        if k_path in ("v1", "v2"):
            k_path = ""
        if normalize_host(k_host) != want_host:
            continue
        if k_path and repository != k_path and not repository.startswith(k_path + "/"):
            continue
        if best is None or len(k_path) > best[0]:
            best = (len(k_path), entry)
    if best is None:
        return None
    entry = best[1]
    if entry.get("username") and entry.get("password"):
        return Credentials(username=entry["username"], password=entry["password"], source=source)
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput(f"{source}: the auth entry for {host} is not base64 'user:password'") from None
        if sep and user:
            return Credentials(username=user, password=password, source=source)
    if entry.get("identitytoken"):
        return Credentials(username=entry.get("username"), identity_token=entry["identitytoken"], source=source)
    return None


class SecretsKeychain:
    """Credentials from named dockerconfigjson secrets; each secret re-read after ``refresh`` seconds
    (a rotated secret is picked up; an unreadable one is reported, never fatal to other lookups)."""

    def __init__(self, client: KubeClient, refs: list[SecretRef], refresh: float = 60.0, clock=time.monotonic):
        self.client, self.refs, self.refresh, self._clock = client, list(refs), refresh, clock
        self._lock = threading.Lock()
        self._cache: dict[SecretRef, tuple[dict, float]] = {}
        self.errors: dict[SecretRef, str] = {}

    def _config(self, ref: SecretRef) -> dict:
        with self._lock:
            hit = self._cache.get(ref)
            if hit and hit[1] > self._clock():
                return hit[0]
        try:
            cfg = self.client.docker_config(ref)
        except (InvalidInput, NotFound, AuthError, RegistryError) as exc:
            self.errors[ref] = str(exc)
            cfg = {}
        else:
            self.errors.pop(ref, None)
        with self._lock:
            self._cache[ref] = (cfg, self._clock() + self.refresh)
        return cfg

    def lookup(self, host: str, repository: str) -> Credentials | None:
        for ref in self.refs:
            creds = credentials_for(self._config(ref), host, repository, f"secret {ref}")
            if creds is not None:
                return creds
        return None


def read_mapping(path: Path, what: str) -> dict:
    """A YAML (or JSON: YAML's subset) file that must hold a mapping; UsageError naming ``what``."""
    import yaml  # a runtime dependency (pyproject)

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {path}: not valid YAML or JSON: {str(exc)[:200]}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{what} {path}: expected a mapping")
    return cfg


def _load_config(path: Path) -> dict:
    return read_mapping(path, "kubeconfig")


def _named(cfg: dict, section: str, name: str | None, path) -> dict:
    for item in cfg.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item
    raise UsageError(f"kubeconfig {path}: no entry {name!r} in {section}")
