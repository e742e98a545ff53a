// The dashboard: reads the admin API with the user's token, re-reads when the live feed
// (GET /v1/events, read with fetch so the token travels in the Authorization header) says
// something changed, and sends the deployment commands. The DOM is built with
// createElement/textContent only: nothing from the API is ever parsed as HTML.
import {
  barSegments, canOperate, countdown, deploymentActions, fragmentWithout, parseFragment,
  phaseLabel, runningDeployment, sparkline, sseParser,
} from "./lib.js";

const TOKEN_KEY = "bluegreen.token";
const SVG = "http://www.w3.org/2000/svg";
const state = { token: null, role: null, name: null, services: [], proxies: [], deployment: null, refreshing: null, again: false };

// ---------------------------------------------------------------------------------------------
// Small DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  for (const child of children.flat()) if (child != null) node.append(child);
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function time(epochSeconds) {
  return epochSeconds == null ? "" : new Date(epochSeconds * 1000).toLocaleTimeString();
}

function iso(text) {
  return text ? new Date(text).toLocaleString() : "";
}

// ---------------------------------------------------------------------------------------------
// API

async function api(method, path) {
  const response = await fetch(path, { method, headers: { Authorization: `Bearer ${state.token}` } });
  if (response.status === 401) { forgetToken("that token was refused; paste another one"); throw new Error("unauthorized"); }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${method} ${path}: HTTP ${response.status}`);
  return body;
}

async function command(label, method, path) {
  if (!window.confirm(`${label}?`)) return;
  try {
    await api(method, path);
    showError("");
  } catch (err) {
    showError(`${label}: ${err.message}`);
  }
  refresh();
}

// ---------------------------------------------------------------------------------------------
// Token and role

function takeToken() {
  const params = parseFragment(location.hash);
  if (params.token) {
    sessionStorage.setItem(TOKEN_KEY, params.token);
    // Out of the address bar (and the history) at once.
    history.replaceState(null, "", location.pathname + fragmentWithout(location.hash, "token"));
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function forgetToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  document.getElementById("login").hidden = false;
  document.getElementById("signout").hidden = true;
  document.getElementById("view").replaceChildren();
  showError(message || "");
}

async function signIn() {
  state.token = takeToken();
  if (!state.token) { forgetToken(""); return; }
  document.getElementById("login").hidden = true;
  document.getElementById("signout").hidden = false;
  const me = await api("GET", "/v1/whoami");
  state.role = me.role; state.name = me.name;
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  document.body.dataset.role = me.role;
  listen();
  refresh();
}

// ---------------------------------------------------------------------------------------------
// Live feed: one fetch() kept open; each event only says "re-read". Reconnects with backoff.

async function listen() {
  if (state.listening) return;  // one feed per tab, whichever token is current
  state.listening = true;
  const live = document.getElementById("live");
  let delay = 1000;
  while (state.token) {
    try {
      const response = await fetch("/v1/events", { headers: { Authorization: `Bearer ${state.token}` } });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      live.textContent = "live"; live.className = "live on";
      delay = 1000;
      const parser = sseParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (parser.feed(value).length) refresh();
      }
    } catch (_) { /* shown below; retried */ }
    live.textContent = "reconnecting"; live.className = "live off";
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 30000);
    refresh();  // what happened while the feed was down
  }
  state.listening = false;
}

// One refresh at a time; changes during one cause exactly one more.
async function refresh() {
  if (!state.token) return;
  if (state.refreshing) { state.again = true; return; }
  state.refreshing = (async () => {
    do {
      state.again = false;
      try {
        await load();
        render();
      } catch (err) {
        if (err.message !== "unauthorized") showError(err.message);
      }
    } while (state.again);
  })();
  await state.refreshing;
  state.refreshing = null;
}

async function load() {
  const view = parseFragment(location.hash);
  if (view.view === "proxies") state.proxies = (await api("GET", "/v1/proxies")).proxies;
  else if (view.view === "deployment" && view.id) state.deployment = await api("GET", `/v1/deployments/${encodeURIComponent(view.id)}`);
  else state.services = (await api("GET", "/v1/services")).services;
}

function render() {
  const view = parseFragment(location.hash);
  const root = document.getElementById("view");
  if (view.view === "proxies") root.replaceChildren(proxiesView(state.proxies));
  else if (view.view === "deployment" && state.deployment) root.replaceChildren(deploymentView(state.deployment));
  else root.replaceChildren(servicesView(state.services));
  tick();
}

// Countdowns run on the page's clock: no request per second.
function tick() {
  for (const node of document.querySelectorAll("[data-deadline]")) {
    node.textContent = countdown(Date.parse(node.dataset.deadline), Date.now());
  }
}

// ---------------------------------------------------------------------------------------------
// Views

function weightBar(service) {
  const weights = { blue: service.environments.blue.weight, green: service.environments.green.weight };
  const bar = el("div", { class: "bar", "data-testid": "weights" });
  for (const s of barSegments(weights, 100)) {
    const version = service.environments[s.env].version || "";
    const segment = el("div", { class: `segment ${s.env}`, title: `${s.env} ${version} ${s.weight}%`, text: s.w >= 15 ? `${s.env} ${version} ${s.weight}%` : "" });
    segment.style.width = `${s.w}%`;  // CSSOM, which the page's Content-Security-Policy allows
    bar.append(segment);
  }
  return bar;
}

function chart(caption, values, threshold, format) {
  const width = 160; const height = 34;
  const { path, scaleY } = sparkline(values, width, height, threshold || 0);
  const box = svg("svg", { class: "spark", viewBox: `0 0 ${width} ${height}` });
  if (threshold != null) box.append(svg("line", { x1: 0, x2: width, y1: scaleY(threshold), y2: scaleY(threshold) }));
  if (path) box.append(svg("path", { d: path }));
  const last = values.filter((v) => v != null).at(-1);
  return el("figure", {}, box, el("figcaption", { text: `${caption}: ${last == null ? "–" : format(last)}` + (threshold != null ? ` (max ${format(threshold)})` : "") }));
}

function analysisCharts(d) {
  const intervals = d.intervals || [];
  if (!intervals.length) return null;
  const analysis = (d.spec && d.spec.analysis) || {};
  return el("div", { class: "charts", "data-testid": "charts" },
    chart("error rate", intervals.map((i) => i.error_rate ?? null), analysis.max_error_rate, (v) => `${(v * 100).toFixed(2)}%`),
    chart("p99", intervals.map((i) => i.p99_ms ?? null), analysis.max_p99_ms, (v) => `${v.toFixed(0)} ms`));
}

function actionButtons(service, d) {
  if (!canOperate(state.role)) return null;
  const buttons = deploymentActions(d).map((action) => el("button", {
    type: "button", "data-action": action, class: ["rollback", "abort"].includes(action) ? "danger" : null, text: action,
    onclick: () => command(`${action} ${d.id}`, "POST", `/v1/deployments/${encodeURIComponent(d.id)}/${action}`),
  }));
  if (!d) {
    buttons.push(el("button", {
      type: "button", "data-action": "rollback", class: "danger", text: "rollback",
      onclick: () => command(`roll back ${service.name}`, "POST", `/v1/services/${encodeURIComponent(service.name)}/rollback`),
    }));
  }
  return el("div", { class: "actions" }, buttons);
}

function convergencePill(c) {
  const cls = c.rejecting.length ? "bad" : c.converged ? "ok" : "warn";
  const parts = [`${c.acked}/${c.proxies} proxies current`];
  if (c.lagging.length) parts.push(`lagging: ${c.lagging.join(", ")}`);
  if (c.rejecting.length) parts.push(`rejecting: ${c.rejecting.join(", ")}`);
  return el("span", { class: `pill ${cls}`, "data-testid": "convergence", text: parts.join("; ") });
}

function serviceCard(service) {
  const d = runningDeployment(service);
  const last = d || ["blue", "green"].map((e) => service.environments[e].deployment).filter((x) => x && x.spec)
    .sort((a, b) => (b.deployed_at || "").localeCompare(a.deployed_at || ""))[0];
  return el("article", { class: "card", "data-service": service.name },
    el("h2", {}, service.name, el("small", { text: `${service.domains.join(", ")} ${service.prefix}` })),
    weightBar(service),
    el("div", { class: "row" },
      ...["blue", "green"].map((env) => el("span", { class: "pill", "data-env": env,
        text: `${env}: ${service.environments[env].version || "–"} · ${service.environments[env].weight}%` })),
      convergencePill(service.convergence)),
    el("div", { class: "row" },
      el("span", { "data-testid": "phase", text: phaseLabel(d) }),
      d && d.deadline && d.paused_remaining == null ? el("span", { class: "muted" }, "next in ", el("span", { "data-deadline": d.deadline })) : null,
      last ? el("a", { href: `#view=deployment&id=${encodeURIComponent(last.id)}`, text: last.id }) : null),
    d ? analysisCharts(d) : null,
    actionButtons(service, d));
}

