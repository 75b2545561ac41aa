"""The console in real headless Chromium (Debian's chromium + chromium-driver) shows what the API says."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from fake_peer import FakePeer
from manager_util import wait_for
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from remora.plugins.manager.client import ManagerClient

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
         "--disable-dev-shm-usage"]


@pytest.fixture
def browser():
    os.environ["SE_AVOID_STATS"] = "true"  # selenium must not phone home
    profile = tempfile.mkdtemp(prefix="remora-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)   # the profile is this test's alone: nothing left in /tmp


def rows(driver, table_id: str) -> list[list[str]]:
    """The table's cells, read in one script call (the console re-renders every 2 s)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'))"
        ".map(tr => Array.from(tr.querySelectorAll('td')).map(td => td.textContent));", table_id)


def job_nodes(driver) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#jobs tbody tr .node')).map(d => ({"
        "host: d.dataset.hostname, state: d.dataset.state, text: d.textContent,"
        "value: d.querySelector('progress').value, max: d.querySelector('progress').max}));")


def test_console_shows_what_the_api_shows(manager_factory, browser):
    manager = manager_factory(keepalive_interval=30)
    east = manager.ok("POST", "/api/v1/clusters", json={"name": "east", "scopes": {"idc": ["idc-1"],
                                                                                  "cidrs": ["10.0.0.0/8"]}})
    manager.ok("POST", "/api/v1/clusters", json={"name": "west", "is_default": True})
    join = manager.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
    ManagerClient(manager.url, join).register(type="scheduler", hostname="sched-1", ip="127.0.0.1", port=8002,
                                              cluster="east", version="9.9")
    fake = FakePeer("good", polls_before_done=0)
    try:
        pc = ManagerClient(manager.url, join)
        pc.register(type="peer", hostname="node-x", ip="127.0.0.1", port=fake.port, api_port=fake.port,
                    version="<b>1.0</b>")
        pc.keepalive(load=7)
        wait_for(lambda: any(m["stats"].get("load") == 7 for m in manager.ok("GET", "/api/v1/members")),
                 timeout=10, what="batched keepalive written")
        blob = {"digest": "sha256:" + "c" * 64, "size": 4096}
        job = manager.ok("POST", "/api/v1/jobs", json={"type": "preheat", "blobs": [blob],
                                                       "repository": "registry.local/app",
                                                       "scope": {"kind": "all_peers"}})
        wait_for(lambda: manager.ok("GET", f"/api/v1/jobs/{job['id']}")["state"] == "succeeded", timeout=30,
                 what="job succeeded")

        browser.get(manager.url + "/")
        assert browser.current_url.endswith("/console/")
        browser.find_element(By.ID, "token").send_keys(manager.root)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_for(lambda: browser.find_element(By.ID, "whoami").text == "root (root)", timeout=20, what="console login")

        api_clusters = manager.ok("GET", "/api/v1/clusters")
        wait_for(lambda: len(rows(browser, "clusters")) == len(api_clusters), timeout=10, what="cluster rows")
        got = rows(browser, "clusters")
        assert [(r[0], r[1], r[2]) for r in got] == [(str(c["id"]), c["name"], "yes" if c["is_default"] else "")
                                                     for c in api_clusters]
        assert got[0][3] == "idc-1" and got[0][5] == "10.0.0.0/8"

        members = manager.ok("GET", "/api/v1/members")
        for table, typ in (("schedulers", "scheduler"), ("peers", "peer"), ("seed-peers", "seed_peer")):
            want = [(str(m["id"]), m["hostname"], f"{m['ip']}:{m['port']}", str(m["cluster_id"] or ""), m["state"])
                    for m in members if m["type"] == typ]
            assert [tuple(r[:5]) for r in rows(browser, table)] == want, table
        sched = rows(browser, "schedulers")[0]
        assert sched[3] == str(east["id"]) and sched[6] == "9.9"
        peer = rows(browser, "peers")[0]
        assert peer[1] == "node-x" and peer[5] == "7" and peer[6] == "<b>1.0</b>"  # text, not markup
        assert browser.execute_script("return document.querySelectorAll('#peers b').length") == 0

        api_jobs = manager.ok("GET", "/api/v1/jobs")
        jrows = rows(browser, "jobs")
        assert [(r[0], r[1], r[2]) for r in jrows] == [(str(j["id"]), j["type"], j["state"]) for j in api_jobs]
        nodes = job_nodes(browser)
        assert [(d["host"], d["state"]) for d in nodes] == [(n["hostname"], n["state"]) for n in api_jobs[0]["nodes"]]
        assert "4096/4096 B" in nodes[0]["text"] and nodes[0]["value"] == nodes[0]["max"] == 4096
        assert rows(browser, "blobs") == [[blob["digest"], "4096", "node-x"]]

        # the console follows the API: take the scheduler offline and the page shows it
        manager.ok("POST", f"/api/v1/members/{members[0]['id']}/offline", json={})
        wait_for(lambda: rows(browser, "schedulers")[0][4] == "offline", timeout=15, what="console refresh")

        # a bad token is shown as an error, not an empty page
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys("rmt_wrong")
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_for(lambda: "HTTP 401" in browser.find_element(By.ID, "error").text, timeout=10, what="error shown")
    finally:
        fake.stop()
