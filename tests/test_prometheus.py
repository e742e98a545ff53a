"""The Grafana dashboard and the alert rules against a real Prometheus (Debian's package)
scraping a live control plane that serves a real Envoy (traffic, deployments, a rollback,
analysis) and a fake proxy that NACKs. One Prometheus and one control plane for the module.

- Every PromQL expression of deploy/grafana/bluegreen.json (panels and annotations), with its
  template variables filled in, returns data whose labels are the ones its legend names, as an
  instant query and (for time series panels) as a range query.
- Every metric an expression names is in our /metrics exposition (a typo fails).
- deploy/prometheus/alerts.yml passes `promtool check rules` and its unit tests, and the live
  Prometheus evaluates it: the NACKing proxy makes BluegreenProxyRejectingConfig pending.
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import re
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from prometheus_client.parser import text_string_to_metric_families

from controlplane import typeurls
from controlplane.bootstrap import render_bootstrap
from harness import REPO_ROOT, envoy_binary, free_port
from live_cp import TOKENS, LiveControlPlane, live_control_plane, wait_until
from prom import PROMETHEUS, PROMTOOL, Prometheus, run_prometheus

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not (os.path.exists(PROMETHEUS) and os.path.exists(PROMTOOL)),
                       reason="needs Debian's prometheus package (tests/install-system-deps.sh)"),
]

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "bluegreen.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
VARIABLES = {"$service": "shop|search", "$fleet": "default", "$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def dashboard_queries() -> list[tuple[str, str, str, bool]]:
    """(where, expr, legendFormat, time series?) for every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"], target.get("legendFormat", ""),
                          panel["type"] == "timeseries"))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"], annotation.get("titleFormat", ""), True))
    return found


def concrete(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


# ---------------------------------------------------------------------------------------------
# The live set-up: upstream app, control plane, Envoy, a NACKing fake proxy, Prometheus


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class NackingProxy:
    """A minimal ADS client (node ``nacker``) that ACKs clusters and NACKs listeners."""

    def __init__(self, xds: str) -> None:
        self.channel = grpc.insecure_channel(xds)
        self.requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self.node = base_pb2.Node(id="nacker", cluster="default")
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(iter(self.requests.get, None))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, type_url: str, nonce: str = "", version: str = "", nack: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(node=self.node, type_url=type_url, response_nonce=nonce, version_info=version)
        if nack is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=nack))
        self.requests.put(request)

    def _run(self) -> None:
        self._send(typeurls.CLUSTER)
        self._send(typeurls.LISTENER)
        try:
            for response in self.call:
                if response.type_url == typeurls.LISTENER:
                    self._send(typeurls.LISTENER, response.nonce, nack="listener refused by the test proxy")
                else:
                    self._send(response.type_url, response.nonce, response.version_info)
        except grpc.RpcError:
            pass  # closed at the end of the module

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


