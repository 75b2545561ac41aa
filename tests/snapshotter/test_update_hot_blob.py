"""An update does not download the new version's hot blob: its chunks are mostly in the cache already.

Two versions of an image converted independently WITH a prefetch list that names a file v2 changes:
v2's hot blob (the prefetch files' data blob, staged whole by the early prefetch on a first start)
then has a new digest, though nearly all of its chunks are v1's. The real snapshotter, a private
containerd, ``remora pull`` and ``ctr run``; registry traffic through a counting proxy. What must
hold: v2 runs v2's content, and what v2 fetched of its hot blob is only its changed frames (before:
the whole blob, staged as for a first start). v1, on a node that has no version yet, still stages its
hot blob whole (the first-start path is unchanged).
"""
from __future__ import annotations

import random
import uuid

import pytest
import requests
from lazy_support import CountingProxy
from test_lazy_versions import blob_fetches

from remora.converter.convert import ConvertOptions, convert
from remora.procutil import wait_until
from remora.snapshotter.pull import pull
from remora_testing.imagebuild import File, LayerSpec, busybox_layer, tar_of_files, write_image

MIB = 1 << 20
HOT = ["/app/run.sh", "/app/version", "/app/data.bin"]


def app_layer(version: int) -> bytes:
    data = random.Random(7).randbytes(3 * MIB)  # the same in both versions: most of the hot blob
    return tar_of_files({"app/run.sh": File(b"#!/bin/sh\ncat /app/version && sha256sum /app/data.bin\n", mode=0o755),
                         "app/version": File(f"app version {version}\n".encode()),
                         "app/data.bin": File(data)})


@pytest.mark.timeout(180)
def test_update_fetches_only_the_changed_part_of_its_hot_blob(registry, snapshotter_proc, containerd, tmp_path):
    repo = f"update-hot/app-{uuid.uuid4().hex[:10]}"
    hot_list = tmp_path / "hot.txt"
    hot_list.write_text("\n".join(HOT) + "\n")
    for v in (1, 2):
        write_image(f"{registry.host}/{repo}:{v}", None, [LayerSpec(busybox_layer()), LayerSpec(app_layer(v))],
                    config={"Cmd": ["/app/run.sh"]})
        convert(f"{registry.host}/{repo}:{v}", f"{registry.host}/{repo}:{v}-remora",
                ConvertOptions(progress=False, prefetch_list=HOT))
    manifests = {v: requests.get(f"{registry.url}/v2/{repo}/manifests/{v}-remora", timeout=10,
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
                 for v in (1, 2)}
    hot = {v: manifests[v]["layers"][0] for v in (1, 2)}  # the prefetch files' blob comes first
    assert all(int(hot[v]["annotations"].get("containerd.io/snapshot/remora.prefetch-bytes", 0)) for v in (1, 2))
    assert hot[1]["digest"] != hot[2]["digest"], "v2 changed a prefetched file: a new hot blob"

    with CountingProxy(registry.url) as px:
        fetched = {}
        for v in (1, 2):
            ref = f"{px.host}/{repo}:{v}-remora"
            pull(ref, address=str(containerd.address), namespace=containerd.namespace)
            out = containerd.ctr("run", "--rm", "--snapshotter", "remora", ref, f"u{v}-{uuid.uuid4().hex[:6]}",
                                 timeout=60).stdout
            assert f"app version {v}" in out, out
            # the background prefetch and staging are done when the hot blob's bytes stop growing
            seen = [-1]

            def settled(seen=seen) -> bool:
                n = sum((e - s + 1) if s is not None else 0 for _, s, e in blob_fetches(px.blob_requests()))
                same, seen[0] = n == seen[0], n
                return same
            wait_until(settled, 30, interval=0.5, what="the registry traffic to settle")
            fetched[v] = blob_fetches(px.blob_requests())
            px.reset()

    def hot_bytes(v: int) -> int:
        return sum(e - s + 1 if s is not None else hot[v]["size"]
                   for d, s, e in fetched[v] if d == hot[v]["digest"])

    assert hot_bytes(1) >= hot[1]["size"], "a first start stages its hot blob whole"
    assert 0 < hot_bytes(2) < hot[2]["size"] // 4, (
        f"v2 fetched {hot_bytes(2)} of its {hot[2]['size']}-byte hot blob: only the changed frames should go")
