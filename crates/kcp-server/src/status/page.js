"use strict";
// Refreshes the page from status.json once a second. URLs are built from location.origin:
// a page opened as http://user:token@host/ must not put credentials into fetch() URLs; the
// browser re-sends the Basic credentials it already holds for this origin.
const REFRESH_MS = 1000;
const COLORS = ["#2b6cb0", "#1f9d55", "#d97706", "#c53030", "#805ad5", "#0d9488", "#b7791f", "#4a5568"];
const $ = (id) => document.getElementById(id);
const url = (path) => new URL(path, location.origin).toString();

function fmtSecs(s) {
  if (s === null || s === undefined) return "";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + " s";
  return Math.round(s / 60) + " min";
}
function fmtNum(n) { return n === null || n === undefined ? "–" : n.toLocaleString("en"); }
function clockIn(secs) {
  const t = new Date(Date.now() + secs * 1000);
  return t.toLocaleTimeString("en-GB");
}

function stateCell(k) {
  const label = {
    available: "serving", cooling: "cooling", limited: "limited",
    circuit_open: "circuit open", throttled: "throttled", disabled: "disabled",
  }[k.status] || k.status;
  let detail = "";
  if (k.status === "disabled") {
    detail = "why: " + (k.disabled_reason || "unknown");
    detail += k.next_probe_secs === null || k.next_probe_secs === undefined
      ? "; no re-check (operator)"
      : "; re-check in " + fmtSecs(k.next_probe_secs);
  } else if (k.blocked_secs > 0) {
    detail = "until " + clockIn(k.blocked_secs) + " (in " + fmtSecs(k.blocked_secs) + ")";
  }
  return `<span class="state state-${k.status}">${label}</span>` +
    (detail ? `<span class="detail">${esc(detail)}</span>` : "");
}

function limitsCell(l) {
  const part = (rem, lim, unit) => lim === null ? "" : `${fmtNum(rem)} / ${fmtNum(lim)} ${unit}`;
  const parts = [part(l.remaining_requests, l.limit_requests, "req"),
    part(l.remaining_tokens, l.limit_tokens, "tok")].filter(Boolean);
  return parts.length ? parts.join("<br>") : '<span class="muted">not learned yet</span>';
}

function paceCell(l) {
  if (l.pace_rps === null || l.pace_rps === undefined) return '<span class="muted">–</span>';
  return `${l.pace_rps.toFixed(2)}/s<span class="detail">×${l.pace_factor.toFixed(2)}</span>`;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function actions(k) {
  const b = (action, text) =>
    `<button data-action="${action}" data-name="${esc(k.name)}">${text}</button>`;
  const out = [];
  out.push(k.status === "disabled" ? b("enable", "enable") : b("disable", "disable"));
  if (k.status === "disabled" && k.next_probe_secs !== null && k.next_probe_secs !== undefined) {
    out.push(b("recheck", "re-check now"));
  }
  return out.join("");
}

function renderTotals(data) {
  const t = data.totals;
  const stats = [
    ["keys", t.keys.total], ["serving", t.keys.available], ["cooling", t.keys.cooling],
    ["limited", t.keys.limited + t.keys.throttled], ["circuit open", t.keys.circuit_open],
    ["disabled", t.keys.disabled], ["requests", t.requests], ["429s", t.rate_limited],
    ["errors", t.errors], ["in flight", t.in_flight], ["req/s now", t.rps.toFixed(1)],
  ];
  $("totals").innerHTML = stats.map(([name, value]) =>
    `<div class="stat" data-stat="${name}"><b>${value}</b><span>${name}</span></div>`).join("");
}

function renderRows(data) {
  $("empty").hidden = data.keys.length > 0;
  $("rows").innerHTML = data.keys.map((k) => `
    <tr class="key-row" data-name="${esc(k.name)}" data-status="${k.status}">
      <td><span class="name">${esc(k.name)}</span><span class="fp">${esc(k.fingerprint)}</span>
        <span class="detail">${esc(k.url)}</span></td>
      <td>${stateCell(k)}</td>
      <td>${limitsCell(k.limits)}</td>
      <td>${paceCell(k.limits)}</td>
      <td class="num">${fmtNum(k.requests)}</td>
      <td class="num">${fmtNum(k.outcomes.rate_limited)}</td>
      <td class="num">${fmtNum(k.errors)}</td>
      <td class="num">${k.in_flight}</td>
      <td class="num">${k.latency_ms === null ? "–" : k.latency_ms.toFixed(0) + " ms"}</td>
      <td class="num">${k.health}</td>
      <td class="admin-only">${actions(k)}</td>
    </tr>`).join("");
}

function renderChart(data) {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const h2 = data.history;
  const series = data.keys.map((k) => h2.keys[k.name] || []);
  const n = h2.capacity;
  const max = Math.max(1, ...series.flat());
  ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#6b7385"; ctx.font = "11px system-ui";
  for (let i = 0; i <= 4; i++) {
    const y = pad / 2 + (h - pad) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText((max * (4 - i) / 4).toFixed(1), 0, y + 4);
  }
  series.forEach((points, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 2; ctx.beginPath();
    points.forEach((v, j) => {
      const x = pad + (w - pad) * (n - points.length + j) / Math.max(1, n - 1);
      const y = pad / 2 + (h - pad) * (1 - v / max);
      if (j === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  });
  $("window").textContent = `(last ${Math.round(n * h2.interval_secs / 60)} min, every ${h2.interval_secs} s)`;
  $("legend").innerHTML = data.keys.map((k, i) =>
    `<span><i style="background:${COLORS[i % COLORS.length]}"></i>${esc(k.name)}</span>`).join("");
}

async function refresh() {
  try {
    const response = await fetch(url("status.json"), { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error("status.json: HTTP " + response.status);
    const data = await response.json();
    document.body.classList.toggle("admin", data.admin);
    renderTotals(data);
    renderRows(data);
    renderChart(data);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB") +
      (data.draining ? " · draining" : "");
    $("error").hidden = true;
  } catch (e) {
    $("error").textContent = String(e.message || e);
    $("error").hidden = false;
  }
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  button.disabled = true;
  const path = `admin/keys/${encodeURIComponent(button.dataset.name)}/${button.dataset.action}`;
  try {
    const response = await fetch(url(path), { method: "POST", credentials: "same-origin" });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "HTTP " + response.status);
    }
  } catch (e) {
    $("error").textContent = String(e.message || e);
    $("error").hidden = false;
  }
  await refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
