"""Test support for the lazy fs, fetcher and cache: a real remora image and a loopback proxy.

:func:`build_image` writes data blobs and a bootstrap with the format library (every file kind the fs
must serve: small files batched into shared frames, a multi-frame file, an empty file, symlinks, a
hard link, a fifo, a device, xattrs, a non-UTF-8 name, odd modes/owners/mtimes) and pushes the blobs
to a real registry. :class:`CountingProxy` sits between the fetcher and the registry: it counts
requests and bytes, and can delay, corrupt (flip a byte) or refuse.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import random
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from remora.format.blob import BlobWriter, compress_frame
from remora.format.bootstrap import write_bootstrap
from remora.format.chunktable import ChunkTable
from remora.format.tree import ChunkRef, Inode, Tree
from remora.registry.client import RegistryClient

SMALL_FRAME = 64 << 10     # small files are packed into frames of up to this many bytes
BIG_CHUNK = 256 << 10


@dataclass
class Image:
    repo: str
    bootstrap: Path
    tree: Tree
    table: ChunkTable
    contents: dict[bytes, bytes] = field(default_factory=dict)   # path -> file bytes
    blob_paths: dict[str, Path] = field(default_factory=dict)    # digest -> local blob file


def _data(rng: random.Random, n: int) -> bytes:
    # compressible but not trivial: random words
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(64)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def build_image(workdir: Path, registry_host: str, n_small: int = 60, big_size: int = 3 << 20,
                prefetch_paths: tuple[bytes, ...] = (b"/etc/hot.conf",), seed: int = 7,
                credentials: tuple[str, str] | None = None, xattrs: bool = True) -> Image:
    """A realistic little image in two data blobs, pushed to ``registry_host`` under a unique repo."""
    rng = random.Random(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tree = Tree()
    table = ChunkTable()
    contents: dict[bytes, bytes] = {}
    root = tree.root
    d = {name: Inode.directory(0o755, mtime_ns=1_600_000_000 * 10**9) for name in (b"etc", b"bin", b"data", b"dev")}
    root.children.update(d)
    d[b"data"].children[b"deep"] = Inode.directory(0o750, uid=1000, gid=1000)
    d[b"data"].children[b"deep"].children[b"er"] = Inode.directory(0o700)

    def regular(path: bytes, data: bytes, mode: int = 0o644, **kw) -> Inode:
        node = Inode(mode=stat.S_IFREG | mode, size=len(data), chunks=[], mtime_ns=1_700_000_000_123_456_789, **kw)
        contents[path] = data
        return node

    files: list[tuple[bytes, Inode]] = []
    for i in range(n_small):
        path = b"/etc/small%03d.txt" % i
        node = regular(path, _data(rng, rng.randint(100, 6000)))
        d[b"etc"].children[path.rsplit(b"/", 1)[1]] = node
        files.append((path, node))
    hot = regular(b"/etc/hot.conf", b"hot=1\n" * 50,
                  xattrs={"user.remora": b"\x00\xffbin", "user.x": b"y"} if xattrs else {})
    d[b"etc"].children[b"hot.conf"] = hot
    files.append((b"/etc/hot.conf", hot))
    empty = regular(b"/etc/empty", b"")
    d[b"etc"].children[b"empty"] = empty
    weird_name = b"caf\xe9-\xff.bin"
    weird = regular(b"/data/" + weird_name, _data(rng, 3000), mode=0o4755, uid=123, gid=456)
    d[b"data"].children[weird_name] = weird
    files.append((b"/data/" + weird_name, weird))
    deep = regular(b"/data/deep/er/file", _data(rng, 9000), mode=0o600)
    d[b"data"].children[b"deep"].children[b"er"].children[b"file"] = deep
    files.append((b"/data/deep/er/file", deep))
    big = regular(b"/bin/big", rng.randbytes(big_size // 4) * 4, mode=0o755)
    d[b"bin"].children[b"big"] = big
    d[b"bin"].children[b"hardlink-to-big"] = big          # same Inode object: a hard link
    contents[b"/bin/hardlink-to-big"] = contents[b"/bin/big"]
    d[b"bin"].children[b"sh"] = Inode(mode=stat.S_IFLNK | 0o777, target=b"big", size=3)
    root.children[b"abs-link"] = Inode(mode=stat.S_IFLNK | 0o777, target=b"/etc/hot.conf", size=13)
    d[b"dev"].children[b"null"] = Inode(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    d[b"dev"].children[b"sda"] = Inode(mode=stat.S_IFBLK | 0o660, rdev=os.makedev(8, 0), gid=6)
    d[b"dev"].children[b"fifo"] = Inode(mode=stat.S_IFIFO | 0o600)

    # blob 1: small files packed into shared frames; blob 2: the big file, one frame per 256 KiB chunk
    blob_paths = {}
    bw = BlobWriter(workdir / "blob-small")
    bid = table.blob_id("pending-small", 0)
    pending: list[tuple[Inode, bytes]] = []

    def flush_small():
        if not pending:
            return
        raw = b"".join(data for _, data in pending)
        off, csize = bw.add_frame(compress_frame(raw))
        fid = table.add_frame(bid, off, csize, len(raw))
        pos = 0
        for node, data in pending:
            dg = hashlib.sha256(data).digest()
            table.add_chunk(dg, len(data), fid, pos)
            node.chunks.append(ChunkRef(dg, len(data)))
            pos += len(data)
        pending.clear()

    for path, node in files:
        data = contents[path]
        if sum(len(x) for _, x in pending) + len(data) > SMALL_FRAME:
            flush_small()
        pending.append((node, data))
    flush_small()
    digest, size = bw.close()
    table.set_blob(bid, digest, size)
    blob_paths[digest] = workdir / "blob-small"

    bw = BlobWriter(workdir / "blob-big")
    bid = table.blob_id("pending-big", 0)
    data = contents[b"/bin/big"]
    for pos in range(0, len(data), BIG_CHUNK):
        piece = data[pos:pos + BIG_CHUNK]
        dg = hashlib.sha256(piece).digest()
        if dg not in table.by_digest:  # the file repeats itself: store each chunk once
            off, csize = bw.add_frame(compress_frame(piece))
            table.add_chunk(dg, len(piece), table.add_frame(bid, off, csize, len(piece)), 0)
        big.chunks.append(ChunkRef(dg, len(piece)))
    digest, size = bw.close()
    table.set_blob(bid, digest, size)
    blob_paths[digest] = workdir / "blob-big"

    tree.number()
    bootstrap = workdir / "bootstrap.db"
    write_bootstrap(bootstrap, tree, table, prefetch=[tree.lookup(p).ino for p in prefetch_paths])
    repo = f"lazytest/img-{uuid.uuid4().hex[:10]}"
    client = RegistryClient(registry_host, credentials=credentials)
    for dg, path in blob_paths.items():
        client.push_blob(repo, dg, path.stat().st_size, path)
    client.close()
    return Image(repo, bootstrap, tree, table, contents, blob_paths)


class CountingProxy:
    """A loopback HTTP proxy in front of a registry: counts GETs and bytes; can misbehave.

    ``mode``: ``"pass"``, ``"flip"`` (flip one byte of every body), ``"refuse"`` (HTTP 503),
    ``"stall"`` (accept and never answer). ``delay`` adds latency to every request.
    """

    def __init__(self, upstream: str, mode: str = "pass", delay: float = 0.0):
        self.upstream = upstream.rstrip("/")
        self.mode = mode
        self.delay = delay
        self.requests: list[str] = []
        self.by_connection: list[tuple[int, str]] = []   # (client port, path) of every GET, in order
        self.bytes = 0
        self._lock = threading.Lock()
        self._session = requests.Session()  # keep-alive to the registry: the proxy adds little latency
        self._session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms Nagle stall

            def log_message(self, *a):
                pass

            def do_GET(self):
                with proxy._lock:
                    proxy.requests.append(self.headers.get("Range", "") + " " + self.path)
                    proxy.by_connection.append((self.client_address[1], self.path))
                if proxy.delay:
                    time.sleep(proxy.delay)
                if proxy.mode == "stall":
                    time.sleep(30)
                    return
                if proxy.mode == "refuse":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "authorization", "accept")}
                r = proxy._session.get(proxy.upstream + self.path.split("?")[0], headers=headers, timeout=10)
                body = r.content
                if proxy.mode == "flip" and body:
                    body = bytearray(body)
                    body[len(body) // 2] ^= 0x01
                    body = bytes(body)
                with proxy._lock:
                    proxy.bytes += len(body)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() in ("content-range", "content-type", "docker-content-digest", "www-authenticate"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_requests(self) -> list[str]:
        with self._lock:
            return [r for r in self.requests if "/blobs/" in r]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes = 0

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def dead_port_url() -> str:
    """A loopback URL nothing listens on (connection refused at once)."""
    from remora.procutil import free_port

    return f"http://127.0.0.1:{free_port()}"


def converted_busybox(registry, prefix: str) -> str:
    """A busybox image pushed to ``registry`` under a fresh repository and converted by ``remora
    convert`` (a real subprocess); returns the remora image's reference."""
    from remora_testing.imagebuild import busybox_image

    src = f"{registry.host}/{prefix}-{uuid.uuid4().hex[:6]}/busybox:1"
    busybox_image(src)
    subprocess.run([sys.executable, "-m", "remora.cli", "convert", "--no-progress", src, src + "-remora"],
                   check=True, capture_output=True, timeout=240)
    return src + "-remora"
