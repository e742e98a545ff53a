// Unit tests of the dashboard's pure helpers (controlplane/admin/ui/static/lib.js), run by
// tests/test_ui_js.py with node's built-in test runner.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  barSegments, canOperate, countdown, deploymentActions, fragmentWithout, parseFragment, phaseLabel,
  runningDeployment, sparkline, sseParser,
} from "../../controlplane/admin/ui/static/lib.js";

test("fragment parameters, and the token taken out", () => {
  assert.deepEqual(parseFragment("#token=a%2Bb&view=deployment&id=shop-2"), { token: "a+b", view: "deployment", id: "shop-2" });
  assert.deepEqual(parseFragment(""), {});
  assert.equal(fragmentWithout("#token=x&view=proxies", "token"), "#view=proxies");
  assert.equal(fragmentWithout("#token=x", "token"), "");
});

test("the event-stream parser keeps partial events and skips comments", () => {
  const parser = sseParser();
  assert.deepEqual(parser.feed("event: hello\ndata: {\"store_revision\":3}\n"), []);
  assert.deepEqual(parser.feed("\n: keepalive\n\nevent: change\r\ndata: {\"store\":true}\r\n\r\n"), [
    { event: "hello", data: { store_revision: 3 } },
    { event: "change", data: { store: true } },
  ]);
  assert.deepEqual(parser.feed("data: plain\n\n"), [{ event: "message", data: "plain" }]);
});

test("countdown", () => {
  assert.equal(countdown(65_000, 0), "1m 05s");
  assert.equal(countdown(3_725_000, 0), "1h 02m 05s");
  assert.equal(countdown(9_000, 0), "9s");
  assert.equal(countdown(0, 5), "due");
  assert.equal(countdown(null, 0), "");
});

test("weight bar segments", () => {
  assert.deepEqual(barSegments({ blue: 30, green: 70 }, 200), [
    { env: "blue", weight: 30, x: 0, w: 60 }, { env: "green", weight: 70, x: 60, w: 140 }]);
  assert.deepEqual(barSegments({ blue: 0, green: 100 }, 100), [{ env: "green", weight: 100, x: 0, w: 100 }]);
});

test("sparkline scales to the threshold and skips gaps", () => {
  const { path, scaleY } = sparkline([0, null, 0.5], 100, 20, 1);
  assert.equal(scaleY(0), 18);
  assert.equal(scaleY(1), 2);
  assert.equal(path, "M 2.0 18.0 L 98.0 10.0");
  assert.equal(sparkline([], 100, 20).path, "");
});

test("phase, running deployment and buttons", () => {
  const d = { id: "s-2", status: "shifting", step: 1, baking: false, paused_remaining: null, awaiting_promote: false,
              spec: { strategy: { steps: [10, 50, 100] } } };
  assert.equal(phaseLabel(d), "shifting step 2/3 (50%)");
  assert.equal(phaseLabel(null), "idle");
  assert.equal(phaseLabel({ ...d, status: "active", baking: true }), "baking");
  const service = { environments: { blue: { deployment: null }, green: { deployment: d } } };
  assert.equal(runningDeployment(service), d);
  assert.equal(runningDeployment({ environments: { blue: { deployment: { ...d, status: "standby" } }, green: { deployment: null } } }), null);
  assert.deepEqual(deploymentActions(d), ["promote", "pause", "rollback", "abort"]);
  assert.deepEqual(deploymentActions({ ...d, paused_remaining: 30 }), ["promote", "resume", "rollback", "abort"]);
  assert.ok(canOperate("operator") && canOperate("admin") && !canOperate("viewer"));
});
