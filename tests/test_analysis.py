"""Automated analysis with real Envoy: the proxies push their own per-cluster stats to the
control plane (metrics-service sink), and a bad version is rolled back without a human."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from tests.harness import sample_environments, settle_on, wait_for
from tests.test_envoy import blue_only_stack


@contextlib.asynccontextmanager
async def steady_load(url: str, stop: asyncio.Event, *, workers: int = 4) -> AsyncIterator[list[int]]:
    """Requests through Envoy until ``stop`` is set (bounded: at most 20,000); yields statuses."""
    statuses: list[int] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set() and len(statuses) < 20_000:
            try:
                async with session.get(url) as response:
                    await response.read()
                    statuses.append(response.status)
            except aiohttp.ClientError:
                statuses.append(-1)

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(workers)]
        try:
            yield statuses
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def test_green_answering_5xx_is_rolled_back_automatically(tmp_path: Path) -> None:
    async with blue_only_stack(tmp_path, {"drain_seconds": 1, "standby_seconds": 60}, green_error_rate=0.2) as (
            cp, api, envoy, port, blue, green):
        session = api.session
        url = f"http://127.0.0.1:{port}/"

        stop = asyncio.Event()
        async with steady_load(url, stop):
            created = await api.call("POST", "/v1/services/shop/deployments", {
                "version": "v2", "endpoints": [green.address],
                "strategy": {"steps": [50, 100], "step_seconds": 600, "bake_seconds": 0},
                "smoke": {"checks": [{"path": "/healthz"}]},
                "analysis": {"interval_seconds": 1, "max_error_rate": 0.05, "max_p99_ms": None,
                             "min_requests": 20, "no_data": "wait", "failure_limit": 2},
            }, expect=202)
            deployment_id = created["id"]

            async def settled() -> dict[str, Any] | None:
                d = await api.call("GET", f"/v1/deployments/{deployment_id}")
                return d if d["status"] in ("rolled_back", "failed", "active") else None

            d = await wait_for(settled, timeout=60, message="the deployment rolled back")
        assert d["status"] == "rolled_back", d
        assert d["reason"].startswith("analysis: error rate"), d["reason"]
        assert "(2 consecutive)" in d["reason"]
        events = [(e["status"], e["actor"], e["reason"]) for e in d["history"]]
        assert any(r.startswith("analysis breach 1/2: error rate") for _, _, r in events), events
        assert events[-1][:2] == ("rolled_back", "automatic"), events
        assert d["analysis"]["requests"] >= 20 and d["analysis"]["error_rate"] > 0.05, d["analysis"]

        # All traffic is back on blue, pushed at once.
        view = await api.call("GET", "/v1/services/shop", wait="converged", timeout="15")
        assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
        await settle_on(url, "blue")
        counts = await sample_environments(url, 200)
        assert counts == {"blue": 200}, dict(counts)

        async with session.get(cp.admin_url + "/metrics", headers=cp.headers) as response:
            metrics = await response.text()
        assert 'bluegreen_rollbacks_total{reason="automatic",service="shop"} 1.0' in metrics
        assert 'bluegreen_deployments_total{result="rolled_back",service="shop"} 1.0' in metrics
        rate_line = next(line for line in metrics.splitlines()
                         if line.startswith('bluegreen_analysis_error_rate{environment="green",service="shop"}'))
        assert float(rate_line.split()[-1]) > 0.05


async def test_healthy_version_passes_analysis_and_records_figures(tmp_path: Path) -> None:
    async with blue_only_stack(tmp_path, {}) as (cp, api, envoy, port, blue, green):
        stop = asyncio.Event()
        async with steady_load(f"http://127.0.0.1:{port}/", stop) as statuses:
            created = await api.call("POST", "/v1/services/shop/deployments", {
                "version": "v2", "endpoints": [green.address],
                "strategy": {"steps": [50, 100], "step_seconds": 600, "bake_seconds": 600},
                "analysis": {"interval_seconds": 1, "max_error_rate": 0.05, "max_p99_ms": 1000, "min_requests": 5, "failure_limit": 1},
            }, expect=202)

            async def judged_ok() -> dict[str, Any] | None:
                d = await api.call("GET", f"/v1/deployments/{created['id']}")
                a = d["analysis"] or {}
                return d if a.get("verdict") == "ok" and a.get("requests", 0) >= 5 else None

            d = await wait_for(judged_ok, timeout=60, message="an analysis interval judged ok")
            assert d["status"] == "shifting" and d["failures"] == 0
            assert d["analysis"]["error_rate"] == 0 and 0 < d["analysis"]["p99_ms"] <= 1000
            # Analysis continues through the bake at 100 %.
            await api.call("POST", f"/v1/deployments/{created['id']}/promote")
            baking = await api.call("GET", f"/v1/deployments/{created['id']}")
            assert baking["status"] == "active" and baking["baking"]
        assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))


def green_weight(dump: dict[str, Any]) -> int | None:
    """Green's weight in the production route ``shop`` of an Envoy config dump (None: absent)."""
    for config in dump.get("configs", []):
        for vhost in config.get("route_config", {}).get("virtual_hosts", []):
            for route in vhost.get("routes", []):
                clusters = route.get("route", {}).get("weighted_clusters", {}).get("clusters")
                if route.get("name") == "shop" and clusters is not None:
                    return sum(int(c.get("weight", 0)) for c in clusters if c["name"] == "shop-green")
    return None


