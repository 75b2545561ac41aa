"""``remora check IMAGE``: verify every digest and the tree of a remora image.

Checks, in order: manifest, config and bootstrap digests (on fetch); the bootstrap's validation
(remora.format.validate, when the image is opened: a bootstrap that fails it is exit 3 before any
other check) and its SQLite integrity; every data blob's digest and tar framing; every frame lies
inside its blob's payload and decompresses to its size; every chunk's sha256; the tree (every entry
points at an inode, every regular file's extents cover exactly its size with valid chunks, link counts
match, prefetch entries exist). Problems are collected, not raised one by one, so one run lists them all.
"""
from __future__ import annotations

import sqlite3
import stat
from collections import Counter
from dataclasses import dataclass, field

from remora.converter.image import LocalBlobs, RemoraImage
from remora.errors import RemoraError
from remora.format.blob import TAR_HEADER_SIZE, read_payload_header, verify_chunk
from remora.format.sqlguard import database_error


@dataclass
class CheckResult:
    blobs: int = 0
    frames: int = 0
    chunks: int = 0
    inodes: int = 0
    entries: int = 0
    bytes_verified: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(image: RemoraImage, blobs: LocalBlobs) -> CheckResult:
    res = CheckResult()
    bs = image.bootstrap
    # The bootstrap passed remora.format.validate when the image was opened (schema, tree, ranges);
    # this connection is the reader's guarded one (read-only, trusted_schema=OFF, work budget).
    db = bs.connection()
    try:
        try:
            verdict = db.execute("PRAGMA integrity_check(20)").fetchone()[0]
        except sqlite3.Error as exc:
            raise database_error(exc, f"bootstrap {bs.path.name}") from None
        if verdict != "ok":
            res.problems.append(f"bootstrap integrity: {verdict}")
        table = bs.chunk_table()
        payload = {}
        for digest, size in table.blobs:
            res.blobs += 1
            try:
                path = blobs.path(digest)
            except RemoraError as exc:
                res.problems.append(str(exc))
                continue
            with open(path, "rb") as f:
                head = f.read(TAR_HEADER_SIZE)
            try:
                payload[digest] = read_payload_header(head)
            except RemoraError as exc:
                res.problems.append(f"blob {digest}: {exc}")
            if path.stat().st_size != size:
                res.problems.append(f"blob {digest}: {path.stat().st_size} bytes, bootstrap says {size}")
        by_frame: dict[int, list] = {}
        for cid, c in enumerate(table.chunks):
            by_frame.setdefault(c.frame, []).append((cid, c))
        for fid, f in enumerate(table.frames):
            res.frames += 1
            blob = table.blobs[f.blob][0]
            if blob not in payload:
                continue
            if f.offset < TAR_HEADER_SIZE or f.offset + f.csize > TAR_HEADER_SIZE + payload[blob]:
                res.problems.append(f"frame {fid}: [{f.offset}, +{f.csize}) outside blob {blob} payload")
                continue
            try:
                data = blobs.frame(blob, f.offset, f.csize, f.usize)
                for cid, c in by_frame.get(fid, []):
                    if c.frame_offset + c.size > len(data):
                        res.problems.append(f"chunk {cid}: outside frame {fid}")
                        continue
                    verify_chunk(data[c.frame_offset:c.frame_offset + c.size], c.digest, f"chunk {cid}")
                    res.chunks += 1
                    res.bytes_verified += c.size
            except RemoraError as exc:
                res.problems.append(str(exc))
        _check_tree(bs, db, len(table.chunks), res)
    finally:
        db.close()
    return res


def _check_tree(bs, db, n_chunks: int, res: CheckResult) -> None:
    inodes = {row[0]: row for row in db.execute("SELECT ino, mode, size, nlink FROM inodes")}
    res.inodes = len(inodes)
    if 1 not in inodes or not stat.S_ISDIR(inodes[1][1]):
        res.problems.append("root inode 1 is missing or not a directory")
        return
    refs = Counter()
    subdirs = Counter()
    for parent, name, ino in db.execute("SELECT parent, name, ino FROM dirents"):
        res.entries += 1
        if ino not in inodes:
            res.problems.append(f"entry {name!r} in dir {parent} points at missing inode {ino}")
            continue
        if parent not in inodes or not stat.S_ISDIR(inodes[parent][1]):
            res.problems.append(f"entry {name!r} has parent {parent}, which is not a directory")
        if not name or b"/" in name or name in (b".", b".."):
            res.problems.append(f"unsafe entry name {name!r} in dir {parent}")
        refs[ino] += 1
        if stat.S_ISDIR(inodes[ino][1]):
            subdirs[parent] += 1
    for ino, mode, size, nlink in inodes.values():
        if stat.S_ISDIR(mode):
            want = 2 + subdirs[ino]
            if ino != 1 and refs[ino] != 1:
                res.problems.append(f"directory inode {ino} has {refs[ino]} entries (must be 1)")
        else:
            want = refs[ino]
            if want == 0:
                res.problems.append(f"inode {ino} is not reachable from any directory")
        if nlink != want:
            res.problems.append(f"inode {ino}: nlink {nlink}, expected {want}")
        if stat.S_ISREG(mode):
            covered = 0
            for off, cid in bs.extents(ino, db):
                if off != covered:
                    res.problems.append(f"inode {ino}: extent at {off}, expected {covered}")
                    break
                if not 0 <= cid < n_chunks:
                    res.problems.append(f"inode {ino}: chunk id {cid} out of range")
                    break
                covered += bs.extent(off, cid, db).chunk.size
            else:
                if covered != size:
                    res.problems.append(f"inode {ino}: extents cover {covered} bytes, size is {size}")
    for ino in bs.prefetch_inodes():
        if ino not in inodes:
            res.problems.append(f"prefetch list names missing inode {ino}")
