"""``remora place plan --preheat`` against two real peers and a real registry (127.0.0.1 only).

The spec forces one function per node (each needs 3 GiB of a 4 GiB node): a remora image on one, an
OCI image on the other; after the command every blob of each node's image is verified in that node's
peer store, and the JSON reports every pair succeeded.
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from peer_util import make_layer, push_image, start_peer, unique
from test_peer_preheat import TOKEN, push_remora_image

SPEC = """\
version: 1
network:
  nodes:
    - {{name: n1, cpu: "4", memory: 4Gi, peer: "{p1}"}}
    - {{name: n2, cpu: "4", memory: 4Gi{p2}}}
  links:
    - {{a: n1, b: n2, bandwidth: 1Gbps, delay: 2ms}}
users: {{n1: 5}}
application:
  name: pre
  functions:
    - {{name: a, cpu: 1ms, memory: 3Gi, image: "{img_a}", calls: {{b: 1Ki}}}}
    - {{name: b, cpu: 1ms, memory: 3Gi, image: "{img_b}"}}
"""


async def run(*argv) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "remora.cli", *argv,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


async def test_place_preheat_two_real_peers(tmp_path, fresh_registry):
    reg = fresh_registry
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    peers = [await start_peer(tmp_path, f"n{i}", registries=[reg.host], preheat_token_file=token_file)
             for i in (1, 2)]
    try:
        repo_a, repo_b = unique("place/remora"), unique("place/oci")
        remora_img = push_remora_image(reg.url, repo_a, "v1")
        oci_img = push_image(reg.url, repo_b, "v1", [make_layer({"app": b"x" * 300_000}), make_layer({"etc": b"y"})])
        img_a, img_b = f"{reg.host}/{repo_a}:v1", f"{reg.host}/{repo_b}:v1"
        spec = tmp_path / "spec.yaml"
        # n2's peer comes from --peer (the way for inputs without a peer field)
        spec.write_text(SPEC.format(p1=peers[0].mirror_url, p2="", img_a=img_a, img_b=img_b))

        # without n2's peer: a clear input error before anything is fetched
        code, out, err = await run("place", "plan", str(spec), "--preheat", "--preheat-token-file", str(token_file))
        assert code == 3 and "no peer address for node(s) n2" in err, (code, err)

        code, out, err = await run("place", "plan", str(spec), "--json", "--preheat", "--preheat-token-file",
                                   str(token_file), "--peer", f"n2={peers[1].mirror_url}")
        assert code == 0, err
        plan = json.loads(out)
        by_node = {d["node"]: d["image"] for d in plan["deploy"]}
        assert sorted(by_node) == ["n1", "n2"] and sorted(by_node.values()) == sorted([img_a, img_b])
        assert [r["state"] for r in plan["preheat"]] == ["succeeded", "succeeded"], plan["preheat"]
        want = {img_a: list(remora_img["digests"].values()),
                img_b: [*oci_img["layers"], oci_img["config_digest"]]}
        for peer, node in zip(peers, ("n1", "n2")):
            for digest in want[by_node[node]]:
                entry = peer.store.get(digest)
                assert entry is not None and entry.verified, (node, digest)
            other = want[img_b if by_node[node] == img_a else img_a]
            assert all(peer.store.get(d) is None for d in other), node   # only what the plan puts there
        # the peers answer the task list with the place-created tasks
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.get(f"{peers[0].mirror_url}/api/v1/tasks") as r:
                assert [t["id"][:6] for t in (await r.json())["tasks"]] == ["place-"]

        # --pull is a step of the preheat; peers without --runtime-pull-api refuse it, per node, clearly
        code, out, err = await run("place", "plan", str(spec), "--pull", "--peer", f"n2={peers[1].mirror_url}")
        assert code == 2 and "--pull is a step of the preheat" in err, (code, err)
        code, out, err = await run("place", "plan", str(spec), "--preheat", "--pull", "--preheat-token-file",
                                   str(token_file), "--peer", f"n2={peers[1].mirror_url}")
        assert code == 1, (code, out, err)
        assert "preheat: 0 of 2" in out and out.count("--runtime-pull-api") == 2, out

        # a wrong token: every pair fails, exit 1, reported per node
        token_file.write_text("z" * 40)
        code, out, err = await run("place", "plan", str(spec), "--preheat", "--preheat-token-file", str(token_file),
                                   "--peer", f"n2={peers[1].mirror_url}")
        assert code == 1, (code, out, err)
        assert "preheat: 0 of 2" in out and "refused" in out
    finally:
        for p in peers:
            await p.stop()
