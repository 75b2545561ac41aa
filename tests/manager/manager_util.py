"""Helpers for the manager tests: a private PostgreSQL, a real manager process, condition waits."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "remora-pg"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def ensure_pg_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
        return pwd.getpwnam(PG_USER)


class PrivatePostgres:
    """Debian's PostgreSQL 15 run by a non-root system user under a temp dir, on 127.0.0.1 only."""

    def __init__(self):
        self.user = ensure_pg_user()
        self.dir = Path(tempfile.mkdtemp(prefix="remora-pg-"))
        os.chmod(self.dir, 0o700)
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data, self.sock = self.dir / "data", self.dir
        self.port = free_port()
        self.n = 0

    def _as_pg(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", PG_USER, "--"] + argv, check=True, capture_output=True, text=True, **kw)

    def start(self) -> PrivatePostgres:
        self._as_pg([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-sync"])
        self._as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                     "-o", f"-k {self.sock} -h 127.0.0.1 -p {self.port} -c fsync=off -c max_connections=200",
                     "start"])
        return self

    def stop(self) -> None:
        try:
            self._as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self) -> str:
        import psycopg

        self.n += 1
        name = f"remora_test_{os.getpid()}_{self.n}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


class ManagerProcess:
    """A real ``remora manager`` process on 127.0.0.1 with a fresh root token."""

    def __init__(self, db_url: str, workdir: Path, keepalive_interval: float = 10.0, extra: list[str] | None = None,
                 port: int | None = None, tls_dir: Path | None = None, launcher: list[str] | None = None):
        self.port = port or free_port()
        self.url = f"{'https' if tls_dir else 'http'}://127.0.0.1:{self.port}"
        extra = list(extra or []) + (["--tls-dir", str(tls_dir)] if tls_dir else ["--insecure-plain-http"])
        self.token_file = workdir / "root-token"
        self.log = open(workdir / f"manager-{self.port}.log", "w")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            (launcher or [sys.executable, "-m", "remora.cli"]) + [
             "manager", "--db", db_url, "--listen", f"127.0.0.1:{self.port}",
             "--root-token-file", str(self.token_file), "--keepalive-interval", str(keepalive_interval),
             "--job-poll", "0.05", "--job-backoff", "0.1", "--job-backoff-max", "0.4"] + extra,
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.http = requests.Session()
        self.http.trust_env = False
        if tls_dir:
            self.http.verify = str(Path(tls_dir) / "ca.pem")   # an operator: no client certificate
        try:
            wait_for(self._healthy, timeout=60, what=f"manager on {self.url}")
        except BaseException:   # never leave a manager behind when it did not come up
            self.stop()
            raise
        # only the replica that found an empty database writes a root token
        self.root = self.token_file.read_text().strip() if self.token_file.exists() else ""

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"manager exited {self.proc.returncode}: {Path(self.log.name).read_text()[-3000:]}")
        try:
            return self.http.get(self.url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def call(self, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        tok = self.root if token is None else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        return self.http.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def ok(self, method: str, path: str, token: str | None = None, **kw):
        r = self.call(method, path, token, **kw)
        assert r.status_code < 300, (r.status_code, r.text)
        return None if r.status_code == 204 else r.json()

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