function servicesView(services) {
  if (!services.length) return el("p", { class: "muted", text: "No services yet." });
  return el("div", { class: "cards", "data-testid": "services" }, services.map(serviceCard));
}

function table(headers, rows, testid) {
  return el("table", { "data-testid": testid },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c ?? ""))))));
}

function deploymentView(d) {
  const analysis = (d.spec && d.spec.analysis) || null;
  const smoke = d.history.filter((e) => (e.status === "ready" && e.actor === "automatic") || e.reason.startsWith("smoke"));
  const migrations = d.history.filter((e) => /migration/.test(e.reason));
  const fake = { name: d.service, environments: {} };
  return el("div", { "data-testid": "deployment" },
    el("p", {}, el("a", { href: "#view=services", text: "← services" })),
    el("article", { class: "card" },
      el("h2", {}, d.id, el("small", { text: `${d.service} · ${d.version} in ${d.environment}` })),
      el("div", { class: "row" }, el("span", { class: "pill", text: d.status }), el("span", { text: phaseLabel(d.spec ? d : null) }),
        d.deadline ? el("span", { class: "muted" }, "deadline in ", el("span", { "data-deadline": d.deadline })) : null,
        d.reason ? el("span", { class: "pill bad", text: d.reason }) : null),
      analysisCharts(d),
      d.spec && d.status !== "decommissioned" ? actionButtons(fake, ["deploying", "ready", "shifting"].includes(d.status) || d.baking ? d : null) : null),
    el("h3", { text: "Timeline" }),
    table(["time", "status", "actor", "reason"], d.history.map((e) => [iso(e.at), e.status, e.actor, e.reason]), "timeline"),
    el("h3", { text: "Analysis intervals" + (analysis ? ` (max error rate ${analysis.max_error_rate}, max p99 ${analysis.max_p99_ms ?? "–"} ms, min requests ${analysis.min_requests})` : "") }),
    table(["time", "requests", "error rate", "p99 ms", "prometheus", "verdict", "reason"],
      (d.intervals || []).slice().reverse().map((i) => [time(i.at), String(i.requests ?? ""), i.error_rate == null ? "" : i.error_rate.toFixed(4),
        i.p99_ms == null ? "" : i.p99_ms.toFixed(1), prometheusCell(i.prometheus), i.verdict || "", i.reason || ""]), "intervals"),
    el("h3", { text: "Smoke tests" }),
    table(["time", "result"], smoke.map((e) => [iso(e.at), e.reason]), "smoke"),
    el("h3", { text: "Migrations" }),
    table(["time", "what"], migrations.map((e) => [iso(e.at), e.reason]), "migrations"));
}

