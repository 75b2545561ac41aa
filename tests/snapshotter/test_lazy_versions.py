"""Version 2 after version 1: the registry serves v2's bootstrap and only the chunks that changed.

The real path end to end: two versions of an image (same busybox base; the app layer of v2 changes
one 1 MiB region of a 4 MiB file and one small file, and adds a file) are converted by ``remora
convert`` independently (no chunk dictionary: v2's unchanged chunks sit in v2's own blobs at other
offsets, so only a content-addressed cache can avoid fetching them again), pulled with ``remora pull``
into a private containerd whose ``remora`` snapshotter mounts them lazily, and run with ``ctr run``,
the workload reading every file of the image. All registry traffic goes through a loopback counting
proxy, whose log of blob requests is compared with what the two bootstraps say changed.
"""
from __future__ import annotations

import hashlib
import random
import sqlite3
import uuid
from pathlib import Path

import pytest
import requests
from lazy_support import CountingProxy

from remora.cache import ChunkCache
from remora.converter.convert import ConvertOptions, convert
from remora.procutil import wait_until
from remora.snapshotter.pull import pull
from remora_testing.imagebuild import File, LayerSpec, busybox_layer, tar_of_files, write_image

MIB = 1 << 20
# read every file of the image (so every chunk a version needs is fetched), then show what v2 is
WORKLOAD = ["sh", "-c", "find / -xdev -type f -exec cat {} + >/dev/null && cat /app/version && sha256sum /app/lib.bin"]


def app_layer(version: int) -> tuple[bytes, bytes]:
    """The app layer's tar and its lib.bin. v2: MiB 1 of lib.bin rewritten, one static file changed, one new."""
    rng = random.Random(2024)
    lib = bytearray(rng.randbytes(4 * MIB))  # incompressible: fetched bytes are real chunk bytes
    files = {f"app/static/page{i:02d}.html":
             File((f"<p>page {i} ".encode() + rng.randbytes(6000).hex().encode())[:20000]) for i in range(40)}
    files["app/version"] = File(f"app version {version}\n".encode())
    files["app/run.sh"] = File(b"#!/bin/sh\nexec cat /app/version\n", mode=0o755)
    if version == 2:
        lib[MIB:2 * MIB] = random.Random(2).randbytes(MIB)
        files["app/static/page07.html"] = File(b"<p>page 7, rewritten for v2</p>\n" * 300)
        files["app/static/new.html"] = File(b"<p>new in v2</p>\n" * 200)
    files["app/lib.bin"] = File(bytes(lib))
    return tar_of_files(files), bytes(lib)


