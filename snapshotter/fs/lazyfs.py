"""FUSE operations of the lazy filesystem (mfusepy, one thread per request).

Binding choice by measurement (``benchmarks/bench_fuse_binding.py``): mfusepy costs ~100 µs per cold
lookup and ~240 µs per open+close against pyfuse3's ~180/550 µs on this machine, with equal read
concurrency; container start is dominated by exactly those requests.

mfusepy exposes libfuse's high-level, path-based API. Paths are resolved to bootstrap inodes through
a memo of ``path -> ino``: the kernel always looks a directory up before its children, so resolving a
path costs one indexed SQLite query (``lookup(parent, name)``). Inode numbers, link counts and
``rdev`` come from the bootstrap (``use_ino``), so hard links show as one inode with ``st_nlink`` > 1.

Nothing here touches the network except :meth:`LazyFS.read`. Read-only and immutable, so the kernel
may cache everything for a long time: entry/attr timeouts are long and ``kernel_cache`` keeps file
pages across opens. Names are bytes in the bootstrap; mfusepy passes them as ``str`` decoded with
``surrogateescape``, which ``os.fsencode`` reverses exactly (non-UTF-8 names survive).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from functools import wraps

import mfusepy

from remora.errors import NotFound, RemoraError
from remora.format.bootstrap import ROOT_INO, Bootstrap, InodeRecord
from remora.snapshotter.fetch import ChunkFetcher
from remora.snapshotter.metrics import OpLatency

log = logging.getLogger(__name__)

_PATH_MEMO_MAX = 200_000


def _op(name: str):
    """Time an operation into the latency histogram; turn unexpected errors into EIO (logged)."""

    def deco(fn):
        @wraps(fn)
        def wrapper(self, *args):
            t0 = time.perf_counter()
            try:
                return fn(self, *args)
            except mfusepy.FuseOSError:
                raise
            except RemoraError as exc:
                log.error("%s %s: %s", name, args[0] if args else "", exc)
                raise mfusepy.FuseOSError(errno.EIO) from None
            except Exception:
                log.exception("%s %s failed", name, args[0] if args else "")
                raise mfusepy.FuseOSError(errno.EIO) from None
            finally:
                self.latency.observe(name, time.perf_counter() - t0)

        return wrapper

    return deco


class LazyFS(mfusepy.Operations):
    """Read-only view of one bootstrap; file data via ``fetcher``."""

    use_ns = True

    def __init__(self, bootstrap: Bootstrap, fetcher: ChunkFetcher, latency: OpLatency | None = None):
        self.bootstrap = bootstrap
        self.fetcher = fetcher
        self.latency = latency or OpLatency()
        self._paths: dict[str, int] = {"/": ROOT_INO}
        self._recs: dict[int, InodeRecord] = {}  # the tree is immutable: a record never changes
        self._xattr_inodes = bootstrap.xattr_inodes()
        self._dirs: dict[int, list[tuple[str, dict]]] = {}
        self._dir_lock = threading.Lock()
        self._next_dh = 1
        st = bootstrap.stats()
        self._statfs = {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (st["bytes"] + 4095) // 4096,
                        "f_bfree": 0, "f_bavail": 0, "f_files": st["inodes"], "f_ffree": 0, "f_favail": 0,
                        "f_namemax": 255}

    # -- helpers ------------------------------------------------------------------------------
    def _record(self, path: str) -> InodeRecord:
        ino = self._paths.get(path)
        if ino is not None:
            rec = self._recs.get(ino)
            if rec is not None:
                return rec
        with self.bootstrap.pooled() as db:
            return self._resolve(path, db)

    def _resolve(self, path: str, db) -> InodeRecord:
        ino = self._paths.get(path)
        if ino is not None:
            rec = self._recs.get(ino)
            if rec is None:
                try:
                    rec = self.bootstrap.getattr(ino, db)
                except NotFound:
                    raise mfusepy.FuseOSError(errno.ENOENT) from None
                self._remember(path, rec)
            return rec
        parent, _, name = path.rpartition("/")
        prec = self._resolve(parent or "/", db)
        if not stat.S_ISDIR(prec.mode):
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        rec = self.bootstrap.lookup(prec.ino, os.fsencode(name), db)
        if rec is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        self._remember(path, rec)
        return rec

    def _remember(self, path: str, rec: InodeRecord) -> None:
        if len(self._paths) >= _PATH_MEMO_MAX:  # bounded memos (dict ops are atomic under the GIL)
            self._paths.clear()
            self._paths["/"] = ROOT_INO
            self._recs.clear()
        self._paths[path] = rec.ino
        self._recs[rec.ino] = rec

    @staticmethod
    def _attrs(rec: InodeRecord) -> dict:
        return {"st_ino": rec.ino, "st_mode": rec.mode, "st_nlink": rec.nlink, "st_uid": rec.uid,
                "st_gid": rec.gid, "st_size": rec.size, "st_rdev": rec.rdev,
                "st_blocks": (rec.size + 511) // 512 if stat.S_ISREG(rec.mode) else 0, "st_blksize": 4096,
                "st_atime": rec.mtime_ns, "st_mtime": rec.mtime_ns, "st_ctime": rec.mtime_ns}

    # -- metadata: bootstrap only -------------------------------------------------------------
    @_op("getattr")
    def getattr(self, path, fh=None):
        return self._attrs(self._record(path))

    @_op("readlink")
    def readlink(self, path):
        rec = self._record(path)
        if not stat.S_ISLNK(rec.mode):
            raise mfusepy.FuseOSError(errno.EINVAL)
        return os.fsdecode(rec.target or b"")

    @_op("opendir")
    def opendir(self, path):
        # (Not ENOSYS as open does: libfuse's high-level API keeps its own directory handle in fh.)
        rec = self._record(path)
        if not stat.S_ISDIR(rec.mode):
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        entries = [(".", {"st_mode": stat.S_IFDIR, "st_ino": rec.ino}, 0), ("..", {"st_mode": stat.S_IFDIR}, 0)]
        prefix = path.rstrip("/") + "/"
        with self.bootstrap.pooled() as db:
            children = self.bootstrap.readdir(rec.ino, db=db)
        for name, child in children:
            sname = os.fsdecode(name)
            entries.append((sname, {"st_mode": child.mode, "st_ino": child.ino}, 0))
            self._remember(prefix + sname, child)
        with self._dir_lock:
            dh = self._next_dh
            self._next_dh += 1
            self._dirs[dh] = entries
        return dh

    @_op("readdir")
    def readdir(self, path, fh):
        return self._dirs.get(fh, [])

    @_op("releasedir")
    def releasedir(self, path, fh):
        with self._dir_lock:
            self._dirs.pop(fh, None)
        return 0

    # Overlayfs asks its lower layers for trusted.overlay.* on every lookup, and exec asks for
    # security.capability: the kernel does not cache xattrs, so each is a round trip to this process.
    # An image without any xattr answers ENOSYS, which makes the kernel stop asking for good (callers
    # then see EOPNOTSUPP, as on a filesystem without xattr support); otherwise only the inodes
    # that have xattrs touch the bootstrap. (listxattr still answers: an empty list.)
    @_op("getxattr")
    def getxattr(self, path, name, position=0):
        if not self._xattr_inodes:
            raise mfusepy.FuseOSError(errno.ENOSYS)
        ino = self._record(path).ino
        if ino not in self._xattr_inodes:
            raise mfusepy.FuseOSError(errno.ENODATA)
        with self.bootstrap.pooled() as db:
            value = self.bootstrap.xattrs(ino, db).get(name)
        if value is None:
            raise mfusepy.FuseOSError(errno.ENODATA)
        return value

    @_op("listxattr")
    def listxattr(self, path):  # rare (copy-up, archivers): an honest empty list, no ENOSYS
        ino = self._record(path).ino
        if ino not in self._xattr_inodes:
            return []
        with self.bootstrap.pooled() as db:
            return sorted(self.bootstrap.xattrs(ino, db))

    @_op("statfs")
    def statfs(self, path):
        return dict(self._statfs)

    @_op("access")
    def access(self, path, amode):
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        self._record(path)
        return 0

    # -- data ---------------------------------------------------------------------------------
    # open answers ENOSYS (FUSE_NO_OPEN_SUPPORT): the kernel then stops sending OPEN and RELEASE for
    # good and opens files itself, with keep_cache set. A read-only, immutable tree needs no per-open
    # state (writes are refused by the read-only mount before they get here), and every open of a
    # container's start-up (the interpreter, its libraries, each module) saves two round trips.
    @_op("open")
    def open(self, path, flags):
        raise mfusepy.FuseOSError(errno.ENOSYS)

    @_op("read")
    def read(self, path, size, offset, fh):
        rec = self._record(path)
        if not stat.S_ISREG(rec.mode):
            raise mfusepy.FuseOSError(errno.EISDIR if stat.S_ISDIR(rec.mode) else errno.EINVAL)
        return self.fetcher.read(rec.ino, offset, size)

    @_op("release")
    def release(self, path, fh):
        return 0
