"""Deployment event notifications (webhooks) end to end: a live control plane, two receivers
(json with an HMAC secret, and Slack format for one event), a deployment, and a restart in the
middle of it. Every event arrives once, in order, signed; a receiver's failure is retried,
noted once in the history and counted, and never holds the deployment up."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.config import parse_settings
from controlplane.errors import ConfigError
from controlplane.model import Event
from controlplane.notify.events import events_of
from controlplane.notify.outbox import backoff
from live_cp import LiveControlPlane, live_control_plane, wait_until

pytestmark = pytest.mark.timeout(180)

SECRET = b"webhook-secret-0123456789"


class Receiver:
    """Records the requests it answered 2xx; answers 500 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.refused = 0
        self.fail_first = fail_first
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.refused < receiver.fail_first:
                    receiver.refused += 1
                    self.send_response(500)
                else:
                    receiver.received.append((dict(self.headers), data))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [json.loads(body)["event"] for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    main, slack = Receiver(fail_first=1), Receiver()
    try:
        yield main, slack
    finally:
        main.close()
        slack.close()


def metric(cp: LiveControlPlane, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(cp.ok("GET", "/metrics")):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not exported")


def test_every_event_once_in_order_across_a_restart(tmp_path: Path, receivers: tuple[Receiver, Receiver]) -> None:
    main, slack = receivers
    secret_file = tmp_path / "hook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    config = {"notifications": {"webhooks": [{"url": main.url, "secret_file": str(secret_file)}]}}
    with live_control_plane(tmp_path / "cp", config) as cp:
        # The service's own webhook (its settings), besides the config file's; checked against webhooks.allowed.
        status, reply = cp.call("PUT", "/v1/services/shop", {"notifications": {"webhooks": [{"url": "https://chat.example.com/hook"}]}})
        assert status == 400 and "notifications.webhooks[0].url: https://chat.example.com/hook is not allowed by webhooks.allowed" in reply["error"]
        cp.ok("PUT", "/v1/services/shop", {"domains": ["shop.example.com"],
                                           "notifications": {"webhooks": [{"url": slack.url, "format": "slack", "events": ["active"]}]}})
        cp.ok("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]})
        deployment = cp.ok("POST", "/v1/services/shop/deployments", {
            "version": "v2", "endpoints": ["127.0.0.1:9002"], "strategy": {"steps": [50, 100], "step_seconds": 4, "bake_seconds": 1}})["id"]
        # The first delivery is refused (500): the deployment goes on meanwhile.
        wait_until(lambda: cp.ok("GET", f"/v1/deployments/{deployment}")["status"] == "shifting", timeout=30, message="shifting")
        wait_until(lambda: "step" in main.events(), timeout=30, message="the step event delivered")
        assert metric(cp, "bluegreen_notifications_total", result="failed") == 1
        assert metric(cp, "bluegreen_notifications_total", result="delivered") == 3
        cp.restart()  # in the middle of the shift
        wait_until(lambda: main.events()[-1:] == ["active"], timeout=60, message="the active event delivered after the restart")
        wait_until(lambda: metric(cp, "bluegreen_notifications_pending") == 0, message="outbox empty")

        assert main.events() == ["started", "smoke_passed", "step", "active"]
        deliveries = [headers["X-Bluegreen-Delivery"] for headers, _ in main.received]
        assert len(set(deliveries)) == len(deliveries)
        for headers, body in main.received:
            message = json.loads(body)
            assert headers["X-Bluegreen-Event"] == message["event"]
            assert headers["X-Bluegreen-Signature"] == "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            assert set(message) == {"event", "deployment", "service", "version", "environment", "at", "reason"}
            assert (message["deployment"], message["service"], message["version"], message["environment"]) == (deployment, "shop", "v2", "green")
        assert main.refused == 1

        (slack_headers, slack_body), = slack.received
        assert "X-Bluegreen-Signature" not in slack_headers
        assert "*shop* v2 (green): active" in json.loads(slack_body)["text"]

        history = [e["reason"] for e in cp.ok("GET", f"/v1/deployments/{deployment}")["history"]]
        noted = [r for r in history if r.startswith("notification started to ") and "HTTP 500" in r]
        assert len(noted) == 1, history


def test_history_to_events() -> None:
    def e(status: str, reason: str) -> Event:
        return Event(0.0, status, "automatic", reason)

    assert events_of(None, e("deploying", "deploy v2 to green")) == ("started",)
    assert events_of(e("deploying", "x"), e("ready", "no smoke tests configured")) == ("smoke_passed",)
    assert events_of(e("deploying", "x"), e("failed", "smoke tests failed: HTTP 500")) == ("smoke_failed",)
    assert events_of(e("ready", "x"), e("shifting", "smoke tests passed; shifting")) == ("step",)
    assert events_of(e("shifting", "x"), e("shifting", "step 1: 50% after 30s")) == ("step",)
    assert events_of(e("shifting", "x"), e("shifting", "analysis breach 1/3: error rate")) == ()
    assert events_of(e("shifting", "x"), e("shifting", "paused")) == ("paused",)
    assert events_of(e("shifting", "x"), e("active", "promoted to 100%")) == ("promoted", "active")
    assert events_of(e("shifting", "x"), e("active", "step 2: 100% after 30s")) == ("active",)
    assert events_of(e("active", "x"), e("active", "bake finished; deployment complete")) == ()
    assert events_of(e("shifting", "x"), e("rolled_back", "analysis: error rate 0.3 > 0.05")) == ("rolled_back",)
    assert events_of(e("standby", "x"), e("decommissioned", "standby over")) == ("decommissioned",)
    assert events_of(e("active", "x"), e("active", "notification active to http://x failed: HTTP 500")) == ()


def test_backoff_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(30) == 300.0


@pytest.mark.parametrize("hook, problem", [
    ({"url": "https://hooks.example.com/x"}, "notifications.webhooks[0].url: https://hooks.example.com/x is not allowed by webhooks.allowed"),
    ({"url": "http://127.0.0.1/x", "events": ["started", "launched"]}, "notifications.webhooks[0].events: unknown event(s) launched"),
    ({"url": "http://127.0.0.1/x", "format": "teams"}, "notifications.webhooks[0].format: expected one of json, slack"),
    ({"url": "http://127.0.0.1/x", "secret_file": "/nonexistent/secret"}, "notifications.webhooks[0].secret_file:"),
    ({"url": "http://127.0.0.1/x", "secret_file": "/dev/zero"}, "notifications.webhooks[0].secret_file: /dev/zero is not a regular file"),
    ({"url": "http://127.0.0.1/x", "retries": 3}, "retries"),
])
def test_bad_notification_config_is_refused(hook: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"notifications": {"webhooks": [hook]}})
    assert problem in str(error.value)