@contextlib.asynccontextmanager
async def green_weights_seen(envoy: Any, stop: asyncio.Event) -> AsyncIterator[list[int]]:
    """Every weight of green that Envoy's production route held while the block ran, read from
    its config dump as fast as it answers (a poll: it proves what Envoy held when it looked)."""
    seen: list[int] = []

    async def watch() -> None:
        while not stop.is_set():
            weight = green_weight(await envoy.config_dump(resource="dynamic_route_configs"))
            if weight is not None:
                seen.append(weight)
            await asyncio.sleep(0.02)  # a poll interval, not synchronisation

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        stop.set()
        await task


async def test_steps_shorter_than_the_interval_are_judged_before_any_more_traffic_moves(tmp_path: Path) -> None:
    """Steps of 1 s, intervals of 3 s, no bake: every step still waits for a judged interval, so
    a version answering only 5xx is rolled back from its first step (10 %)."""
    async with blue_only_stack(tmp_path, {"drain_seconds": 1, "standby_seconds": 60}, green_error_rate=1.0) as (
            cp, api, envoy, port, blue, green):
        url = f"http://127.0.0.1:{port}/"
        stop_load, stop_watch = asyncio.Event(), asyncio.Event()
        async with steady_load(url, stop_load), green_weights_seen(envoy, stop_watch) as weights:
            created = await api.call("POST", "/v1/services/shop/deployments", {
                "version": "v2", "endpoints": [green.address],
                "strategy": {"steps": [10, 50, 100], "step_seconds": 1, "bake_seconds": 0},
                "smoke": {"checks": [{"path": "/healthz"}]},
                "analysis": {"interval_seconds": 3, "max_error_rate": 0.05, "max_p99_ms": None, "min_requests": 5},
            }, expect=202)
            deployment_id = created["id"]

            async def settled() -> dict[str, Any] | None:
                d = await api.call("GET", f"/v1/deployments/{deployment_id}")
                return d if d["status"] in ("rolled_back", "failed") or (d["status"] == "active" and not d["baking"]) else None

            d = await wait_for(settled, timeout=90, message="the deployment settled")
            await api.call("GET", "/v1/services/shop", wait="converged", timeout="15")
        assert d["status"] == "rolled_back", [(e["status"], e["reason"]) for e in d["history"]]
        events = [(e["status"], e["actor"], e["reason"]) for e in d["history"]]
        assert events[-1][:2] == ("rolled_back", "automatic"), events
        assert d["reason"].startswith("analysis: error rate"), d["reason"]
        # The control plane never moved past the first step, and the history says why it stayed.
        assert d["step"] == 0, d
        steps = [r for s, _, r in events if s == "shifting" and r.startswith("step ")]
        assert len(steps) == 1 and steps[0].startswith("step 0 (10%) extended: no full analysis interval judged yet"), events
        assert all(s != "active" for s, _, _ in events), events
        # And Envoy never routed more than 10 % to green.
        assert 10 in weights, sorted(set(weights))
        assert max(weights) == 10, sorted(set(weights))
        view = await api.call("GET", "/v1/services/shop")
        assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
