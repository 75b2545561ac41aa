"""A deliberately misbehaving registry on 127.0.0.1, for the failures a real registry will not produce
on demand: 5xx bursts, wrong bytes, truncated bodies, stalls, ignored or wrong Range answers.

It serves ``GET``/``HEAD`` of ``/v2/<repo>/blobs/<digest>`` and ``/v2/<repo>/manifests/<ref>`` from
dicts, and monolithic blob uploads (``POST`` a session, ``PUT ?digest=``, ``DELETE`` to cancel; a
``?mount=`` is answered like a registry without mount support); each misbehaviour is an attribute
the test sets. ``hits`` counts reads.
"""
from __future__ import annotations

import hashlib
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_PATH = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>blobs|manifests)/(?P<ref>[^/?]+)$")


class FakeRegistry:
    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.fail_next = 0            # answer this many requests with 500 first
        self.fail_status = 500
        self.corrupt = False          # serve bytes that do not match the digest
        self.truncate = False         # announce the full length, send half, close
        self.delay = 0.0              # stall this long before answering
        self.ignore_range = False     # answer a Range request with 200 and the whole body
        self.wrong_range = False      # answer 206 with a Content-Range for other bytes
        self.redirect = False         # send blob GETs elsewhere (as registries backed by S3 do)
        self.redirect_to = ""         # ... to this base URL (another host:port) instead of our own /storage/
        self.require_basic = ""       # "Basic <b64>" every /v2/ request must carry (401 challenge otherwise)
        self.auth_seen: list[tuple[str, str | None]] = []   # (path, Authorization header) of each GET/HEAD
        self.fail_puts = 0            # answer this many upload PUTs with 500
        self.lie_digest = False       # report another Docker-Content-Digest after an upload
        self.sessions: list[str] = [] # upload sessions opened
        self.cancelled: list[str] = []
        self.hits = 0
        self._closing = threading.Event()
        self.storage_hits = 0         # requests that followed the redirect
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake._handle(self, body=True)

            def do_HEAD(self):
                fake._handle(self, body=False)

            def do_POST(self):
                fake._post(self)

            def do_PUT(self):
                fake._put(self)

            def do_DELETE(self):
                fake.cancelled.append(self.path)
                fake._send(self, 204, {"Content-Length": "0"}, b"", False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def __enter__(self) -> FakeRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(self, h, status: int, headers: dict, body: bytes, send_body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if send_body:
            h.wfile.write(body)

    def _handle(self, h, body: bool) -> None:
        self.hits += 1
        self.auth_seen.append((h.path, h.headers.get("Authorization")))
        if self.require_basic and h.path.startswith("/v2/") and h.headers.get("Authorization") != self.require_basic:
            self._send(h, 401, {"WWW-Authenticate": 'Basic realm="fake"', "Content-Length": "0"}, b"", body)
            return
        if self.delay:
            self._closing.wait(self.delay)      # a stalled server; let go at once when the test ends
        if self.fail_next > 0:
            self.fail_next -= 1
            err = b'{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}'
            self._send(h, self.fail_status, {"Content-Type": "application/json", "Content-Length": str(len(err))},
                       err, body)
            return
        storage = h.path.startswith("/storage/")
        if storage:
            self.storage_hits += 1
        m = _PATH.match("/v2/any/blobs/" + h.path.removeprefix("/storage/") if storage else h.path)
        if m and m["kind"] == "blobs" and self.redirect and not storage and body:
            self._send(h, 307, {"Location": f"{self.redirect_to}/storage/{m['ref']}", "Content-Length": "0"}, b"", body)
            return
        if not m:
            self._send(h, 404, {"Content-Length": "0"}, b"", body)
            return
        if m["kind"] == "manifests":
            found = self.manifests.get(m["ref"])
            if found is None:
                self._send(h, 404, {"Content-Length": "0"}, b"", body)
                return
            data, media_type = found
            if self.corrupt:
                data = data.replace(b"}", b" }", 1)
            self._send(h, 200, {"Content-Type": media_type, "Content-Length": str(len(data))}, data, body)
            return
        data = self.blobs.get(m["ref"])
        if data is None:
            self._send(h, 404, {"Content-Length": "0"}, b"", body)
            return
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        rng = h.headers.get("Range")
        if rng and not self.ignore_range:
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start, end = int(start_s), int(end_s) if end_s else len(data) - 1
            if self.wrong_range:
                start, end = start + 1, end + 1
            part = data[start:end + 1]
            self._send(h, 206, {"Content-Range": f"bytes {start}-{end}/{len(data)}",
                                "Content-Length": str(len(part))}, part, body)
            return
        headers = {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        if self.truncate and body:
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        self._send(h, 200, headers, data, body)

    def _post(self, h) -> None:
        parts = urlsplit(h.path)
        location = f"{parts.path.rstrip('/')}/{uuid.uuid4().hex}"
        self.sessions.append(location)
        self._send(h, 202, {"Location": location, "Content-Length": "0"}, b"", False)

    def _put(self, h) -> None:
        parts = urlsplit(h.path)
        data = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        digest = parse_qs(parts.query).get("digest", [""])[0]
        if self.fail_puts > 0:
            self.fail_puts -= 1
            self._send(h, 500, {"Content-Length": "0"}, b"", False)
            return
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self._send(h, 400, {"Content-Length": "0"}, b"", False)
            return
        self.blobs[digest] = data
        reported = "sha256:" + "0" * 64 if self.lie_digest else digest
        self._send(h, 201, {"Docker-Content-Digest": reported, "Content-Length": "0"}, b"", False)