// "errors = 3 (max 5)" per query; the error text when Prometheus did not answer.
function prometheusCell(results) {
  return (results || []).map((r) => {
    const bounds = [r.max != null ? `max ${r.max}` : null, r.min != null ? `min ${r.min}` : null].filter(Boolean).join(", ");
    return r.error ? `${r.name}: ${r.error}` : `${r.name} = ${r.value} (${bounds})`;
  }).join("; ");
}

function proxiesView(proxies) {
  const fleets = new Map();
  for (const p of proxies) {
    if (!fleets.has(p.fleet)) fleets.set(p.fleet, []);
    fleets.get(p.fleet).push(p);
  }
  if (!fleets.size) return el("p", { class: "muted", text: "No proxy is connected." });
  return el("div", { "data-testid": "proxies" }, [...fleets].map(([fleet, list]) => [
    el("h3", { text: `fleet ${fleet}` }),
    table(["node", "protocol", "replica", "connected", "state", "ACKed versions", "last NACK"], list.map((p) => {
      const nacks = Object.entries(p.types).filter(([, t]) => t.last_nack).map(([type, t]) => `${type} ${t.last_nack.version}: ${t.last_nack.message}`);
      const acked = Object.entries(p.types).map(([type, t]) => `${type} ${t.acked_version ?? "–"}`).join(", ");
      const cls = p.state === "converged" ? "ok" : p.state === "rejecting" ? "bad" : "warn";
      return [p.node_id, p.protocol, p.replica ?? "", iso(p.connected_since), el("span", { class: `pill ${cls}`, text: p.state }),
        el("code", { text: acked }), nacks.join("; ")];
    }), `fleet-${fleet}`),
  ]));
}

// ---------------------------------------------------------------------------------------------
// Start

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  signIn().catch((err) => showError(err.message));
});
document.getElementById("signout").addEventListener("click", () => forgetToken(""));
window.addEventListener("hashchange", () => {
  if (parseFragment(location.hash).token) { signIn().catch((err) => showError(err.message)); return; }
  refresh();
});
setInterval(tick, 1000);
signIn().catch((err) => showError(err.message));
