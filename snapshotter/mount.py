"""Lazy mounts as separate processes: start, stop, health-check, and restore after a restart.

Process model: every lazy mount is served by its own process (``python -P -m remora.snapshotter.fs
--spec FILE``, started in ``/``: see :func:`fs_argv`) in its own session. FUSE serving never competes
with the snapshotter's gRPC threads (the GIL is per process), a crash or hang of one mount's process
affects that mount only, and the mounts outlive a snapshotter restart (containers keep running on them).

State lives on disk under ``STATE/mounts/``: ``<id>.json`` (the :class:`MountSpec`: everything needed
to re-mount), ``<id>.pid``, ``<id>.log`` and ``<id>.stats.json`` (counters the process publishes, see
:mod:`remora.snapshotter.metrics`). :meth:`MountManager.restore` reads it back after a restart: a mount
whose process still answers is adopted; a dead one (process gone, mount point answering ENOTCONN) is
detached and re-mounted from its spec.

Warm spare: starting a Python process and importing the fs stack (FUSE binding, fetcher, HTTP
client, zstd) costs a few hundred milliseconds, which would sit on every cold start's critical path
(the bootstrap layer's Prepare waits for the mount). With ``standby=True`` (what the snapshotter
uses) the manager keeps one process started ahead of time with ``--standby``: it has done its
imports and blocks reading a spec path on its stdin. A mount hands it the spec and it becomes that
mount's process; a new spare is started in the background for the next mount. The spare's stdin is
a pipe from the manager, so a spare whose snapshotter died reads EOF and exits; a claimed one is in
its own session like any mount process and outlives the snapshotter.

Liveness: :meth:`MountManager.check` stats a random, non-existent name under the mount point in a
helper thread with a timeout. The name is new every time, so the kernel cannot answer from its
caches: the request has to reach the fs process. ENOENT means alive, ENOTCONN/ECONNABORTED means the
process is gone, no answer within the timeout means hung. At most one probe per mount is in flight,
so a hung mount cannot pile up blocked threads.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from remora.errors import InvalidInput, NotFound, RemoraError, StorageError
from remora.mounts import detach, mount_at, mounted_fstype  # detach and mounted_fstype: this module's API too
from remora.snapshotter.fs.spec import MountSpec
from remora.snapshotter.metrics import MountCollector, read_stats
from remora.snapshotter.sources import SourceSpec

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
FSTYPE = "fuse.remora"
SPARE_POLL = 0.5           # seconds between the spare keeper's looks at its spare
SPARE_YOUNG = 10.0         # a spare that dies younger than this counts towards the crash-loop backoff
SPARE_MAX_BACKOFF = 60.0
#: A successor spare starts at normal priority (not SCHED_IDLE) when a mount was announced
#: (:meth:`MountManager.prevalidate`) this recently: mounts come in bursts (several functions of an
#: application placed on one node), and on a busy node an idle-priority successor gets no CPU before the
#: next mount claims it, which then waits for its imports like a cold start (measured: 0.8-1.9 s on the
#: placement end-to-end benchmark's node that runs two functions).
SPARE_BURST_WINDOW = 10.0
#: Warm spares kept (``remora snapshotter --fs-spares``): two, so that two functions placed on one node
#: and started together both find one (with one, the second mount waited for a fresh process's imports:
#: ~1 s of the placement end-to-end benchmark's planned start). Each is an idle Python process (~40 MB).
DEFAULT_SPARES = 2
MAX_SPARES = 16


@dataclass
class _Spare:
    """One warm spare: its process, log, start time (monotonic) and the read end of its "imports done"
    pipe (None once read: ``ready`` says what it said)."""

    proc: subprocess.Popen
    log: Path
    started: float
    ready_fd: int | None
    ready: bool = False
    announced: int = 0   # mounts announced to it (prevalidate) that it has not taken yet

    def close_ready_fd(self) -> None:
        fd, self.ready_fd = self.ready_fd, None
        if fd is not None:
            os.close(fd)

    def is_ready(self) -> bool:
        """Imports done (without blocking): the byte was read before, or it is there now."""
        if self.ready or self.ready_fd is None:
            return self.ready
        import select

        readable, _, _ = select.select([self.ready_fd], [], [], 0)
        if readable:
            self.ready = os.read(self.ready_fd, 1) == b"1"
            self.close_ready_fd()
        return self.ready

#: ``--cache-isolation`` modes: who may read a chunk another mount put in the cache (docs/snapshotter.md)
CACHE_ISOLATION = ("none", "namespace", "credential")
DEFAULT_CACHE_ISOLATION = "namespace"  # the snapshotter's (``remora snapshotter --cache-isolation``)
THROWAWAY_PREFIX = "snap-"  # a partition of one mount whose tenant is unknown: dropped with the mount


@dataclass(frozen=True)
class Health:
    """``state`` is ``ok``, ``dead`` (process gone / ENOTCONN), ``hung`` (no answer) or ``unmounted``."""

    state: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


# A bootstrap validated by the fs process before it mounts: validate's own deadline bounds it
# (remora.format.validate.DEADLINE_SECONDS), the mount timeout only starts after its verdict.
VALIDATION_TIMEOUT = 330.0


def _read_verdict(spec: MountSpec) -> str | None:
    """The fs process's verdict on the spec's bootstrap ("ok" / "invalid: ..."), None while pending."""
    if not spec.validation_file:
        return None
    try:
        return Path(spec.validation_file).read_text()
    except FileNotFoundError:
        return None


def set_read_ahead(path: Path | str, kib: int) -> bool:
    """Set the kernel readahead of the mount at ``path`` (its backing-dev-info in sysfs).

    FUSE mounts get 128 KiB, so a sequential read reaches the fs process in 128 KiB requests; with
    1 MiB the same read costs 8x fewer round trips through the (Python) daemon.
    """
    info = mount_at(path)
    if not info:
        return False
    try:
        Path(f"/sys/class/bdi/{info.device}/read_ahead_kb").write_text(str(kib))
        return True
    except OSError as exc:
        log.debug("cannot set read_ahead_kb of %s: %s", path, exc)
        return False


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid,
    it identifies a process even after its pid is recycled."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass



#: Where fs processes run. Never the snapshotter's own working directory: it may hold a ``remora/``
#: checkout (an operator starting the daemon from a source tree), and a mount must not keep a user's
#: directory busy.
CHILD_CWD = "/"


def fs_argv(python: str, *args: str) -> list[str]:
    """The command line of an fs process: ``python -P -m remora.snapshotter.fs ARGS``.

    ``-P`` (Python 3.11+, which remora requires) keeps the working directory off ``sys.path``: with
    plain ``-m`` a ``remora/`` folder in the cwd would shadow the installed package (an older
    checkout there broke every lazy mount with ``cannot import name '__version__'``). Not ``-I``:
    that would also drop PYTHONPATH and the user site, which a from-source install may rely on."""
    return [python, "-P", "-m", "remora.snapshotter.fs", *args]


def _at_idle_priority(argv: list[str]) -> list[str]:
    """``argv`` run at SCHED_IDLE, through util-linux's ``chrt`` (no preexec_fn in a threaded process);
    as is when there is no ``chrt``."""
    chrt = shutil.which("chrt")
    return [chrt, "--idle", "0", *argv] if chrt else argv


def _normal_priority(pid: int) -> None:
    """Back to the default policy: the spare now serves a mount."""
    os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


class MountManager:
    """Start/stop/check lazy mounts; one instance per snapshotter.

    ``state_dir`` holds the mount records; ``cache_dir``/``cache_limit`` configure the chunk cache
    of all mounts, ``cache_isolation`` how it is partitioned between tenants (:meth:`partition_for`;
    "none" here, for a caller that picks partitions itself; the snapshotter passes its option).
    All methods are thread-safe.
    """

    def __init__(self, state_dir: Path | str, cache_dir: Path | str, cache_limit: int = 10 << 30,
                 python: str = sys.executable, mount_timeout: float = 20.0, standby: bool = False,
                 read_only: bool = False, cache_isolation: str = "none", spares: int = DEFAULT_SPARES):
        """``read_only``: only look (``remora stats``): nothing is created, cleaned or started, so a
        reader can never disturb the snapshotter that owns ``state_dir`` (its spare, its logs)."""
        if cache_isolation not in CACHE_ISOLATION:
            raise InvalidInput(f"cache isolation {cache_isolation!r}: expected one of {', '.join(CACHE_ISOLATION)}")
        self.cache_isolation = cache_isolation
        # absolute: fs processes run in CHILD_CWD and get these paths in their spec
        self.state_dir = Path(os.path.abspath(state_dir)) / "mounts"
        self.cache_dir = Path(os.path.abspath(cache_dir))
        self.cache_limit = cache_limit
        self.python = python
        self.mount_timeout = mount_timeout
        self._lock = threading.Lock()  # guards the dicts below; held only briefly
        self._id_locks: dict[str, threading.RLock] = {}  # serialise mount/unmount/restore per id
        self._procs: dict[str, subprocess.Popen] = {}
        self._probes: dict[str, threading.Thread] = {}
        self._standby_enabled = standby and not read_only
        if not 1 <= spares <= MAX_SPARES:
            raise InvalidInput(f"spare fs processes: {spares}, expected 1 to {MAX_SPARES}")
        self.spares_wanted = spares
        # the warm spares, oldest (next to be claimed) first
        self._spares: list[_Spare] = []
        self._spare_lock = threading.Lock()
        self._spare_wake = threading.Event()   # set: the keeper looks at once (a claim, close)
        self._last_announced = float("-inf")   # monotonic time of the last prevalidate(): a mount coming
        self._stopped = threading.Event()      # set by close()
        self._closed = False
        if read_only:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_spare_logs()
        if self._standby_enabled:
            self._start_spare()
            threading.Thread(target=self._keep_spare, name="fs-spare-keeper", daemon=True).start()

    def _id_lock(self, mount_id: str) -> threading.RLock:
        with self._lock:
            return self._id_locks.setdefault(mount_id, threading.RLock())

    # -- files --------------------------------------------------------------------------------
    def _file(self, mount_id: str, suffix: str) -> Path:
        if not _ID_RE.match(mount_id):
            raise InvalidInput(f"bad mount id {mount_id!r}: use letters, digits, '.', '_', '-' (max 128)")
        return self.state_dir / f"{mount_id}{suffix}"

    def spec(self, mount_id: str) -> MountSpec:
        path = self._file(mount_id, ".json")
        if not path.exists():
            raise NotFound(f"no lazy mount {mount_id!r}")
        return MountSpec.load(path)

    def ids(self) -> list[str]:
        return sorted(p.name[:-5] for p in self.state_dir.glob("*.json") if not p.name.endswith(".stats.json"))

    def pid(self, mount_id: str) -> int | None:
        try:
            return int(self._file(mount_id, ".pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # -- cache partitions ---------------------------------------------------------------------
    def partition_for(self, mount_id: str, namespace: str | None = None, credential: object = None,
                      host: str = "") -> str:
        """The chunk cache partition of a new mount, by the manager's ``cache_isolation``:

        * ``none``: "" (one cache for everybody: a chunk fetched for one image serves every image
          naming its digest, whoever pulled it);
        * ``namespace``: ``ns-<containerd namespace>``;
        * ``credential``: ``cred-<hash of registry host and the identity used for the pull>`` (user
          name or identity token; anonymous pulls of a host share one partition).

        When the tenant is unknown (containerd sent no namespace; a mount re-created from labels
        only) the mount gets a throw-away partition of its own, dropped when it is unmounted: never
        another tenant's chunks."""
        if self.cache_isolation == "none":
            return ""
        if self.cache_isolation == "credential":
            user = getattr(credential, "username", "") or ""
            token = getattr(credential, "identity_token", "") or ""
            ident = "\0".join((host, user, hashlib.sha256(token.encode()).hexdigest() if token else ""))
            if host:
                return "cred-" + hashlib.sha256(ident.encode()).hexdigest()[:32]
        elif namespace:
            from remora.cache import check_partition

            try:
                return check_partition(f"ns-{namespace}")
            except InvalidInput:  # containerd's names always fit; anything else gets its own partition
                pass
        return f"{THROWAWAY_PREFIX}{mount_id}"[:128]

    # -- start --------------------------------------------------------------------------------
    def mount(self, mount_id: str, bootstrap: Path | str, mountpoint: Path | str, sources: Sequence[SourceSpec],
              *, prefetch: bool = True, prefetch_all: bool = False, **options) -> MountSpec:
        """Mount ``bootstrap`` read-only at ``mountpoint``, data from ``sources`` (tried in order).

        Returns once the mount answers; raises :class:`StorageError` with the process log if it fails.
        ``options`` are further :class:`MountSpec` fields (``max_gap``, ``parallel``, ...). Mounting an id
        that is already mounted and healthy returns its spec. Blocking (seconds): call it from a worker
        thread in async code (``await asyncio.to_thread(manager.mount, ...)``).
        """
        with self._id_lock(mount_id):
            if self._file(mount_id, ".json").exists():
                if self.check(mount_id).ok:
                    return self.spec(mount_id)
                self.unmount(mount_id)
            spec = MountSpec(id=mount_id, bootstrap=str(Path(bootstrap).resolve()),
                             mountpoint=os.path.abspath(mountpoint), cache_dir=str(self.cache_dir),
                             cache_limit=self.cache_limit, sources=list(sources),
                             stats_file=str(self._file(mount_id, ".stats.json")), prefetch=prefetch,
                             prefetch_all=prefetch_all, **options)
            if spec.validate_bootstrap:  # the fs process validates it before mounting: where it says so
                spec.validation_file = str(self._file(mount_id, ".validation"))
            if not sources:
                raise InvalidInput(f"mount {mount_id}: no blob source given")
            for other in self.ids():
                if other != mount_id and self.spec(other).mountpoint == spec.mountpoint:
                    raise InvalidInput(f"mount {mount_id}: {spec.mountpoint} is already used by mount {other}")
            spec.save(self._file(mount_id, ".json"))
            try:
                self._start(spec)
            except BaseException:
                self._forget(mount_id)  # a mount that never came up must not be "restored" later
                raise
            return spec

    # -- warm spare ---------------------------------------------------------------------------
    # A spare's log is named after the manager that started it (``spare-<pid>-<start time>-<token>.log``):
    # a spare never outlives its manager (EOF on stdin), so a spare log is stale exactly when the
    # process named in it is gone. Another manager on the same state (or a reader) can tell without
    # touching a live spare's log.
    def _spare_log_prefix(self) -> str:
        return f"spare-{os.getpid()}-{_start_time(os.getpid())}-"

    def _remove_stale_spare_logs(self) -> None:
        for path in self.state_dir.glob("spare-*.log"):
            parts = path.name[len("spare-"):-len(".log")].split("-")
            if len(parts) == 3 and parts[0].isdigit() and _start_time(int(parts[0])) == parts[1]:
                continue  # its manager (maybe another one on this state) is alive: so may its spare be
            path.unlink(missing_ok=True)

    @property
    def _spare(self) -> tuple[subprocess.Popen, Path, float] | None:
        """The spare the next mount takes: (process, log, monotonic start), or None."""
        with self._spare_lock:
            live = [sp for sp in self._spares if sp.proc.poll() is None]
        return (live[0].proc, live[0].log, live[0].started) if live else None

    def _start_spare(self, idle: bool = False) -> bool:
        """Start one spare fs process (imports done, waiting for a spec on stdin) unless there are
        ``spares_wanted`` live ones already; returns False if it could not be started.

        With ``idle`` (a successor, started while a cold start is under way and no other mount was
        announced: see SPARE_BURST_WINDOW) it runs at SCHED_IDLE until it is claimed: its imports
        (~0.5 CPU-second) take only cycles nobody else wants."""
        with self._spare_lock:
            if self._closed or sum(sp.proc.poll() is None for sp in self._spares) >= self.spares_wanted:
                return True
            log_path = self.state_dir / f"{self._spare_log_prefix()}{secrets.token_hex(6)}.log"
            ready_r, ready_w = os.pipe()  # the spare writes one byte there once its imports are done
            try:
                with open(log_path, "ab") as logf:
                    argv = fs_argv(self.python, "--standby", "--ready-fd", str(ready_w), "--cache-dir",
                                   str(self.cache_dir))
                    proc = subprocess.Popen(_at_idle_priority(argv) if idle else argv, stdin=subprocess.PIPE,
                                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=CHILD_CWD, pass_fds=(ready_w,))
            except OSError as exc:
                log.warning("cannot start a spare fs process (mounts start cold): %s", exc)
                log_path.unlink(missing_ok=True)
                os.close(ready_r)
                return False
            finally:
                os.close(ready_w)
            self._spares.append(_Spare(proc, log_path, time.monotonic(), ready_r))
            return True

    def prevalidate(self, bootstrap: Path | str) -> bool:
        """Ask a warm spare to validate ``bootstrap`` now (remora.format.validate, in the spare's own
        process), so that a mount of it with ``validate_bootstrap`` that this spare takes finds it done;
        any other process mounting it validates it itself. Never blocks on the spare. Mounts announced
        together (a burst) go to different spares, in the order the spares will be claimed."""
        with self._spare_lock:
            self._last_announced = time.monotonic()
            live = [sp for sp in self._spares if sp.proc.poll() is None and sp.proc.stdin is not None]
            if not live:
                return False
            spare = next((sp for sp in live if not sp.announced), live[0])
            spare.announced += 1
            proc = spare.proc
            try:
                _normal_priority(proc.pid)  # a mount is coming: the validation must not wait for idle CPU
                proc.stdin.write(f"validate {Path(bootstrap).resolve()}\n".encode())
                proc.stdin.flush()
            except OSError as exc:
                log.debug("spare fs process %d: no early validation (%s)", proc.pid, exc)
                return False
        return True

    def wait_spare(self, timeout: float = 10.0) -> bool:
        """Wait until the next spare has done its imports (True), it died, or ``timeout`` passed.

        Why: the snapshotter says it is ready (opens the pull service) only once a pull finds
        everything warm. Measured: a spare still importing when the first pull arrives (a node asked
        for a container the moment its daemons answer) takes ~0.25-0.5 CPU-second from that pull on
        a 2-core machine, and its mount then waits for the imports."""
        import select

        deadline = time.monotonic() + timeout
        with self._spare_lock:
            spare = next((sp for sp in self._spares if sp.proc.poll() is None), None)
            if spare is None:
                return False
            if spare.ready_fd is None:  # its byte was read already (or it was started without the pipe)
                return spare.proc.poll() is None
            while True:
                readable, _, _ = select.select([spare.ready_fd], [], [],
                                               max(0.0, min(0.2, deadline - time.monotonic())))
                if readable:
                    got = os.read(spare.ready_fd, 1)  # b"1": imports done; b"": it died before that
                    spare.close_ready_fd()
                    spare.ready = got == b"1"
                    return spare.ready and spare.proc.poll() is None
                if spare.proc.poll() is not None or time.monotonic() >= deadline:
                    return False

    def _keep_spare(self) -> None:
        """Keeper thread (standby mode): whenever there are fewer than ``spares_wanted`` live spares,
        start one.

        Woken at once after a claim; otherwise it looks every SPARE_POLL seconds, so a spare that died
        (killed, OOM, a bad install) is replaced. Spares that keep dying young are restarted with an
        exponential backoff (up to SPARE_MAX_BACKOFF) and their log tail logged, never in a tight loop."""
        backoff = 0.0
        while True:
            self._spare_wake.wait(SPARE_POLL)
            self._spare_wake.clear()
            with self._spare_lock:
                if self._closed:
                    return
                dead = [sp for sp in self._spares if sp.proc.poll() is not None]
                self._spares = [sp for sp in self._spares if sp.proc.poll() is None]
                missing = self.spares_wanted - len(self._spares)
            youngest = None
            for sp in dead:  # died unclaimed
                sp.close_ready_fd()
                lived = time.monotonic() - sp.started
                youngest = lived if youngest is None else min(youngest, lived)
                try:
                    tail = "\n".join(sp.log.read_text(errors="replace").splitlines()[-10:])
                except OSError:
                    tail = ""
                sp.log.unlink(missing_ok=True)
                log.warning("spare fs process %d exited (code %s) after %.1fs: starting another%s%s", sp.proc.pid,
                            sp.proc.returncode, lived, f" in {backoff:.1f}s" if backoff else "",
                            f"; its log:\n{tail}" if tail else "")
            if missing <= 0:
                continue
            if backoff and self._stopped.wait(backoff):
                return
            started_ok = all(self._start_spare(idle=not self.in_burst()) for _ in range(missing))
            crash_loop = not started_ok or (youngest is not None and youngest <= SPARE_YOUNG)
            backoff = min(max(2 * backoff, SPARE_POLL), SPARE_MAX_BACKOFF) if crash_loop else 0.0

    def in_burst(self) -> bool:
        """A mount was announced within SPARE_BURST_WINDOW: the next one may follow at once."""
        return time.monotonic() - self._last_announced < SPARE_BURST_WINDOW

    def _claim_spare(self, spec_path: Path, log_path: Path) -> subprocess.Popen | None:
        """Hand ``spec_path`` to a spare; returns its process, or None if there is no live spare.

        Either way the keeper is woken to start the next spare, once the handover is done."""
        with self._spare_lock:
            live = [sp for sp in self._spares if sp.proc.poll() is None]
            ready = [sp for sp in live if sp.is_ready()]
            # one that was told of a coming mount (it may have validated this very bootstrap), then any
            # that has done its imports, then the oldest (still importing: better than a cold start)
            spare = next((sp for sp in ready if sp.announced), ready[0] if ready else (live[0] if live else None))
            if spare is not None:
                self._spares.remove(spare)
                spare.close_ready_fd()
        try:
            return self._hand_over((spare.proc, spare.log, spare.started) if spare else None, spec_path, log_path)
        finally:
            self._spare_wake.set()

    @staticmethod
    def _hand_over(spare, spec_path: Path, log_path: Path) -> subprocess.Popen | None:
        if spare is None:
            return None
        proc, spare_log, _ = spare
        if proc.poll() is not None:
            spare_log.unlink(missing_ok=True)
            return None
        try:
            _normal_priority(proc.pid)  # before it reads the spec: the threads it starts inherit this
            os.replace(spare_log, log_path)  # it keeps writing to the same file, now under the mount's name
            proc.stdin.write(f"{spec_path}\n".encode())
            proc.stdin.close()
        except OSError as exc:
            log.warning("spare fs process %d did not take the mount (%s): starting one cold", proc.pid, exc)
            _kill_group(proc.pid)
            return None
        return proc

    def close(self) -> None:
        """Stop the spare (mount processes stay: running containers keep their root fs)."""
        with self._spare_lock:
            self._closed = True
            spares, self._spares = self._spares, []
        self._stopped.set()
        self._spare_wake.set()
        for sp in spares:
            sp.close_ready_fd()
            try:
                sp.proc.stdin.close()  # EOF: the spare exits by itself
            except OSError:
                pass
        for sp in spares:
            try:
                sp.proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill_group(sp.proc.pid)
            sp.log.unlink(missing_ok=True)

    def _start(self, spec: MountSpec) -> None:
        mnt = Path(spec.mountpoint)
        if mounted_fstype(mnt) is not None and not detach(mnt):
            raise StorageError(f"mount {spec.id}: {mnt} is still mounted and cannot be detached")
        mnt.mkdir(parents=True, exist_ok=True)
        log_path = self._file(spec.id, ".log")
        spec_path = self._file(spec.id, ".json")
        if spec.validation_file:  # a verdict is this process's or none (a re-mount validates again)
            Path(spec.validation_file).unlink(missing_ok=True)
        # A re-mount (restore after a crash) starts cold: it is off the cold-start path, and the
        # earlier process's log (why it died) must stay at the head of the mount's log.
        t0 = time.monotonic()
        proc = None if log_path.exists() or not self._standby_enabled else self._claim_spare(spec_path, log_path)
        how = "the warm spare" if proc is not None else "a new process"
        if proc is None:
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(fs_argv(self.python, "--spec", str(spec_path)),
                                        stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=CHILD_CWD)
        self._procs[spec.id] = proc
        self._file(spec.id, ".pid").write_text(f"{proc.pid} {_start_time(proc.pid)}")
        deadline = time.monotonic() + self.mount_timeout
        validating = spec.validate_bootstrap  # the mount timeout starts once the bootstrap is validated
        while mounted_fstype(mnt) != FSTYPE:
            if proc.poll() is not None:
                verdict = _read_verdict(spec)
                if verdict is not None and verdict.startswith("invalid: "):
                    # refused by remora.format.validate in the fs process: the same error as in-process
                    raise InvalidInput(verdict[len("invalid: "):])
                raise StorageError(f"mount {spec.id} failed (exit {proc.returncode}):\n{self.log_tail(spec.id)}")
            if validating:
                if _read_verdict(spec) is not None:
                    validating, deadline = False, time.monotonic() + self.mount_timeout
                elif time.monotonic() - t0 < VALIDATION_TIMEOUT:
                    time.sleep(0.002)
                    continue
            if time.monotonic() > deadline:
                self._kill(spec.id)
                raise StorageError(f"mount {spec.id}: not mounted after {self.mount_timeout:.0f}s:\n"
                                   f"{self.log_tail(spec.id)}")
            time.sleep(0.002)  # a mountinfo read is ~0.1 ms; the pull (and the container) waits for this
        t_mounted = time.monotonic()
        # In mountinfo before FUSE's INIT handshake is done: a first request waits for it, and only
        # after it may the readahead be set (INIT sets the negotiated one, which would undo ours).
        health = self.check(spec.id, timeout=max(1.0, deadline - time.monotonic()))
        if not health.ok:
            self._kill(spec.id)
            raise StorageError(f"mount {spec.id}: mounted but not answering ({health.detail}):\n"
                               f"{self.log_tail(spec.id)}")
        if spec.read_ahead_kb:
            set_read_ahead(mnt, spec.read_ahead_kb)
        log.info("lazy mount %s at %s (pid %d, %s): in mountinfo after %.3fs, answering after %.3fs", spec.id, mnt,
                 proc.pid, how, t_mounted - t0, time.monotonic() - t0)

    def log_tail(self, mount_id: str, lines: int = 30) -> str:
        try:
            return "\n".join(self._file(mount_id, ".log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- stop ---------------------------------------------------------------------------------
    def unmount(self, mount_id: str, timeout: float = 10.0) -> None:
        """Unmount (lazily if busy), stop the process, unpin its chunks and forget the mount."""
        with self._id_lock(mount_id):
            try:
                spec = self.spec(mount_id)
            except NotFound:
                return
            clean = detach(spec.mountpoint, lazy=False)
            if not clean and not detach(spec.mountpoint):  # busy: detach lazily
                raise StorageError(f"mount {mount_id}: cannot unmount {spec.mountpoint}")
            # after a clean unmount the process exits by itself once its cache writes are done; after a
            # lazy one it would keep serving the remaining open files, so it is told to stop at once
            self._kill(mount_id, grace=timeout, exiting=timeout if clean else 0.0)
            self._forget(mount_id)

    def _forget(self, mount_id: str) -> None:
        try:
            part = self.spec(mount_id).cache_partition
        except RemoraError:
            part = ""
        self._unpin(mount_id, part if part.startswith(THROWAWAY_PREFIX) else None)
        for suffix in (".json", ".pid", ".stats.json", ".log", ".validation"):
            self._file(mount_id, suffix).unlink(missing_ok=True)

    def unmount_all(self) -> None:
        for mount_id in self.ids():
            try:
                self.unmount(mount_id)
            except RemoraError as exc:
                log.error("%s", exc)

    def _unpin(self, mount_id: str, drop_partition: str | None = None) -> None:
        """Drop the mount's pins; ``drop_partition``: its throw-away cache partition goes too."""
        from remora.cache import ChunkCache

        cache = ChunkCache(self.cache_dir, self.cache_limit)
        try:
            cache.unpin(mount_id)
            if drop_partition:
                try:
                    cache.drop_partition(drop_partition)
                except InvalidInput as exc:
                    log.warning("cache partition of mount %s kept: %s", mount_id, exc)
        finally:
            cache.close()

    def _alive(self, mount_id: str) -> bool:
        proc = self._procs.get(mount_id)
        if proc is not None:
            return proc.poll() is None
        pid = self.pid(mount_id)
        if pid is None:
            return False
        try:  # an adopted process (we were restarted): check it is ours and not a zombie
            recorded = self._file(mount_id, ".pid").read_text().split()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if fields[0] == "Z":
            return False
        if len(recorded) > 1:  # pid + start time: the same process, not a recycled pid
            return fields[19] == recorded[1] and b"remora.snapshotter.fs" in cmdline
        return str(self._file(mount_id, ".json")).encode() in cmdline  # a record from an older version

    def _kill(self, mount_id: str, grace: float = 5.0, exiting: float = 0.0) -> None:
        """Stop the fs process: wait ``exiting`` seconds for it to leave by itself (after an unmount
        it finishes its cache writes and exits), then SIGTERM the group, SIGKILL after ``grace``."""
        pid = self.pid(mount_id)
        proc = self._procs.get(mount_id)

        def gone() -> bool:
            if proc is not None:
                return proc.poll() is not None
            return not self._alive(mount_id)

        try:
            if pid is None or self._wait(gone, exiting):
                return
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    return
                if self._wait(gone, wait):
                    return
        finally:
            self._procs.pop(mount_id, None)

    @staticmethod
    def _wait(predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- health -------------------------------------------------------------------------------
    def check(self, mount_id: str, timeout: float = 2.0) -> Health:
        """Is the mount alive and answering? Bounded by ``timeout`` even if the fs process hangs."""
        spec = self.spec(mount_id)
        if not self._alive(mount_id):
            return Health("dead", f"fs process {self.pid(mount_id)} is not running")
        if mounted_fstype(spec.mountpoint) != FSTYPE:
            return Health("unmounted", f"{spec.mountpoint} is not a remora mount")
        with self._lock:
            probe = self._probes.get(mount_id)
            if probe is not None and probe.is_alive():
                return Health("hung", "a previous liveness probe is still blocked")
            result: list = []
            probe = threading.Thread(target=self._probe, args=(spec.mountpoint, result), daemon=True,
                                     name=f"probe-{mount_id}")
            self._probes[mount_id] = probe
            probe.start()
        probe.join(timeout)
        if probe.is_alive():
            return Health("hung", f"no answer from {spec.mountpoint} within {timeout:.1f}s")
        err = result[0] if result else None
        if err in (errno.ENOENT, None):
            return Health("ok")
        if err in (errno.ENOTCONN, errno.ECONNABORTED):
            return Health("dead", f"{spec.mountpoint}: {os.strerror(err)}")
        return Health("dead", f"{spec.mountpoint}: unexpected {os.strerror(err)}")

    @staticmethod
    def _probe(mountpoint: str, result: list) -> None:
        try:
            os.stat(os.path.join(mountpoint, f".remora-liveness-{secrets.token_hex(8)}"))
            result.append(None)
        except OSError as exc:
            result.append(exc.errno)

    # -- restart ------------------------------------------------------------------------------
    def restore(self) -> dict[str, str]:
        """After a snapshotter restart: adopt live mounts, re-mount dead or stale ones.

        Returns ``{mount id: "adopted" | "remounted" | "failed: <reason>"}``.
        """
        out = {}
        for mount_id in self.ids():
            try:
                out[mount_id] = self.restore_mount(mount_id)
            except RemoraError as exc:
                log.error("restore of mount %s failed: %s", mount_id, exc)
                out[mount_id] = f"failed: {exc}"
        return out

    def restore_mount(self, mount_id: str) -> str:
        """Adopt mount ``mount_id`` if its process answers, else detach and re-mount it from its spec.

        Returns ``"adopted"`` or ``"remounted"``; raises :class:`NotFound` for an unknown id and
        :class:`StorageError` if the re-mount fails.
        """
        with self._id_lock(mount_id):
            health = self.check(mount_id)
            if health.ok:
                return "adopted"
            log.warning("mount %s is %s (%s): re-mounting", mount_id, health.state, health.detail)
            spec = self.spec(mount_id)
            if not spec.cache_partition and self.cache_isolation != "none":
                # a record from before cache partitions: its tenant is unknown, so it gets a partition
                # of its own rather than the shared one
                spec.cache_partition = self.partition_for(mount_id)
                spec.save(self._file(mount_id, ".json"))
            self._kill(mount_id, grace=2.0)
            if not detach(spec.mountpoint):
                raise StorageError(f"cannot detach stale mount {spec.mountpoint}")
            self._start(spec)
            return "remounted"

    # -- metrics ------------------------------------------------------------------------------
    def stats(self, mount_id: str) -> dict:
        """The counters the mount's process last published (``{}`` before the first write)."""
        return read_stats(self._file(mount_id, ".stats.json")) or {}

    def collector(self, cache=None) -> MountCollector:
        """A Prometheus collector over every mount's published counters (register it once)."""

        def mounts():
            for mount_id in self.ids():
                yield mount_id, self._file(mount_id, ".stats.json"), self._alive(mount_id)

        return MountCollector(mounts, cache)
