// Pure helpers of the dashboard (no DOM, no network): tested with node's test runner
// (tests/js/lib.test.mjs, run from tests/test_ui_js.py).

/** Parameters of a URL fragment like "#token=abc&view=deployment&id=shop-2". */
export function parseFragment(hash) {
  const params = {};
  for (const part of (hash || "").replace(/^#/, "").split("&")) {
    if (!part) continue;
    const eq = part.indexOf("=");
    const key = decodeURIComponent(eq < 0 ? part : part.slice(0, eq));
    params[key] = eq < 0 ? "" : decodeURIComponent(part.slice(eq + 1));
  }
  return params;
}

/** The fragment without ``key`` (the token is taken out of the address bar at once). */
export function fragmentWithout(hash, key) {
  const params = parseFragment(hash);
  delete params[key];
  const parts = Object.entries(params).map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  return parts.length ? "#" + parts.join("&") : "";
}

/**
 * Incremental text/event-stream parser. feed(chunk) returns the complete events seen so far as
 * {event, data} (data parsed as JSON when it is JSON); comments and partial events are kept back.
 */
export function sseParser() {
  let buffer = "";
  return {
    feed(chunk) {
      buffer += chunk.replace(/\r\n?/g, "\n");
      const events = [];
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = value;
          else if (field === "data") data.push(value);
        }
        if (!data.length) continue;
        const text = data.join("\n");
        let parsed = text;
        try { parsed = JSON.parse(text); } catch (_) { /* plain text data */ }
        events.push({ event, data: parsed });
      }
      return events;
    },
  };
}

/** "4m 05s" for a deadline ``deadlineMs`` seen at ``nowMs``; "due" once it has passed. */
export function countdown(deadlineMs, nowMs) {
  if (deadlineMs == null) return "";
  let left = Math.round((deadlineMs - nowMs) / 1000);
  if (left <= 0) return "due";
  const h = Math.floor(left / 3600); left -= h * 3600;
  const m = Math.floor(left / 60); const s = left - m * 60;
  const ss = String(s).padStart(2, "0");
  if (h) return `${h}h ${String(m).padStart(2, "0")}m ${ss}s`;
  if (m) return `${m}m ${ss}s`;
  return `${s}s`;
}

/** Segments of a weight bar of ``width``: [{env, weight, x, w}] for the environments with weight. */
export function barSegments(weights, width) {
  const segments = [];
  let x = 0;
  for (const env of ["blue", "green"]) {
    const weight = weights[env] || 0;
    if (weight <= 0) continue;
    const w = (width * weight) / 100;
    segments.push({ env, weight, x, w });
    x += w;
  }
  return segments;
}

/**
 * An SVG path ("M x y L ...") through ``values`` (nulls skipped) in a width×height box; the y
 * scale goes from 0 to the largest of the values and ``ceiling`` (e.g. the threshold), so a
 * threshold line drawn at scaleY(ceiling) is always inside the box. Returns {path, scaleY}.
 */
export function sparkline(values, width, height, ceiling = 0) {
  const finite = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  const top = Math.max(ceiling || 0, ...finite, 0) || 1;
  const pad = 2;
  const scaleY = (v) => height - pad - ((height - 2 * pad) * v) / top;
  const step = values.length > 1 ? (width - 2 * pad) / (values.length - 1) : 0;
  let path = "";
  values.forEach((v, i) => {
    if (typeof v !== "number" || !Number.isFinite(v)) return;
    const x = pad + i * step;
    path += `${path ? " L" : "M"} ${x.toFixed(1)} ${scaleY(v).toFixed(1)}`;
  });
  return { path, scaleY };
}

/** The deployment of a service view that is under way (deploying … baking), else null. */
export function runningDeployment(service) {
  for (const env of ["blue", "green"]) {
    const d = service.environments[env].deployment;
    if (d && d.spec && (["deploying", "ready", "shifting"].includes(d.status) || (d.status === "active" && d.baking))) return d;
  }
  return null;
}

/** A short phase label: "shifting step 2/3 (50%)", "baking", "paused", "deploying". */
export function phaseLabel(d) {
  if (!d) return "idle";
  const steps = (d.spec && d.spec.strategy && d.spec.strategy.steps) || [];
  let label = d.baking ? "baking" : d.status;
  if (d.status === "shifting" && d.step >= 0) label += ` step ${d.step + 1}/${steps.length}` + (steps[d.step] != null ? ` (${steps[d.step]}%)` : "");
  if (d.paused_remaining != null) label += " (paused)";
  if (d.awaiting_promote) label += " (awaiting promote)";
  return label;
}

/** Which deployment buttons make sense for ``d`` in its state (the server decides anyway). */
export function deploymentActions(d) {
  if (!d) return [];
  const actions = [];
  if (d.status === "shifting" || d.status === "ready") actions.push("promote");
  if (d.paused_remaining != null) actions.push("resume"); else actions.push("pause");
  actions.push("rollback", "abort");
  return actions;
}

/** Roles that may use the buttons (operator and above). */
export function canOperate(role) {
  return role === "operator" || role === "admin";
}