def frames_of(db: Path) -> tuple[set[bytes], dict[int, tuple[str, int, int]], dict[int, set[bytes]]]:
    """(chunk digests, frame id -> (blob digest, offset, csize), frame id -> its chunk digests)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        frames = {fid: (digest, off, csize) for fid, digest, off, csize in con.execute(
            "SELECT f.id, b.digest, f.offset, f.csize FROM frames f JOIN blobs b ON b.id = f.blob")}
        members: dict[int, set[bytes]] = {}
        for digest, frame in con.execute("SELECT digest, frame FROM chunks"):
            members.setdefault(frame, set()).add(bytes(digest))
    finally:
        con.close()
    return {d for ds in members.values() for d in ds}, frames, members


def blob_fetches(requests: list[str]) -> list[tuple[str, int | None, int | None]]:
    """(blob digest, start, end inclusive) of each blob GET the proxy saw; start/end None = whole blob."""
    out = []
    for line in requests:
        rng, _, path = line.partition(" ")
        digest = path.rsplit("/blobs/", 1)[1].split("?")[0]
        if rng.startswith("bytes="):
            start, _, end = rng[len("bytes="):].partition("-")
            out.append((digest, int(start), int(end)))
        else:
            out.append((digest, None, None))
    return out


@pytest.mark.timeout(120)
def test_v2_fetches_only_its_bootstrap_and_changed_chunks(registry, snapshotter_proc, containerd):
    repo = f"versions/app-{uuid.uuid4().hex[:10]}"
    libs = {}
    for v in (1, 2):
        tar, libs[v] = app_layer(v)
        write_image(f"{registry.host}/{repo}:{v}", None, [LayerSpec(busybox_layer()), LayerSpec(tar)],
                    config={"Cmd": ["/app/run.sh"]})
        convert(f"{registry.host}/{repo}:{v}", f"{registry.host}/{repo}:{v}-remora", ConvertOptions(progress=False))

    manifests = {v: requests.get(f"{registry.url}/v2/{repo}/manifests/{v}-remora", timeout=10,
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
                 for v in (1, 2)}
    boots = {v: manifests[v]["layers"][-1]["digest"] for v in (1, 2)}
    dbs = {v: snapshotter_proc.root / "bootstraps" / f"{boots[v].replace(':', '-')}.db" for v in (1, 2)}
    cache = ChunkCache(snapshotter_proc.root / "cache", partition=f"ns-{containerd.namespace}")  # --cache-isolation

    with CountingProxy(registry.url) as px:
        outputs, fetched = {}, {}
        for v in (1, 2):
            ref = f"{px.host}/{repo}:{v}-remora"
            pull(ref, address=str(containerd.address), namespace=containerd.namespace)
            outputs[v] = containerd.ctr("run", "--rm", "--snapshotter", "remora", ref, f"v{v}-{uuid.uuid4().hex[:6]}",
                                        *WORKLOAD, timeout=60).stdout
            fetched[v] = blob_fetches(px.blob_requests())
            px.reset()
            if v == 1:  # readers get their bytes before the chunks reach the disk cache: let the writes land
                v1_chunks = frames_of(dbs[1])[0]
                wait_until(lambda v1_chunks=v1_chunks: all(cache.contains(d) for d in v1_chunks), 30,
                           what="v1 chunks in the cache")

    # the containers saw each version's exact content
    for v in (1, 2):
        assert f"app version {v}" in outputs[v]
        assert hashlib.sha256(libs[v]).hexdigest() in outputs[v]

    # both versions were mounted lazily: no layer was downloaded whole, only bootstrap and config
    for v in (1, 2):
        whole = sorted(d for d, s, _ in fetched[v] if s is None)
        assert whole == sorted({boots[v], manifests[v]["config"]["digest"]}), \
            f"v{v} fetched whole blobs {whole}, expected only its bootstrap and config"
    assert boots[2] != boots[1]

    _, frames2, members2 = frames_of(dbs[2])
    changed = {fid for fid, ds in members2.items() if ds - v1_chunks}
    unchanged = set(frames2) - changed
    assert changed and unchanged, "the two versions must share some frames and differ in others"

    ranges = [(d, s, e) for d, s, e in fetched[2] if s is not None]
    assert ranges, "v2 read changed files but fetched no chunk"

    # every byte of every range belongs to a changed frame, and every changed frame was fetched
    def frames_hit(d: str, s: int, e: int) -> set[int]:
        return {fid for fid, (blob, off, size) in frames2.items() if blob == d and off <= e and off + size - 1 >= s}

    hit = set().union(*(frames_hit(*r) for r in ranges))
    assert not hit & unchanged, f"v2 fetched frames whose chunks v1 already brought: {sorted(hit & unchanged)}"
    assert hit == changed, f"changed frames never fetched: {sorted(changed - hit)}"
    range_bytes = sum(e - s + 1 for _, s, e in ranges)
    assert range_bytes == sum(frames2[f][2] for f in changed), "ranges include bytes outside the changed frames"

    # and that is a small part of what a full pull of v2 would move
    v2_data = sum(size for _, _, size in frames2.values())
    assert range_bytes < 0.4 * v2_data, f"v2 fetched {range_bytes} of {v2_data} data bytes"