class ErrorApp:
    """A test app exporting an error counter (``app_errors_total{version="v2"}``) the test sets."""

    def __init__(self) -> None:
        self.errors = 0
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = f'# TYPE app_errors_total counter\napp_errors_total{{version="v2"}} {app.errors}\n'.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def error_app() -> Iterator[ErrorApp]:
    app = ErrorApp()
    try:
        yield app
    finally:
        app.server.shutdown()
        app.server.server_close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, upstream: str, error_app: ErrorApp) -> Iterator[tuple[LiveControlPlane, Prometheus, str]]:
    directory = tmp_path_factory.mktemp("prometheus")
    listener_port, preview_port = free_port(), free_port()
    fleets = {"default": {"listeners": [{"name": "http", "address": "127.0.0.1", "port": listener_port, "preview_port": preview_port}]}}
    with live_control_plane(directory / "cp", {"fleets": fleets}) as cp:
        envoy_admin = free_port()
        bootstrap = directory / "envoy.yaml"
        bootstrap.write_text(render_bootstrap(node_id="edge-1", fleet="default", xds=f"127.0.0.1:{cp.xds_port}", admin_port=envoy_admin))
        with open(directory / "envoy.log", "wb") as log:
            envoy = subprocess.Popen([envoy_binary(), "-c", str(bootstrap), "--concurrency", "1", "--disable-hot-restart",
                                      "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
        nacker = NackingProxy(f"127.0.0.1:{cp.xds_port}")
        token_file = directory / "scrape.token"
        token_file.write_text(TOKENS["viewer"])
        token_file.chmod(0o600)
        scrape = [{"job_name": "bluegreen", "metrics_path": "/metrics", "static_configs": [{"targets": [cp.admin_url.split("//")[1]]}],
                   "authorization": {"type": "Bearer", "credentials_file": str(token_file)}},
                  {"job_name": "app", "static_configs": [{"targets": [error_app.address]}]}]
        try:
            with run_prometheus(directory / "prometheus", scrape, [ALERTS]) as prometheus:
                wait_until(lambda: prometheus.query('up{job="bluegreen"} == 1'), timeout=30, message="Prometheus scrapes the control plane")
                drive_deployments(cp, prometheus, upstream, listener_port)
                yield cp, prometheus, upstream
        finally:
            nacker.close()
            envoy.terminate()
            envoy.wait(10)


def send_requests(listener_port: int, host: str, n: int) -> None:
    import urllib.request

    for _ in range(n):
        request = urllib.request.Request(f"http://127.0.0.1:{listener_port}/", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                response.read()
        except OSError:
            pass


def drive_deployments(cp: LiveControlPlane, prometheus: Prometheus, upstream: str, listener_port: int) -> None:
    """What the dashboard shows: a deployment with analysis under traffic, then rolled back
    (shop), and one that completes (search)."""
    for name in ("shop", "search"):
        cp.ok("PUT", f"/v1/services/{name}", {"domains": [f"{name}.example.com"], "prefix": "/"})
        cp.ok("PUT", f"/v1/services/{name}/environments/blue", {"version": "v1", "endpoints": [upstream]})
    deployment = cp.ok("POST", "/v1/services/shop/deployments", {
        "version": "v2", "endpoints": [upstream], "strategy": {"steps": [50, 100], "step_seconds": 900},
        "analysis": {"interval_seconds": 1, "min_requests": 1, "max_error_rate": 0.5, "no_data": "pass"}})["id"]
    cp.ok("POST", "/v1/services/search/deployments", {"version": "v2", "endpoints": [upstream],
                                                      "strategy": {"steps": [100], "bake_seconds": 1}})

    def analysed() -> bool:
        send_requests(listener_port, "shop.example.com", 20)
        return bool(prometheus.query('bluegreen_analysis_error_rate{service="shop"}'))

    wait_until(analysed, timeout=60, message="an analysis interval of shop with traffic scraped")
    wait_until(lambda: prometheus.query('bluegreen_deployment_phase{service="shop", phase="shifting"} == 1')
               and prometheus.query('bluegreen_rollbacks_total{service="shop", reason="api"} == 0'),
               timeout=30, message="shop's shift and its rollback counter at 0 scraped")
    cp.ok("POST", f"/v1/deployments/{deployment}/rollback")
    wait_until(lambda: prometheus.query('bluegreen_deployments_total{service="search", result="succeeded"} == 1')
               and prometheus.query('bluegreen_rollbacks_total{service="shop", reason="api"} == 1')
               and prometheus.query("bluegreen_cutover_seconds_count > 0"),
               timeout=60, message="search completed and shop's rollback scraped")


# ---------------------------------------------------------------------------------------------
# Tests


QUERIES = dashboard_queries()


@pytest.mark.parametrize("where, expr, legend, series", QUERIES, ids=[q[0] for q in QUERIES])
def test_every_dashboard_query_returns_data(live: Any, where: str, expr: str, legend: str, series: bool) -> None:
    cp, prometheus, _ = live
    query = concrete(expr)
    if where.startswith("annotation"):
        # Annotations mark moments (a shift, an end, a rollback): look over the module's past.
        result = wait_until(lambda: prometheus.query_range(query, seconds=600), timeout=60, message=f"{where}: {query} marked nothing")
    else:
        # Rates need two samples in their window: wait for data rather than for a fixed time.
        result = wait_until(lambda: prometheus.query(query), timeout=60, message=f"{where}: {query} returned no data")
        if series:
            matrix = prometheus.query_range(query, seconds=120)
            assert matrix and all(len(s["values"]) >= 1 for s in matrix), f"{where}: no range data"
    for sample in result:
        assert legend_labels(legend) <= set(sample["metric"]), f"{where}: {sample['metric']} lacks the legend's labels {legend}"


def test_every_metric_the_dashboard_names_is_exported(live: Any) -> None:
    cp, _, _ = live
    exposition = cp.ok("GET", "/metrics", role="viewer")
    exported = {s.name for f in text_string_to_metric_families(exposition) for s in f.samples} | \
               {f.name for f in text_string_to_metric_families(exposition)}
    named = {m for _, expr, _, _ in QUERIES for m in re.findall(r"\b(bluegreen_[a-z0-9_]+)", expr)}
    assert named, "no metric found in the dashboard"
    missing = named - exported
    assert not missing, f"the dashboard names metrics /metrics does not export: {sorted(missing)}"


def test_alert_rules_pass_promtool() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", "alerts.test.yml"], cwd=ALERTS.parent, capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_the_live_prometheus_evaluates_the_alert_rules(live: Any) -> None:
    _, prometheus, _ = live
    groups = prometheus.api("rules")["groups"]
    assert {r["name"] for g in groups for r in g["rules"]} == {
        "BluegreenProxyRejectingConfig", "BluegreenFleetNotConverged", "BluegreenAutomaticRollback", "BluegreenControlPlaneDown"}
    alert = wait_until(lambda: prometheus.query('ALERTS{alertname="BluegreenProxyRejectingConfig", node_id="nacker"}'),
                       timeout=30, message="the NACKing proxy's alert is pending")
    assert alert[0]["metric"]["alertstate"] in ("pending", "firing")
    assert not prometheus.query('ALERTS{alertname="BluegreenControlPlaneDown"}')


def test_prometheus_queries_judge_a_deployment(live: Any, error_app: ErrorApp) -> None:
    """analysis.prometheus: the query's value is judged each interval next to Envoy's figures;
    above max it breaches like an error rate does, and the history shows value and threshold."""
    cp, prometheus, upstream = live
    cp.ok("PUT", "/v1/services/pay", {"domains": ["pay.example.com"]})
    cp.ok("PUT", "/v1/services/pay/environments/blue", {"version": "v1", "endpoints": [upstream]})
    wait_until(lambda: prometheus.query('app_errors_total{version="v2"}'), message="the app's counter scraped")
    deployment = cp.ok("POST", "/v1/services/pay/deployments", {
        "version": "v2", "endpoints": [upstream], "strategy": {"steps": [50, 100], "step_seconds": 900},
        "analysis": {"interval_seconds": 1, "min_requests": 0, "no_data": "fail", "failure_limit": 2, "prometheus": {
            "url": prometheus.url,
            "queries": [{"name": "errors", "query": 'sum(app_errors_total{version="$version"})', "max": 5}]}}})["id"]

    def judged_ok() -> Any:
        intervals = cp.ok("GET", f"/v1/deployments/{deployment}")["intervals"]
        return [i for i in intervals if i["verdict"] == "ok" and i["prometheus"][0]["value"] == 0]

    (interval, *_) = wait_until(judged_ok, timeout=30, message="an interval judged ok with the query's value")
    assert interval["prometheus"][0]["query"] == 'sum(app_errors_total{version="v2"})'
    assert interval["prometheus"][0]["max"] == 5
    error_app.errors = 10
    record = wait_until(lambda: (r := cp.ok("GET", f"/v1/deployments/{deployment}"))["status"] == "rolled_back" and r,
                        timeout=30, message="rolled back by the Prometheus query")
    assert "prometheus errors = 10 > max 5" in record["reason"]
    assert any(e["reason"] == "analysis breach 1/2: prometheus errors = 10 > max 5" for e in record["history"])


def test_a_prometheus_url_outside_the_allowlist_is_refused(live: Any) -> None:
    cp, _, upstream = live
    status, reply = cp.call("POST", "/v1/services/shop/deployments", {
        "version": "v9", "endpoints": [upstream],
        "analysis": {"prometheus": {"url": "http://prometheus.example.com:9090", "queries": [{"name": "e", "query": "up", "min": 1}]}}})
    assert status == 400
    assert "analysis.prometheus.url http://prometheus.example.com:9090 is not allowed by the server config's analysis.prometheus_allowed" in reply["error"]
