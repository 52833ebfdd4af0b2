// Phantom's dashboard. Plain JavaScript, no build step, no third-party code. It polls one
// snapshot (GET /api/v1/dashboard) and calls the ordinary action routes
// (POST /api/v1/<module>/<action>) for every change, with the operator's token.
// Everything from the daemon is written with textContent, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "phantom.admin.token";
  const HISTORY = 90; // points per chart (3 minutes at the default 2 s)

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let timer = null;
  let previous = null; // the last snapshot, for rates
  const series = { sentry: [], wgRx: [], wgTx: [], dpPass: [], dpDrop: [], dns: [] };

  // ---- formatting -------------------------------------------------------------------------
  const num = (n) => (n === null || n === undefined || Number.isNaN(n) ? "–" : Math.round(n).toLocaleString("en"));
  const dec = (n) => (n === null || n === undefined ? "–" : Number(n).toFixed(1));
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }
  const ago = (unix) => {
    if (!unix) return "never";
    const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
    return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  };

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  function rows(tbody, items, make, emptyText, columns) {
    const out = items.map(make);
    if (out.length === 0) {
      const tr = document.createElement("tr");
      const td = cell(emptyText, "empty");
      td.colSpan = columns;
      tr.append(td);
      out.push(tr);
    }
    tbody.replaceChildren(...out);
  }
  function text(id, value) { $(id).textContent = value; }
  function showRate(id, value, format) {
    if (value !== undefined) text(id, value === null ? "–" : format(value));
  }

  // ---- charts: one or two polylines in an SVG, no library ----------------------------------
  function push(list, v) {
    list.push(Math.max(0, v || 0));
    if (list.length > HISTORY) list.shift();
  }
  function chart(id, lines, format) {
    const svg = $(id);
    const max = Math.max(1, ...lines.flat());
    const peak = $(id + "-peak");
    if (peak) peak.textContent = "· peak " + (format || num)(Math.max(0, ...lines.flat()));
    const ns = "http://www.w3.org/2000/svg";
    const made = lines.map((points, i) => {
      const p = document.createElementNS(ns, "polyline");
      // Until the history is full the line spans what there is (since the page opened).
      const step = 300 / Math.max(1, Math.min(HISTORY, Math.max(...lines.map((l) => l.length))) - 1);
      p.setAttribute("points", points.map((v, j) => `${(j * step).toFixed(1)},${(58 - (v / max) * 56).toFixed(1)}`).join(" "));
      if (i > 0) p.setAttribute("class", "second");
      return p;
    });
    svg.replaceChildren(...made);
  }

  // ---- the API ------------------------------------------------------------------------------
  async function call(module, action, params) {
    const r = await fetch(`/api/v1/${encodeURIComponent(module)}/${encodeURIComponent(action)}`, {
      method: "POST",
      headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
      body: JSON.stringify(params || {}),
      cache: "no-store",
    });
    let body = null;
    try { body = await r.json(); } catch { body = { success: false, error: `HTTP ${r.status}` }; }
    if (r.status === 401) signOut("Your token was refused: " + (body.error || "unauthorized"));
    return body;
  }

  function toast(message, bad) {
    const p = document.createElement("p");
    p.textContent = message;
    if (bad) p.className = "bad";
    $("toast").append(p);
    setTimeout(() => p.remove(), bad ? 8000 : 4000);
  }

  // Runs an action and reports its outcome; refreshes the panels on success.
  async function act(module, action, params, done) {
    const reply = await call(module, action, params);
    if (reply.success) {
      toast(done || `${module} ${action}: done`);
      refresh();
    } else {
      toast(`${module} ${action}: ${reply.error || "failed"}${reply.code ? " (" + reply.code + ")" : ""}`, true);
    }
    return reply;
  }

  // ---- panels -------------------------------------------------------------------------------
  // Per-second change since the previous snapshot: undefined when this is the same snapshot
  // again (an action's refresh within the daemon's one-second cache), null when unknown.
  function rate(now, before, pick, seconds) {
    if (before && seconds < 1) return undefined;
    if (!before) return null;
    const a = pick(now), b = pick(before);
    if (a === null || a === undefined || b === null || b === undefined || a < b) return null;
    return (a - b) / seconds;
  }
  function panelError(part) { return part && part.error !== undefined && part.code !== undefined ? part : null; }

  function showSentry(p, seconds) {
    const s = p.status;
    const err = panelError(s);
    if (err) { text("sentry-rate", "off"); text("sentry-talkers", ""); return; }
    const mode = $("mode");
    mode.hidden = false;
    mode.textContent = s.current_mode;
    mode.className = "badge " + s.current_mode;
    // The selector follows the daemon's mode unless the operator is choosing one.
    const select = $("mode-select");
    if (document.activeElement !== select && select.dataset.shown !== s.current_mode) {
      select.value = s.current_mode;
      select.dataset.shown = s.current_mode;
    }
    text("sentry-rate", num(s.global_rate));
    text("sentry-mean", dec(s.stats.mean));
    text("sentry-threshold", s.stats.dynamic_threshold === null ? "learning" : dec(s.stats.dynamic_threshold));
    text("sentry-cpu", dec(s.cpu_percent) + " %");
    const failed = Object.values(s.challenges.failed || {}).reduce((a, b) => a + b, 0);
    text("sentry-challenged", num(s.requests.challenged));
    text("sentry-solved", num(s.challenges.solved));
    text("sentry-failed", num(failed));
    text("sentry-blocked", num(s.requests.blocked));
    text("whitelist-size", `${num(s.whitelist_size)} whitelisted`);
    if (seconds >= 1 || series.sentry.length === 0) push(series.sentry, s.global_rate);
    chart("sentry-chart", [series.sentry]);
    rows($("sentry-talkers"), s.top_talkers || [], (t) => {
      const tr = document.createElement("tr");
      tr.append(cell(t.address), cell(num(t.requests_5s), "num"), cell(num(t.kernel_packets_5s), "num"));
      return tr;
    }, "nobody", 3);
  }

  function clientRow(c) {
    const tr = document.createElement("tr");
    const conn = c.connection || {};
    const state = c.expired ? "expired" : !c.enabled ? "disabled" : c.connected ? "connected" : "idle";
    const st = cell(state, c.connected ? "state-on" : "state-off");
    const expires = c.expires_at ? new Date(c.expires_at * 1000).toLocaleString() : "never";
    tr.append(cell(c.name), cell(c.ip), st, cell(conn.latest_handshake || "never"),
      cell(bytes(c.rx_bytes), "num"), cell(bytes(c.tx_bytes), "num"), cell(expires));
    const actions = document.createElement("td");
    actions.className = "write";
    const button = (label, fn) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "plain";
      b.textContent = label;
      b.dataset.client = c.name;
      b.addEventListener("click", fn);
      actions.append(b);
    };
    button("QR", () => showQr(c.name));
    if (c.enabled) button("Disable", () => act("core", "disable_client", { client_name: c.name }, `${c.name} disabled`));
    else button("Enable", () => act("core", "enable_client", { client_name: c.name }, `${c.name} enabled`));
    button("Remove", () => {
      if (confirm(`Remove ${c.name}? Its keys are deleted.`)) act("core", "remove_client", { client_name: c.name }, `${c.name} removed`);
    });
    tr.append(actions);
    return tr;
  }

  function showWireguard(p, seconds) {
    const server = p.server, list = p.clients;
    if (panelError(server) || panelError(list)) { text("wg-clients", "off"); return; }
    text("wg-clients", num(server.clients.total_configured));
    text("wg-connected", num(server.clients.active_connections));
    const prev = previous && previous.panels.wireguard ? previous.panels.wireguard.server : null;
    const rx = rate(server, prev, (s) => s.interface.rx_bytes, seconds);
    const tx = rate(server, prev, (s) => s.interface.tx_bytes, seconds);
    showRate("wg-rx", rx, bytes);
    showRate("wg-tx", tx, bytes);
    if (typeof rx === "number") { push(series.wgRx, rx); push(series.wgTx, tx); }
    chart("wg-chart", [series.wgRx, series.wgTx], (n) => bytes(n) + "/s");
    rows($("wg-table"), list.clients || [], clientRow, "no clients yet", 8);
    text("wg-more", list.total > (list.clients || []).length
      ? `Showing ${(list.clients || []).length} of ${num(list.total)} clients; phantom-api core list_clients search=... finds the rest.` : "");
  }

  function showDatapath(p, seconds) {
    const c = p.counters, top = p.top_sources;
    if (panelError(c)) { text("dp-pps", "off"); return; }
    const prev = previous && previous.panels.datapath ? previous.panels.datapath.counters : null;
    const pps = rate(c, prev, (x) => x.totals && x.totals.packets, seconds);
    const dps = rate(c, prev, (x) => x.totals && x.totals.dropped, seconds);
    showRate("dp-pps", pps, num);
    showRate("dp-drops", dps, num);
    if (typeof pps === "number") { push(series.dpPass, pps); push(series.dpDrop, dps); }
    chart("dp-chart", [series.dpPass, series.dpDrop]);
    const drops = (c.counters || []).filter((x) => x.verdict === "drop")
      .concat((c.dns_filter || []).filter((x) => x.verdict === "nxdomain").map((x) => ({ reason: "dns_nxdomain", packets: x.packets })));
    rows($("dp-reasons"), drops, (d) => {
      const tr = document.createElement("tr");
      tr.append(cell(d.reason), cell(num(d.packets), "num"));
      return tr;
    }, "none", 2);
    if (panelError(top)) return;
    text("dp-tracked", num(top.tracked_sources));
    rows($("dp-sources"), top.sources || [], (s) => {
      const tr = document.createElement("tr");
      tr.append(cell(s.address), cell(num(s.packets), "num"), cell(s.last_seen_seconds_ago < 5 ? "active" : "seen " + Math.round(s.last_seen_seconds_ago) + " s ago"));
      return tr;
    }, "no traffic yet", 3);
  }

  function showDns(p, seconds) {
    const s = p.stats;
    if (panelError(s)) { text("dns-queries", "off"); text("dns-note", s.error); return; }
    const total = (x) => x.queries.udp + x.queries.tcp;
    const prev = previous && previous.panels.dns ? previous.panels.dns.stats : null;
    const qps = prev && !panelError(prev) ? rate(s, prev, total, seconds) : null;
    showRate("dns-qps", qps, num);
    text("dns-queries", num(total(s)));
    text("dns-blocked", num(s.blocked));
    const lookups = s.cache.hits + s.cache.misses;
    text("dns-hits", `${num(s.cache.hits)}${lookups ? " (" + Math.round((100 * s.cache.hits) / lookups) + " %)" : ""}`);
    if (typeof qps === "number") push(series.dns, qps);
    chart("dns-chart", [series.dns]);
    const b = s.bypass || {};
    text("dns-note", `${s.filtering ? "Filtering" : "Not filtering"}${s.dry_run ? " (dry run)" : ""}; cache ${num(s.cache.entries)} of ${num(s.cache.capacity)}; ${num(s.upstream_failures)} upstream failures. ` +
      `Kept on this resolver: DoH canary ${num(b.firefox_canary)}, Private Relay ${num(b.private_relay)}, DDR ${num(b.ddr)}, ECH removed ${num(b.ech_stripped)}.`);
  }

  function showBlocklist(p) {
    const s = p.status;
    if (panelError(s)) { text("bl-version", "off"); return; }
    text("bl-version", String(s.version));
    text("bl-entries", num(s.entries));
    text("bl-kernel", num(s.kernel_entries));
    rows($("bl-sources"), s.sources || [], (src) => {
      const tr = document.createElement("tr");
      tr.append(cell(src.name), cell(ago(src.last_success)), cell(num(src.entries), "num"),
        cell(src.error ? "failing: " + src.error : src.last_success ? "ok" : "not synced yet"));
      return tr;
    }, "no sources configured", 4);
  }

  const PANELS = { sentry: showSentry, wireguard: showWireguard, datapath: showDatapath, dns: showDns, blocklist: showBlocklist };

  function render(snap) {
    const seconds = previous ? snap.generated_at - previous.generated_at : 0;
    for (const [name, show] of Object.entries(PANELS)) {
      const section = $("panel-" + name);
      const hidden = (snap.hidden || []).includes(name);
      section.classList.toggle("off", hidden);
      section.querySelector(".hidden-note").hidden = !hidden;
      if (!hidden && snap.panels[name]) show(snap.panels[name], seconds);
    }
    document.body.classList.toggle("read-only", !snap.token.can_write);
    text("who", `${snap.token.name} (${snap.token.scope})`);
    text("updated", "updated " + new Date(snap.generated_at * 1000).toLocaleTimeString());
    // A rate needs two snapshots a second or more apart; a repeat of the same one keeps the old.
    if (!previous || seconds >= 1) previous = snap;
  }

  // The snapshot with `withToken`: {status, body}; status 0 when the daemon is unreachable.
  async function snapshot(withToken) {
    try {
      const r = await fetch("/api/v1/dashboard", { headers: { Authorization: "Bearer " + withToken }, cache: "no-store" });
      return { status: r.status, body: await r.json().catch(() => ({})) };
    } catch {
      return { status: 0, body: {} };
    }
  }

  let inFlight = false;
  async function refresh() {
    // A slow daemon never gets a second poll on top of the first.
    if (!token || inFlight) return;
    inFlight = true;
    const { status, body } = await snapshot(token).finally(() => { inFlight = false; });
    if (status === 0) text("updated", "the daemon is unreachable; retrying");
    else if (status === 401) signOut("Your token was refused: " + (body.error || "unauthorized"));
    else if (status !== 200) text("updated", `HTTP ${status}; retrying`);
    else render(body);
  }

  // ---- sign-in ------------------------------------------------------------------------------
  function start(refreshMs) {
    $("sign-in").hidden = true;
    $("dashboard").hidden = false;
    $("sign-out").hidden = false;
    clearInterval(timer);
    // A tab in the background costs the daemon nothing.
    timer = setInterval(() => { if (!document.hidden) refresh(); }, refreshMs || 2000);
  }

  function signOut(why) {
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    clearInterval(timer);
    previous = null;
    for (const k of Object.keys(series)) series[k] = [];
    $("dashboard").hidden = true;
    $("sign-out").hidden = true;
    $("mode").hidden = true;
    $("sign-in").hidden = false;
    text("who", "");
    text("updated", "");
    text("sign-in-error", why || "");
  }

  async function signIn(candidate) {
    text("sign-in-error", "");
    const { status, body } = await snapshot(candidate);
    if (status !== 200) {
      text("sign-in-error", status === 0 ? "The daemon is unreachable." : body.error || `HTTP ${status}`);
      return;
    }
    token = candidate;
    sessionStorage.setItem(TOKEN_KEY, token);
    render(body);
    start(body.refresh_ms);
  }

  // ---- actions ------------------------------------------------------------------------------
  async function showQr(name) {
    const reply = await call("core", "export_client", { client_name: name, qr: "png" });
    if (!reply.success) { toast(`QR for ${name}: ${reply.error}`, true); return; }
    text("qr-title", name);
    $("qr-image").src = "data:image/png;base64," + reply.data.qr_png;
    text("qr-config", reply.data.config || "");
    $("qr-dialog").showModal();
  }

  function onSubmit(id, handler) {
    $(id).addEventListener("submit", (e) => {
      e.preventDefault();
      const form = e.target;
      const op = e.submitter && e.submitter.value;
      handler(Object.fromEntries(new FormData(form)), op, form);
    });
  }

  function wire() {
    onSubmit("sign-in-form", (v) => signIn(v.token.trim()));
    $("sign-out").addEventListener("click", () => signOut("Signed out."));
    onSubmit("mode-form", (v) => act("sentry", "set_mode", { mode: v.mode }, `Sentry mode set to ${v.mode}`));
    onSubmit("whitelist-form", (v, op, form) => {
      const action = op === "remove" ? "whitelist_remove" : "whitelist_add";
      act("sentry", action, { ip: v.ip.trim() }).then((r) => r.success && form.reset());
    });
    onSubmit("add-client-form", async (v, _op, form) => {
      const name = v.client_name.trim();
      const params = { client_name: name };
      // A date from the picker: the end of that day, UTC (RFC 3339, as add_client takes it).
      if (v.expires) params.expires_at = `${v.expires}T23:59:59Z`;
      const r = await act("core", "add_client", params, `Client ${name} added`);
      if (r.success) { form.reset(); showQr(name); }
    });
    onSubmit("address-form", (v, op, form) => {
      const action = ["deny", "unblock", "allow", "disallow"].includes(op) ? op : "deny";
      act("datapath", action, { ip: v.ip.trim() }).then((r) => r.success && form.reset());
    });
    onSubmit("domain-form", (v, _op, form) => {
      const domain = v.domain.trim();
      act("blocklist", "add", { domain }, `${domain} blocked`).then((r) => r.success && form.reset());
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && token) refresh();
    });
    if (token) signIn(token);
  }

  wire();
})();
