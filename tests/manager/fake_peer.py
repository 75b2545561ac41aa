"""A fake peer task API on 127.0.0.1 (the real one belongs to ``remora peer``), scripted per test.

It implements the interface documented in remora.plugins.manager.jobs and records every call, so
tests check what the manager sent (task ids, blob order, DELETEs on cancel, retry timing).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakePeer:
    """mode: good | liar (claims success with a partial blob) | flaky (first POST 503) | broken (always 503)
    | slow (never finishes) | failing (reports failed)."""

    def __init__(self, mode: str = "good", polls_before_done: int = 2):
        self.mode, self.polls_before_done = mode, polls_before_done
        self.tasks: dict[str, dict] = {}
        self.calls: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body=None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with peer.lock:
                    peer.calls.append((time.monotonic(), "POST", body.get("id", "")))
                    posts = sum(1 for c in peer.calls if c[1] == "POST")
                    if peer.mode == "broken" or (peer.mode == "flaky" and posts == 1):
                        return self._send(503, {"error": "busy"})
                    peer.tasks[body["id"]] = {"req": body, "polls": 0, "cancelled": False}
                self._send(202, {"id": body["id"]})

            def do_GET(self):
                task_id = self.path.rsplit("/", 1)[-1]
                with peer.lock:
                    peer.calls.append((time.monotonic(), "GET", task_id))
                    t = peer.tasks.get(task_id)
                    if t is None:
                        return self._send(404, {"error": "no such task"})
                    t["polls"] += 1
                    self._send(200, peer.status(t))

            def do_DELETE(self):
                task_id = self.path.rsplit("/", 1)[-1]
                with peer.lock:
                    peer.calls.append((time.monotonic(), "DELETE", task_id))
                    if task_id in peer.tasks:
                        peer.tasks[task_id]["cancelled"] = True
                self._send(204)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def status(self, t: dict) -> dict:
        blobs = t["req"]["blobs"]
        done = t["polls"] > self.polls_before_done
        if t["cancelled"]:
            return {"state": "cancelled", "error": "", "blobs": []}
        if self.mode == "failing":
            return {"state": "failed", "error": "disk full", "blobs": []}
        if self.mode == "slow" or not done:
            return {"state": "running", "error": "", "blobs": [
                {"digest": b["digest"], "size": b["size"], "verified_bytes": b["size"] // 2, "verified": False}
                for b in blobs]}
        out = [{"digest": b["digest"], "size": b["size"], "verified_bytes": b["size"], "verified": True,
                "deleted": t["req"]["type"] == "delete-task"} for b in blobs]
        if self.mode == "liar" and out:
            out[-1] = {**out[-1], "verified_bytes": out[-1]["size"] - 1}
        return {"state": "succeeded", "error": "", "blobs": out}

    def posts(self) -> list[tuple[float, str, str]]:
        with self.lock:
            return [c for c in self.calls if c[1] == "POST"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
