// remora manager console: plain JS over the REST API (no build step). Values are inserted with
// textContent only, so nothing a member reports (hostnames, errors) can inject markup.
"use strict";

const KEY = "remora-manager-token";
let token = sessionStorage.getItem(KEY) || "";

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + token } });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(path + ": HTTP " + r.status + " " + detail);
  }
  return r.json();
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function fill(id, rows, render) {
  const body = document.querySelector("#" + id + " tbody");
  const fresh = document.createElement("tbody");
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.id !== undefined ? row.id : row.digest;
    render(tr, row);
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function when(ts) { return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : ""; }

function memberRow(tr, m) {
  cell(tr, m.id); cell(tr, m.hostname); cell(tr, m.ip + ":" + m.port); cell(tr, m.cluster_id);
  cell(tr, m.state, "state state-" + m.state); cell(tr, (m.stats || {}).load); cell(tr, m.version);
  cell(tr, when(m.last_seen));
}

async function refresh() {
  if (!token) { document.getElementById("error").textContent = "enter a token"; return; }
  try {
    const [me, clusters, members, jobs, blobs] = await Promise.all([
      api("/api/v1/whoami"), api("/api/v1/clusters"), api("/api/v1/members"), api("/api/v1/jobs"),
      api("/api/v1/blobs")]);
    document.getElementById("whoami").textContent = me.user + " (" + me.role + ")";
    fill("clusters", clusters, (tr, c) => {
      cell(tr, c.id); cell(tr, c.name); cell(tr, c.is_default ? "yes" : "");
      cell(tr, (c.scopes.idc || []).join(", ")); cell(tr, c.scopes.location);
      cell(tr, (c.scopes.cidrs || []).join(", ")); cell(tr, (c.scopes.hostnames || []).join(", "));
    });
    fill("schedulers", members.filter(m => m.type === "scheduler"), memberRow);
    fill("seed-peers", members.filter(m => m.type === "seed_peer"), memberRow);
    fill("peers", members.filter(m => m.type === "peer"), memberRow);
    fill("jobs", jobs, (tr, j) => {
      cell(tr, j.id); cell(tr, j.type); cell(tr, j.state, "state state-" + j.state);
      cell(tr, j.args.image || (j.args.blobs || []).length + " blobs");
      const td = cell(tr, "");
      for (const n of j.nodes || []) {
        const div = document.createElement("div");
        div.className = "node"; div.dataset.hostname = n.hostname; div.dataset.state = n.state;
        const bar = document.createElement("progress");
        bar.max = n.bytes_total || 1; bar.value = n.bytes_verified || 0;
        div.appendChild(bar);
        const label = document.createElement("span");
        label.textContent = " " + n.hostname + " " + n.state + " " + n.bytes_verified + "/" + n.bytes_total + " B"
          + (n.attempts > 1 ? " (attempt " + n.attempts + ")" : "") + (n.error ? " — " + n.error : "");
        div.appendChild(label);
        td.appendChild(div);
      }
      cell(tr, j.error);
    });
    fill("blobs", blobs, (tr, b) => { cell(tr, b.digest); cell(tr, b.size); cell(tr, b.nodes.join(", ")); });
    document.getElementById("error").textContent = "";
    document.body.dataset.loaded = String(Date.now());
  } catch (e) {
    document.getElementById("error").textContent = e.message;
  }
}

document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem(KEY, token);
  refresh();
});
refresh();
setInterval(refresh, 2000);
