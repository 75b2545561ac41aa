"""kubelet's credential-provider exec plugin: ``remora credential-provider``.

Why: with it, a node pulls private images without imagePullSecrets in every pod spec - kubelet asks
the plugin for each image's credentials and sends them in the CRI PullImage, where remora's CRI proxy
(``--cri-proxy``) captures them for the lazy mount. The plugin answers from the same sources the
snapshotter reads itself (the secrets named in ``--credentials-config``, then the node's docker
config / ``REMORA_USERNAME``), so a node set up either way behaves the same.

Protocol (kubelet CredentialProvider API, ``credentialprovider.kubelet.k8s.io/v1``, also v1beta1 and
v1alpha1): kubelet runs the binary named in its ``--image-credential-provider-config`` with a
``CredentialProviderRequest`` JSON on stdin (``{"image": "registry.example.com/team/app:1"}``) and
reads a ``CredentialProviderResponse`` from stdout: ``auth`` maps ``host/repository`` to
``{"username", "password"}``, ``cacheKeyType`` ``Image`` (the credentials are scoped to that one
repository, so kubelet must not reuse them for others), ``cacheDuration`` how long kubelet may keep them.
No credentials is an answer too: an empty ``auth`` (kubelet then tries its other sources).
"""
from __future__ import annotations

import json
import sys
from typing import IO

from remora.errors import InvalidInput, UsageError

API_VERSIONS = ("credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v1beta1",
                "credentialprovider.kubelet.k8s.io/v1alpha1")
MAX_REQUEST = 64 << 10


def go_duration(seconds: float) -> str:
    """A metav1.Duration string (``"5m0s"``) as kubelet parses it."""
    total = int(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


def parse_request(text: str) -> tuple[str, str]:
    """``(apiVersion, image)`` of a CredentialProviderRequest; InvalidInput if it is not one."""
    if len(text) > MAX_REQUEST:
        raise InvalidInput(f"credential provider request larger than {MAX_REQUEST} bytes")
    try:
        req = json.loads(text)
    except ValueError:
        raise InvalidInput("credential provider request is not JSON") from None
    if not isinstance(req, dict) or req.get("kind") != "CredentialProviderRequest":
        raise InvalidInput("expected a JSON object of kind CredentialProviderRequest on stdin")
    if req.get("apiVersion") not in API_VERSIONS:
        raise InvalidInput(f"unsupported apiVersion {req.get('apiVersion')!r} (supported: {', '.join(API_VERSIONS)})")
    image = req.get("image")
    if not isinstance(image, str) or not image:
        raise InvalidInput("CredentialProviderRequest without an image")
    return req["apiVersion"], image


def respond(api_version: str, image: str, lookup, cache_seconds: float) -> dict:
    """The CredentialProviderResponse for ``image``; ``lookup(host, repository)`` -> Credentials|None."""
    from .store import scope_of

    host, repo = scope_of(image)
    creds = lookup(host, repo)
    auth = {}
    if creds is not None:
        if creds.username is None or creds.password is None:
            # kubelet's AuthConfig carries username/password only: an identity token cannot go this way
            raise UsageError(f"credentials for {host}/{repo} from {creds.source} are an identity token; "
                             "kubelet's credential provider API needs a username and password")
        auth[f"{host}/{repo}"] = {"username": creds.username, "password": creds.password}
    return {"kind": "CredentialProviderResponse", "apiVersion": api_version, "cacheKeyType": "Image",
            "cacheDuration": go_duration(cache_seconds), "auth": auth}


def run(stdin: IO[str], stdout: IO[str], resolver, docker_config: str | None, cache_seconds: float,
        node_credentials: bool = True) -> int:
    from remora.registry.auth import load_credentials

    api_version, image = parse_request(stdin.read(MAX_REQUEST + 1))

    def lookup(host: str, repo: str):
        creds = resolver.resolve(host, repo)
        if creds is None and node_credentials:
            creds = load_credentials(host, docker_config)
        return creds

    json.dump(respond(api_version, image, lookup, cache_seconds), stdout)
    stdout.write("\n")
    stdout.flush()
    return 0


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "credential-provider", help="kubelet credential-provider exec plugin (registry credentials per image)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  echo '{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\"kind\":"
               "\"CredentialProviderRequest\",\"image\":\"registry.example.com/app:1\"}' | "
               "remora credential-provider --credentials-config /etc/remora/credentials.yaml\n"
               "kubelet configuration: examples/kubernetes/credential-provider-config.yaml")
    p.add_argument("--credentials-config", metavar="FILE", default="",
                   help="the snapshotter's credentials config (Kubernetes secrets by reference)")
    p.add_argument("--docker-config", metavar="PATH", default=None,
                   help="docker config.json to fall back to (default: $DOCKER_CONFIG or ~/.docker)")
    p.add_argument("--no-node-credentials", action="store_true",
                   help="answer from the credentials config only, never from the node's docker config")
    p.add_argument("--cache-duration", metavar="SECONDS", type=float, default=300.0,
                   help="how long kubelet may cache an answer (default: %(default)s)")
    p.set_defaults(func=_command)


def _command(args) -> int:
    from .resolver import CredentialResolver, keychains_from_config

    if args.cache_duration < 0:
        raise UsageError("--cache-duration must not be negative")
    resolver = CredentialResolver(None, keychains_from_config(args.credentials_config))
    return run(sys.stdin, sys.stdout, resolver, args.docker_config, args.cache_duration,
               node_credentials=not args.no_node_credentials)
