"""The deployment workflow end to end: a real `bluegreen serve` process, a real Envoy and real
upstream processes (blue v1, green v2) on loopback.

Every test starts with blue v1 registered by hand and taking 100 %, an Envoy connected and
converged, and green v2 running but not registered: the deployment registers it. Nothing
sleeps to synchronise: the tests poll the API, the upstreams' logs or Envoy's config dump until
a condition holds. Deadlines are either long (600 s: a timer never fires while the test samples
traffic) or short (1-3 s) where a timer is what is being tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Envoy, Upstream, binomial_band, free_port, run_control_plane, run_upstream, sample_environments, settle_on, wait_for
from tests.test_envoy import Api, envoy_for, wait_proxies, write_config

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]

SPLIT_REQUESTS = 1000
LONG_STEP = 600  # seconds: never elapses during a test


# =============================================================================================
# The stack
# =============================================================================================


@dataclass
class Stack:
    cp: Any
    api: Api
    session: aiohttp.ClientSession
    envoy: Envoy
    blue: Upstream
    green: Upstream
    port: int
    preview_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def body(self, steps: list[int] | None = None, *, version: str = "v2", step_seconds: float = LONG_STEP,
             bake_seconds: float = 0, auto_promote: bool = True, smoke: dict[str, Any] | None = None,
             endpoints: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        """A deployment request for green v2 (by default) with a passing smoke test."""
        return {
            "version": version,
            "endpoints": endpoints or [self.green.address],
            "strategy": {"steps": steps or [10, 50, 100], "step_seconds": step_seconds, "bake_seconds": bake_seconds,
                         "auto_promote": auto_promote},
            "smoke": smoke if smoke is not None else {"checks": [{"path": "/healthz", "body_contains": "ok"}]},
            **extra,
        }

    async def deploy(self, body: dict[str, Any], service: str = "shop") -> str:
        created = await self.api.call("POST", f"/v1/services/{service}/deployments", body, expect=202)
        assert created["deployment"]["status"] == "deploying" and created["id"] == created["deployment"]["id"]
        return str(created["id"])

    async def deployment(self, deployment_id: str) -> dict[str, Any]:
        return await self.api.call("GET", f"/v1/deployments/{deployment_id}")  # type: ignore[no-any-return]

    async def wait_deployment(self, deployment_id: str, message: str, timeout: float = 30, **expected: Any) -> dict[str, Any]:
        """Poll until every field in ``expected`` has that value; fail at once on a terminal
        status that was not asked for."""
        wanted_status = expected.get("status")

        async def check() -> dict[str, Any] | None:
            d = await self.deployment(deployment_id)
            if d["status"] in ("failed", "rolled_back") and d["status"] != wanted_status:
                raise AssertionError(f"{deployment_id} ended {d['status']}: {d['reason']}")
            return d if all(d[k] == v for k, v in expected.items()) else None

        try:
            return await wait_for(check, timeout=timeout, message=f"{deployment_id}: {message}")
        except AssertionError:
            print(json.dumps(await self.deployment(deployment_id), indent=1))
            raise

    async def command(self, deployment_id: str, action: str, *, expect: int = 200, **query: str) -> dict[str, Any]:
        return await self.api.call("POST", f"/v1/deployments/{deployment_id}/{action}", expect=expect, **query)  # type: ignore[no-any-return]

    async def service(self) -> dict[str, Any]:
        return await self.api.call("GET", "/v1/services/shop")  # type: ignore[no-any-return]

    async def envoy_weights(self) -> dict[str, int]:
        """The production route's weighted clusters as Envoy holds them right now."""
        dump = await self.envoy.config_dump(resource="dynamic_route_configs")
        for config in dump.get("configs", []):
            for vhost in config.get("route_config", {}).get("virtual_hosts", []):
                for route in vhost.get("routes", []):
                    clusters = route.get("route", {}).get("weighted_clusters", {}).get("clusters")
                    if route.get("name") == "shop" and clusters is not None:
                        return {c["name"]: int(c.get("weight", 0)) for c in clusters}
        return {}

    async def wait_envoy(self, blue: int | None, green: int) -> None:
        """Wait until Envoy routes with these weights (blue None: blue has left the route)."""
        expected = {"shop-green": green} if blue is None else {"shop-blue": blue, "shop-green": green}

        async def check() -> bool:
            return await self.envoy_weights() == expected

        await wait_for(check, timeout=30, message=f"Envoy routes {expected}")
        if green == 100 or blue == 100:
            await settle_on(self.url, "green" if green == 100 else "blue")

    async def sample(self, n: int = SPLIT_REQUESTS) -> Counter[Any]:
        counts = await sample_environments(self.url, n, concurrency=16)
        assert counts["blue"] + counts["green"] == n, f"errors or strays: {dict(counts)}"
        return counts

    async def app_requests(self, upstream: Upstream) -> dict[str, int]:
        async with self.session.get(f"{upstream.url}/_bluegreen/requests") as response:
            assert response.status == 200
            return await response.json()  # type: ignore[no-any-return]

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.session.get(self.cp.admin_url + "/metrics", headers=self.cp.headers) as response:
            text = await response.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@contextlib.asynccontextmanager
async def workflow_stack(tmp_path: Path, *, drain_seconds: int = 1, standby_seconds: int = 2) -> AsyncIterator[Stack]:
    port, preview_port = free_port(), free_port()
    config = write_config(tmp_path / "config.yaml", port, preview_port)
    async with run_upstream("blue", "v1") as blue, run_upstream("green", "v2") as green, \
            run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session, envoy_for(cp, "edge-1") as envoy:
        api = Api(session, cp.admin_url)
        await api.call("PUT", "/v1/services/shop", {"drain_seconds": drain_seconds, "standby_seconds": standby_seconds})
        await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
        await wait_proxies(api, 1)
        await envoy.wait_ready()
        stack = Stack(cp, api, session, envoy, blue, green, port, preview_port)
        yield stack


def in_band(counts: Counter[Any], green_share: float, n: int = SPLIT_REQUESTS) -> None:
    lo, hi = binomial_band(n, green_share)
    assert lo <= counts["green"] <= hi, f"{green_share:.0%} green: saw {counts['green']}/{n}, 99.9% band [{lo}, {hi}]"


def events(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["status"], e["actor"], e["reason"]) for e in d["history"]]


def times(d: dict[str, Any]) -> list[float]:
    return [datetime.fromisoformat(e["at"]).timestamp() for e in d["history"]]


# =============================================================================================
# 1. Happy path
# =============================================================================================


@dataclass
class Webhooks:
    """A tiny HTTP server recording the JSON bodies POSTed to it."""

    url: str
    calls: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def webhook_server() -> AsyncIterator[Webhooks]:
    hooks = Webhooks("")

    async def record(request: web.Request) -> web.Response:
        hooks.calls.append({"path": request.path, "body": await request.json()})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hooks.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield hooks
    finally:
        await runner.cleanup()


async def test_happy_path_10_50_100_then_drain_standby_decommission(tmp_path: Path) -> None:
    async with workflow_stack(tmp_path) as s, webhook_server() as hooks:
        did = await s.deploy(s.body([10, 50, 100], decommission={"webhooks": [{"url": hooks.url + "/retired"}]}))
        assert did == "shop-2"  # blue v1 is shop-1

        await s.wait_deployment(did, "shifting at step 0", status="shifting", step=0)
        view = await s.service()
        assert view["traffic"]["weights"] == {"blue": 90, "green": 10}
        assert view["environments"]["green"]["endpoints"] == [s.green.address]
        await s.wait_envoy(90, 10)
        in_band(await s.sample(), 0.10)

        promoted = await s.command(did, "promote")
        assert (promoted["status"], promoted["step"]) == ("shifting", 1)
        await s.wait_envoy(50, 50)
        in_band(await s.sample(), 0.50)

        promoted = await s.command(did, "promote")
        assert (promoted["status"], promoted["step"]) == ("active", 2)
        await s.wait_envoy(0, 100)
        counts = await s.sample(500)
        assert counts == Counter({"green": 500}), dict(counts)

        # bake 0: done at once. The old blue goes draining -> standby -> decommissioned (1 s + 2 s).
        done = await s.wait_deployment(did, "bake over", status="active", baking=False)
        blue = await s.wait_deployment("shop-1", "blue decommissioned and its hooks called", status="decommissioned",
                                       hooks_pending=False)

        assert [(st, actor) for st, actor, _ in events(done)] == [
            ("deploying", "token:admin"), ("ready", "automatic"), ("shifting", "automatic"), ("shifting", "token:admin"),
            ("active", "token:admin"), ("active", "automatic"),
        ]
        reasons = [r for _, _, r in events(done)]
        assert reasons[0] == "deploy v2 to green" and "smoke tests passed" in reasons[1]
        assert reasons[3:5] == ["promoted to 50%", "promoted to 100%"] and reasons[5].startswith("bake finished")
        assert [(st, actor) for st, actor, _ in events(blue)] == [
            ("draining", "automatic"), ("standby", "automatic"), ("decommissioned", "automatic"), ("decommissioned", "automatic"),
        ]
        assert events(blue)[0][2].startswith(f"replaced by {did}")
        assert "standby" in events(blue)[2][2] and events(blue)[3][2] == "decommission hooks: 1 called"
        for record in (done, blue):
            assert all(r for _, _, r in events(record)), record["history"]
            assert times(record) == sorted(times(record))
        assert done["reason"] is None and done["activated_at"] is not None and blue["counterpart"] == did

        view = await s.service()
        assert view["environments"]["blue"]["endpoints"] == [] and view["environments"]["blue"]["version"] is None
        assert view["environments"]["green"]["deployment"]["id"] == did
        assert view["traffic"] == {"weights": {"blue": 0, "green": 100}, "active": "green", "idle": "blue", "previous": None}
        await s.wait_envoy(None, 100)  # blue left the route (and the cluster set)

        assert len(hooks.calls) == 1, hooks.calls
        [call] = hooks.calls
        assert call["path"] == "/retired"
        assert call["body"] == {"event": "decommission", "service": "shop", "deployment": "shop-1", "version": "v1",
                                "environment": "blue"}

        metrics = await s.metrics()
        assert metrics[("bluegreen_deployments_total", (("result", "succeeded"), ("service", "shop")))] == 1.0
        assert metrics[("bluegreen_deployment_phase", (("phase", "idle"), ("service", "shop")))] == 1.0
        # The cutover histogram for a shift finished by `promote` is checked in
        # test_cutover_is_observed_when_promote_reaches_100 below (see the BUG note there).


# =============================================================================================
# 2. Timers
# =============================================================================================


async def test_timers_drive_the_steps_and_the_bake(tmp_path: Path) -> None:
    async with workflow_stack(tmp_path) as s:
        did = await s.deploy(s.body([50, 100], step_seconds=1, bake_seconds=1))
        d = await s.wait_deployment(did, "active and baked", status="active", baking=False)
        assert [(st, actor) for st, actor, _ in events(d)] == [
            ("deploying", "token:admin"), ("ready", "automatic"), ("shifting", "automatic"), ("active", "automatic"),
            ("active", "automatic"),
        ]
        assert events(d)[3][2] == "step 1: 100% after 1s"
        at = times(d)
        # (history times are rendered to the microsecond)
        assert at[3] - at[2] >= 1.0 - 1e-5, "the step ended before its step_seconds"
        assert at[4] - at[3] >= 1.0 - 1e-5, "the bake ended before its bake_seconds"
        assert d["deadline"] is None and d["step"] == 1
        await s.wait_envoy(0, 100)
        metrics = await s.metrics()
        assert metrics[("bluegreen_deployments_total", (("result", "succeeded"), ("service", "shop")))] == 1.0
        # The timer reached 100 %: the cutover time (first weight change -> every proxy at 100 %).

        async def cutover() -> float | None:
            return (await s.metrics()).get(("bluegreen_cutover_seconds_count", (("service", "shop"),)))

        assert await wait_for(cutover, timeout=10, message="bluegreen_cutover_seconds observed") == 1.0


# =============================================================================================
# 3. Failing smoke test
# =============================================================================================


async def test_failing_smoke_test_fails_the_deployment_before_any_production_traffic(tmp_path: Path) -> None:
    async with workflow_stack(tmp_path) as s:
        before = await s.app_requests(s.green)
        smoke = {"checks": [{"path": "/healthz", "body_contains": "definitely not in the body", "retries": 1}]}
        did = await s.deploy(s.body(smoke=smoke))
        d = await s.wait_deployment(did, "failed", status="failed")
        assert "smoke tests failed" in d["history"][-1]["reason"]
        assert "body does not contain 'definitely not in the body'" in d["reason"], d["reason"]
        assert d["step"] == -1 and d["history"][-1]["actor"] == "automatic"

        view = await s.service()
        assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
        counts = await s.sample(300)
        assert counts == Counter({"blue": 300}), dict(counts)
        after = await s.app_requests(s.green)
        assert after["production"] == before["production"], f"green saw production traffic: {before} -> {after}"
        assert after["preview"] - before["preview"] == 2, (before, after)  # 1 try + 1 retry, all through the preview entry

        # A failed deployment does not block the next one.
        second = await s.deploy(s.body([100]))
        assert second != did
        await s.wait_deployment(second, "active", status="active", baking=False)
        assert (await s.deployment(did))["status"] == "decommissioned"  # replaced in green
        await s.wait_envoy(0, 100)


# =============================================================================================
# 4. Zero errors across every switch
# =============================================================================================


@dataclass
class Load:
    statuses: Counter[Any] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


MAX_LOAD_REQUESTS = 200_000


def no_retry_session(limit: int) -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
    session._retry_connection = False  # type: ignore[attr-defined]  # see harness.sample_environments
    return session


@contextlib.asynccontextmanager
async def steady_load(url: str, *, workers: int = 4) -> AsyncIterator[Load]:
    """Keep-alive clients sending continuously until ``load.stop`` is set (bounded by count)."""
    load = Load()
    timeout = aiohttp.ClientTimeout(total=10)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not load.stop.is_set() and load.total < MAX_LOAD_REQUESTS:
            try:
                async with session.get(url, timeout=timeout) as response:
                    await response.read()
                    load.statuses[response.status] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                load.statuses["error"] += 1
                load.errors.append(f"{type(exc).__name__}: {exc}")

    async with no_retry_session(workers) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(workers)]
        try:
            yield load
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)


def slow_started(*upstreams: Upstream) -> int:
    return sum(u.log_text().count("slow request started") for u in upstreams)


async def start_slow_requests(s: Stack, session: aiohttp.ClientSession, n: int = 3) -> list[asyncio.Task[str]]:
    """Start ``n`` 2-second requests through Envoy and wait until the upstreams got them."""
    before = slow_started(s.blue, s.green)

    async def one() -> str:
        try:
            async with session.get(f"{s.url}slow?seconds=2", timeout=aiohttp.ClientTimeout(total=30)) as response:
                await response.read()
                return f"{response.status} {response.headers.get('x-bluegreen-environment')}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"error {type(exc).__name__}: {exc}"

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await wait_for(lambda: slow_started(s.blue, s.green) >= before + n, timeout=15, message=f"{n} slow requests in flight")
    return tasks


async def test_zero_errors_across_shifts_rollback_and_decommission(tmp_path: Path) -> None:
    # A long standby at first, so the rollback below finds blue still registered whatever the
    # machine's speed; shortened before the last deployment, whose old side must go away.
    async with workflow_stack(tmp_path, drain_seconds=1, standby_seconds=300) as s, \
            no_retry_session(16) as slow_session, steady_load(s.url) as load:
        slow: list[asyncio.Task[str]] = []

        async def flowing(more: int = 50) -> None:
            mark = load.total
            await wait_for(lambda: load.total >= mark + more, timeout=20, message="the load keeps flowing")

        await flowing()
        slow += await start_slow_requests(s, slow_session)
        did = await s.deploy(s.body([10, 50, 100]))
        await s.wait_deployment(did, "step 0", status="shifting", step=0)
        await s.wait_envoy(90, 10)
        await flowing()

        slow += await start_slow_requests(s, slow_session)
        await s.command(did, "promote")
        await s.wait_envoy(50, 50)
        await flowing()

        slow += await start_slow_requests(s, slow_session)
        await s.command(did, "promote")
        await s.wait_envoy(0, 100)
        await flowing()

        slow += await start_slow_requests(s, slow_session)
        view = await s.api.call("POST", "/v1/services/shop/rollback")
        assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
        assert (await s.deployment(did))["status"] == "rolled_back"
        assert (await s.deployment("shop-1"))["status"] == "active"
        await s.wait_envoy(100, 0)
        await flowing()

        await s.api.call("PUT", "/v1/services/shop", {"standby_seconds": 2})
        slow += await start_slow_requests(s, slow_session)
        again = await s.deploy(s.body([100], version="v3"))
        await s.wait_deployment(again, "atomic switch done", status="active", baking=False)
        await s.wait_envoy(0, 100)
        await flowing()
        await s.wait_deployment("shop-1", "blue decommissioned", status="decommissioned", hooks_pending=False)
        assert (await s.service())["environments"]["blue"]["endpoints"] == []
        await s.wait_envoy(None, 100)
        await flowing(200)  # and after the old side left the fleet config

        results = await asyncio.gather(*slow)
        load.stop.set()
    assert load.total < MAX_LOAD_REQUESTS, "the load stopped early; the test saw only part of the switches"
    assert set(load.statuses) == {200}, f"non-2xx or errors: {dict(load.statuses)}; first errors: {load.errors[:5]}"
    assert all(r.startswith("200 ") for r in results), results
    assert len(results) == 15
    # The long requests were in flight on both sides while traffic moved.
    assert {r.split()[1] for r in results} == {"blue", "green"}, results


# =============================================================================================
# 5. Restart mid-shift
# =============================================================================================


async def test_control_plane_killed_mid_shift_resumes_the_same_step(tmp_path: Path) -> None:
    async with workflow_stack(tmp_path) as s:
        did = await s.deploy(s.body([10, 50, 100]))
        await s.wait_deployment(did, "step 0", status="shifting", step=0)
        await s.command(did, "promote")
        before = await s.wait_deployment(did, "step 1", status="shifting", step=1)
        await s.wait_envoy(50, 50)

        s.cp.process.kill(signal.SIGKILL)
        await s.cp.process.wait()
        # Envoy keeps serving the split it holds.
        in_band(await s.sample(), 0.50)

        await s.cp.start()
        after = await s.deployment(did)
        assert after == before, "the deployment changed across the restart"
        assert (after["status"], after["step"], after["deadline"]) == ("shifting", 1, before["deadline"])
        assert (await s.service())["traffic"]["weights"] == {"blue": 50, "green": 50}
        await wait_proxies(s.api, 1)
        assert await s.envoy_weights() == {"shop-blue": 50, "shop-green": 50}
        assert await s.deployment(did) == before  # the resumed driver did not act on it
        promoted = await s.command(did, "promote")
        assert (promoted["status"], promoted["step"]) == ("active", 2)
        await s.wait_envoy(0, 100)
        await s.wait_deployment(did, "complete", status="active", baking=False)

        # A step whose deadline passes while the control plane is down advances once, on restart.
        second = await s.deploy(s.body([10, 50, 100], version="v3", step_seconds=3, endpoints=[s.blue.address]))
        d = await s.wait_deployment(second, "step 0", status="shifting", step=0)
        assert d["environment"] == "blue"
        deadline = datetime.fromisoformat(d["deadline"]).timestamp()
        s.cp.process.kill(signal.SIGKILL)
        await s.cp.process.wait()
        await s.wait_envoy(10, 90)  # (blue is the new side now)
        await wait_for(lambda: time.time() > deadline + 0.5, timeout=10, message="the step deadline passed while down")
        await s.cp.start()
        d = await s.wait_deployment(second, "advanced after the restart", step=1)
        step_events = [(e, t) for e, t in zip(events(d), times(d)) if e[2].startswith("step ")]
        assert [e[2] for e, _ in step_events][:1] == ["step 1: 50% after 3s"]
        assert sum(1 for e, _ in step_events if e[2].startswith("step 1:")) == 1, events(d)
        assert step_events[0][1] >= deadline - 1e-5
        # Not a double step: if step 2 has come by now, it came a full step_seconds later.
        later = [t for e, t in step_events if e[2].startswith("step 2:")]
        assert all(t - step_events[0][1] >= 3.0 - 1e-5 for t in later), events(d)


# =============================================================================================
# 6. Commands
# =============================================================================================


async def test_commands_pause_resume_abort_conflicts_and_manual_promote(tmp_path: Path) -> None:
    async with workflow_stack(tmp_path, standby_seconds=300) as s:
        did = await s.deploy(s.body([10, 50, 100]))
        d = await s.wait_deployment(did, "step 0", status="shifting", step=0)
        assert d["deadline"] is not None and d["paused_remaining"] is None

        # One deployment at a time, and no manual traffic changes under it.
        conflict = await s.api.call("POST", "/v1/services/shop/deployments", s.body(version="v3"), expect=409)
        assert did in conflict["error"], conflict
        for method, path, body in [
            ("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 50, "green": 50}}),
            ("POST", "/v1/services/shop/switch", None),
            ("PUT", "/v1/services/shop/environments/green", {"version": "v9", "endpoints": [s.green.address]}),
        ]:
            conflict = await s.api.call(method, path, body, expect=409)
            assert did in conflict["error"], (path, conflict)
        assert (await s.service())["traffic"]["weights"] == {"blue": 90, "green": 10}
        refused = await s.command(did, "decommission", expect=409)  # blue takes traffic: nothing to retire
        assert "no draining or standby environment" in refused["error"], refused

        paused = await s.command(did, "pause")
        assert paused["deadline"] is None and 0 < paused["paused_remaining"] <= LONG_STEP
        assert events(paused)[-1][:2] == ("shifting", "token:admin") and events(paused)[-1][2] == "paused"
        assert await s.command(did, "pause") == paused  # idempotent
        resumed = await s.command(did, "resume")
        assert resumed["paused_remaining"] is None and resumed["deadline"] is not None
        remaining = datetime.fromisoformat(resumed["deadline"]).timestamp() - datetime.fromisoformat(resumed["updated_at"]).timestamp()
        assert remaining == pytest.approx(paused["paused_remaining"], abs=0.01)
        assert await s.command(did, "resume") == resumed  # idempotent

        # Abort during the shift: everything back to blue at once.
        aborted = await s.command(did, "abort")
        assert (aborted["status"], aborted["reason"]) == ("rolled_back", "aborted")
        await s.wait_envoy(100, 0)
        assert await s.sample(200) == Counter({"blue": 200})
        assert (await s.deployment("shop-1"))["status"] == "active"
        for action in ("promote", "pause", "resume"):
            refused = await s.command(did, action, expect=409)
            assert did in refused["error"] and "rolled_back" in refused["error"], (action, refused)
        for action in ("abort", "rollback"):  # a retried stop changes nothing
            assert await s.command(did, action) == aborted, action

        # Abort before any production traffic: failed. The smoke test is slow, so it is caught
        # while the deployment is still `deploying`.
        slow_before = slow_started(s.green)
        slow_smoke = {"checks": [{"path": "/slow?seconds=2", "timeout_seconds": 10, "retries": 0}]}
        early = await s.deploy(s.body(smoke=slow_smoke, version="v3"))
        await wait_for(lambda: slow_started(s.green) > slow_before, timeout=15, message="smoke request in flight")
        aborted = await s.command(early, "abort")
        assert (aborted["status"], aborted["reason"]) == ("failed", "aborted")
        assert events(aborted)[-1][:2] == ("failed", "token:admin")
        assert (await s.service())["traffic"]["weights"] == {"blue": 100, "green": 0}
        assert "only a shifting deployment can be promoted" in (await s.command(early, "promote", expect=409))["error"]
        assert await s.command(early, "abort") == aborted  # idempotent

        # auto_promote false: hold at the step before 100 % until promoted.
        held = await s.deploy(s.body([50, 100], version="v4", step_seconds=1, auto_promote=False))
        d = await s.wait_deployment(held, "holding for promote", status="shifting", awaiting_promote=True)
        assert (d["step"], d["deadline"]) == (0, None)
        assert events(d)[-1][1] == "automatic" and "waiting for promote" in events(d)[-1][2]
        assert (await s.service())["traffic"]["weights"] == {"blue": 50, "green": 50}
        await s.wait_envoy(50, 50)
        assert (await s.deployment(held)) == d  # still holding (no timer left to fire)
        promoted = await s.command(held, "promote")
        assert (promoted["status"], promoted["step"], promoted["awaiting_promote"]) == ("active", 1, False)
        await s.wait_envoy(0, 100)
        done = await s.wait_deployment(held, "complete", status="active", baking=False)
        refused = await s.command(held, "promote", expect=409)
        assert held in refused["error"] and "only a shifting deployment can be promoted" in refused["error"]
        assert done["status"] == "active"

        # Ending the 300 s standby early, by the id of the deployment it backs up.
        await s.wait_deployment("shop-1", "blue on standby", status="standby")
        await s.command(held, "decommission")
        blue = await s.wait_deployment("shop-1", "blue retired on request", status="decommissioned", hooks_pending=False)
        assert events(blue)[-2][:2] == ("decommissioned", "token:admin") and "on request" in events(blue)[-2][2]
        assert (await s.service())["environments"]["blue"]["endpoints"] == []
        await s.wait_envoy(None, 100)
        assert await s.sample(100) == Counter({"green": 100})


# =============================================================================================
# 7. Bad input on every new endpoint: 4xx, a message naming the problem, nothing changed
# =============================================================================================


BAD_DEPLOYMENTS: list[tuple[str, Any, str]] = [
    ("not an object", [], "deployment must be a JSON object"),
    ("unknown field", {"colour": "red"}, "unknown field(s) in deployment: colour"),
    ("unknown strategy field", {"strategy": {"steps": [100], "stepz": 1}}, "unknown field(s) in strategy: stepz"),
    ("unknown check field", {"smoke": {"checks": [{"path": "/", "expect": 200}]}}, "unknown field(s) in smoke.checks[0]: expect"),
    ("steps not increasing", {"strategy": {"steps": [50, 10, 100]}}, "strategy.steps must increase strictly"),
    ("steps repeating", {"strategy": {"steps": [50, 50, 100]}}, "strategy.steps must increase strictly"),
    ("steps not ending at 100", {"strategy": {"steps": [10, 50]}}, "strategy.steps must end at 100"),
    ("steps empty", {"strategy": {"steps": []}}, "strategy.steps must be a list"),
    ("steps not a list", {"strategy": {"steps": 100}}, "strategy.steps must be a list"),
    ("step over 100", {"strategy": {"steps": [10, 150]}}, "strategy.steps[1] must be between 1 and 100"),
    ("step zero", {"strategy": {"steps": [0, 100]}}, "strategy.steps[0] must be between 1 and 100"),
    ("step not an integer", {"strategy": {"steps": [10.5, 100]}}, "strategy.steps[0] must be an integer"),
    ("negative step_seconds", {"strategy": {"step_seconds": -1}}, "strategy.step_seconds must be between 0"),
    ("step_seconds a string", {"strategy": {"step_seconds": "10"}}, "strategy.step_seconds must be a number"),
    ("negative bake_seconds", {"strategy": {"bake_seconds": -5}}, "strategy.bake_seconds must be between 0"),
    ("auto_promote not a bool", {"strategy": {"auto_promote": "yes"}}, "strategy.auto_promote must be true or false"),
    ("check method", {"smoke": {"checks": [{"method": "FETCH"}]}}, "smoke.checks[0].method must be one of"),
    ("check status too low", {"smoke": {"checks": [{"expect_status": 99}]}}, "smoke.checks[0].expect_status must be between 100 and 599"),
    ("check status too high", {"smoke": {"checks": [{"expect_status": 600}]}}, "smoke.checks[0].expect_status must be between 100 and 599"),
    ("check status a string", {"smoke": {"checks": [{"expect_status": "200"}]}}, "smoke.checks[0].expect_status must be an integer"),
    ("check path relative", {"smoke": {"checks": [{"path": "healthz"}]}}, "smoke.checks[0].path must start with '/'"),
    ("check path with space", {"smoke": {"checks": [{"path": "/a b"}]}}, "smoke.checks[0].path must start with '/'"),
    ("smoke command not a list", {"smoke": {"commands": ["true"]}}, "smoke.commands[0] must be a non-empty list of strings"),
    ("smoke webhook ftp", {"smoke": {"webhooks": [{"url": "ftp://example.com/x"}]}}, "smoke.webhooks[0].url must be an http(s) URL"),
    ("decommission webhook not http", {"decommission": {"webhooks": [{"url": "file:///etc/passwd"}]}},
     "decommission.webhooks[0].url must be an http(s) URL"),
    ("decommission webhook no host", {"decommission": {"webhooks": [{"url": "http://"}]}}, "decommission.webhooks[0].url must be an http(s) URL"),
    ("decommission webhook without url", {"decommission": {"webhooks": [{}]}}, "decommission.webhooks[0].url is required"),
    ("decommission unknown field", {"decommission": {"hooks": []}}, "unknown field(s) in decommission: hooks"),
    ("analysis no_data", {"analysis": {"no_data": "maybe"}}, "analysis.no_data must be one of wait, fail, pass"),
    ("analysis failure_limit 0", {"analysis": {"failure_limit": 0}}, "analysis.failure_limit must be between 1"),
    ("analysis max_error_rate > 1", {"analysis": {"max_error_rate": 1.5}}, "analysis.max_error_rate must be between 0 and 1"),
    ("analysis unknown field", {"analysis": {"window": 5}}, "unknown field(s) in analysis: window"),
    ("endpoints empty", {"endpoints": []}, "endpoints must list at least one"),
    ("endpoint without port", {"endpoints": ["127.0.0.1"]}, "invalid endpoint '127.0.0.1'"),
    ("endpoint a host name", {"endpoints": ["localhost:8080"]}, "invalid endpoint 'localhost:8080'"),
    ("endpoint port 0", {"endpoints": ["127.0.0.1:0"]}, "port must be 1-65535"),
    ("endpoints not a list", {"endpoints": "127.0.0.1:80"}, "endpoints must be a list"),
    ("endpoints missing", {"endpoints": None}, "'endpoints' is required"),
    ("version missing", {"version": None}, "'version' is required"),
    ("version malformed", {"version": "v 2"}, "invalid version 'v 2'"),
]


async def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with workflow_stack(tmp_path) as s:
        # A deployment under way (step 0 of 600 s), so commands have something to refuse on.
        did = await s.deploy(s.body([10, 50, 100]))
        await s.wait_deployment(did, "step 0", status="shifting", step=0)
        await s.wait_envoy(90, 10)

        async def snapshot() -> Any:
            return (await s.service(), await s.api.call("GET", "/v1/services/shop/deployments"),
                    await s.api.call("GET", "/v1/services"))

        async def raw(method: str, path: str, data: bytes | None = None, **query: str) -> tuple[int, Any]:
            headers = {**s.cp.headers, **({"Content-Type": "application/json"} if data is not None else {})}
            async with s.session.request(method, s.cp.admin_url + path, data=data, headers=headers, params=query or None) as response:
                return response.status, await response.json()

        before = await snapshot()
        failures: list[str] = []

        async def refused(what: str, status: int, expected: str, method: str, path: str, data: bytes | None = None, **query: str) -> None:
            got, body = await raw(method, path, data, **query)
            if got != status or not isinstance(body, dict) or set(body) != {"error"} or expected not in body["error"]:
                failures.append(f"{what}: {method} {path} {data!r} {query} -> {got} {body} (expected {status} naming {expected!r})")

        valid = s.body([10, 100], version="v3")
        for what, change, expected in BAD_DEPLOYMENTS:
            if isinstance(change, dict):
                body: Any = dict(valid)
                for key, value in change.items():
                    if value is None:
                        body.pop(key, None)
                    elif key in ("strategy", "smoke") and isinstance(value, dict):
                        body[key] = {**valid[key], **value} if key == "strategy" else value
                    else:
                        body[key] = value
            else:
                body = change
            await refused(what, 400, expected, "POST", "/v1/services/shop/deployments", json.dumps(body).encode())

        await refused("invalid JSON", 400, "not valid JSON", "POST", "/v1/services/shop/deployments", b'{"version": "v3",')
        await refused("empty body", 400, "request body is empty", "POST", "/v1/services/shop/deployments", b"")
        await refused("unknown service", 404, "unknown service 'ghost'", "POST", "/v1/services/ghost/deployments",
                      json.dumps(valid).encode())
        await refused("unknown service (list)", 404, "unknown service 'ghost'", "GET", "/v1/services/ghost/deployments")

        for bad_id in ("shop-99", "ghost-1", "shop", "shop-", "shop-x1", "-1", "shop-1.5"):
            await refused(f"unknown id {bad_id}", 404, "unknown deployment", "GET", f"/v1/deployments/{bad_id}")
            for action in ("promote", "pause", "resume", "rollback", "abort", "decommission"):
                await refused(f"{action} unknown id {bad_id}", 404, "unknown deployment", "POST", f"/v1/deployments/{bad_id}/{action}")

        for action in ("promote", "pause", "resume", "rollback", "abort", "decommission"):
            await refused(f"{action} with a body", 400, f"{action} takes no body", "POST", f"/v1/deployments/{did}/{action}", b'{"step": 2}')
            await refused(f"{action} with a list body", 400, f"{action} takes no body", "POST", f"/v1/deployments/{did}/{action}", b"[]")
            await refused(f"{action} with bad JSON", 400, "not valid JSON", "POST", f"/v1/deployments/{did}/{action}", b"{")
        await refused("full=maybe", 400, "full", "POST", f"/v1/deployments/{did}/promote", full="maybe")
        await refused("full=1", 400, "full", "POST", f"/v1/deployments/{did}/promote", full="1")
        await refused("full on pause", 400, "full", "POST", f"/v1/deployments/{did}/pause", full="true")
        await refused("step=abc", 400, "step must be a step index", "POST", f"/v1/deployments/{did}/promote", step="abc")
        await refused("step=-1", 400, "step must be a step index", "POST", f"/v1/deployments/{did}/promote", step="-1")
        await refused("step on pause", 400, "only for promote", "POST", f"/v1/deployments/{did}/pause", step="1")
        await refused("service rollback with a body", 400, "rollback takes no body", "POST", "/v1/services/shop/rollback", b'{"to": "blue"}')
        await refused("unknown service rollback", 404, "unknown service 'ghost'", "POST", "/v1/services/ghost/rollback")

        assert not failures, "\n".join(failures)
        assert await snapshot() == before
        assert await s.envoy_weights() == {"shop-blue": 90, "shop-green": 10}


# =============================================================================================
# 8. The driver's bookkeeping for commands, in process (no Envoy needed: nothing is connected,
#    so every change counts as converged at once)
# =============================================================================================


@contextlib.asynccontextmanager
async def in_process(tmp_path: Path, settings: Any = None) -> AsyncIterator[tuple[Any, Any]]:
    """A control plane in this process (xDS on a free port) and a test client of its admin API;
    ``settings`` default: smoke command ``sleep`` allowed."""
    from aiohttp.test_utils import TestClient, TestServer

    from controlplane.admin.api import build_admin_app
    from controlplane.app import ControlPlane
    from controlplane.config import Allowlists, Settings
    from controlplane.store.sqlite import open_sqlite_store

    settings = settings or Settings(allow=Allowlists(smoke_commands=(("sleep",),)))
    cp = ControlPlane(settings, await open_sqlite_store(tmp_path / "state.db"))
    try:
        await cp.start("127.0.0.1:0")
        client = TestClient(TestServer(build_admin_app(cp, None)))
        await client.start_server()
        try:
            yield cp, client
        finally:
            await client.close()
    finally:
        await cp.stop(grace=0.1)


async def _call(client: Any, method: str, path: str, body: Any = None, expect: int = 200, **query: str) -> Any:
    async with client.request(method, path, json=body, params=query or None) as response:
        data = await response.json()
        assert response.status == expect, f"{method} {path} -> {response.status}: {data}"
        return data


async def _shifting(cp: Any, client: Any) -> str:
    """shop: blue v1 by hand, then a deployment of green v2 (no smoke tests) at step 0."""
    await _call(client, "PUT", "/v1/services/shop", {"drain_seconds": 1, "standby_seconds": 300})
    await _call(client, "PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]})
    created = await _call(client, "POST", "/v1/services/shop/deployments", {
        "version": "v2", "endpoints": ["127.0.0.1:9002"],
        "strategy": {"steps": [10, 50, 100], "step_seconds": LONG_STEP, "bake_seconds": 0}}, expect=202)

    async def at_step_0() -> bool:
        d = await _call(client, "GET", f"/v1/deployments/{created['id']}")
        return d["status"] == "shifting" and d["step"] == 0

    await wait_for(at_step_0, timeout=10, message="step 0")
    return str(created["id"])


def _metric(cp: Any, name: str, **labels: str) -> float | None:
    value = cp.metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


async def test_cutover_is_observed_when_promote_reaches_100(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        did = await _shifting(cp, client)
        await _call(client, "POST", f"/v1/deployments/{did}/promote", full="true")
        await wait_for(lambda: _metric(cp, "bluegreen_deployments_total", service="shop", result="succeeded"), timeout=10,
                       message="deployment succeeded")
        await wait_for(lambda: _metric(cp, "bluegreen_cutover_seconds_count", service="shop") == 1.0, timeout=2,
                       message="bluegreen_cutover_seconds observed for a promoted shift")


async def test_service_level_rollback_of_a_deployment_is_counted_like_the_deployment_command(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        did = await _shifting(cp, client)
        view = await _call(client, "POST", "/v1/services/shop/rollback")
        assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
        assert (await _call(client, "GET", f"/v1/deployments/{did}"))["status"] == "rolled_back"
        assert _metric(cp, "bluegreen_deployments_total", service="shop", result="rolled_back") == 1.0
        assert _metric(cp, "bluegreen_rollbacks_total", service="shop", reason="api") == 1.0
        await wait_for(lambda: _metric(cp, "bluegreen_deployment_phase", service="shop", phase="idle") == 1.0, timeout=2,
                       message="phase idle after the rollback")


async def test_deployment_rollback_command_is_counted(tmp_path: Path) -> None:
    """The control for the test above: the same rollback through /v1/deployments/{id}/rollback."""
    async with in_process(tmp_path) as (cp, client):
        did = await _shifting(cp, client)
        rolled = await _call(client, "POST", f"/v1/deployments/{did}/rollback")
        assert rolled["status"] == "rolled_back" and rolled["reason"] == "rollback requested"
        await wait_for(lambda: _metric(cp, "bluegreen_deployment_phase", service="shop", phase="idle") == 1.0, timeout=5,
                       message="phase idle after the rollback")
        assert _metric(cp, "bluegreen_deployments_total", service="shop", result="rolled_back") == 1.0
        assert _metric(cp, "bluegreen_rollbacks_total", service="shop", reason="api") == 1.0


async def _completed_with_blue_standby(cp: Any, client: Any, standby_seconds: int) -> None:
    """shop: blue v1 by hand, green v2 deployed atomically and complete, blue on standby."""
    await _call(client, "PUT", "/v1/services/shop", {"drain_seconds": 0, "standby_seconds": standby_seconds})
    await _call(client, "PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]})
    await _call(client, "POST", "/v1/services/shop/deployments", {
        "version": "v2", "endpoints": ["127.0.0.1:9002"], "strategy": {"steps": [100], "bake_seconds": 0}}, expect=202)

    async def settled() -> bool:
        green = await _call(client, "GET", "/v1/deployments/shop-2")
        blue = await _call(client, "GET", "/v1/deployments/shop-1")
        return green["status"] == "active" and not green["baking"] and blue["status"] == "standby"

    await wait_for(settled, timeout=10, message="green complete, blue on standby")


async def test_rollback_never_sends_traffic_to_a_version_still_under_smoke_test(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        await _completed_with_blue_standby(cp, client, standby_seconds=300)
        created = await _call(client, "POST", "/v1/services/shop/deployments", {
            "version": "v3", "endpoints": ["127.0.0.1:9003"],
            "smoke": {"commands": [["sleep", "30"]], "command_timeout_seconds": 60}}, expect=202)
        assert (await _call(client, "GET", f"/v1/deployments/{created['id']}"))["status"] == "deploying"
        async with client.post("/v1/services/shop/rollback") as response:
            view = await response.json()
        # Either refused (409, naming the deployment in progress) or rolled back to something
        # verified; never 100 % to v3 while its smoke tests run.
        assert response.status == 409 and created["id"] in view["error"], (response.status, view.get("traffic"), view.get("environments", {}).get("blue"))


async def test_driver_idles_after_a_manual_switch_back_during_standby(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        await _completed_with_blue_standby(cp, client, standby_seconds=1)
        blue = await _call(client, "GET", "/v1/deployments/shop-1")
        deadline = datetime.fromisoformat(blue["deadline"]).timestamp()
        view = await _call(client, "POST", "/v1/services/shop/switch", {"to": "blue"})  # allowed: nothing in progress
        assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
        await wait_for(lambda: time.time() > deadline + 0.2, timeout=5, message="the old standby deadline passed")

        calls = 0
        step = cp.rollouts._step

        async def counting(name: str) -> Any:
            nonlocal calls
            calls += 1
            return await step(name)

        cp.rollouts._step = counting
        for _ in range(100):  # a hundred API round trips: an idle driver looks at shop at most once or twice
            await _call(client, "GET", "/v1/services/shop")
        assert calls <= 5, f"the driver looked at shop {calls} times while nothing was due"


async def test_a_deployment_prepared_for_an_environment_that_is_no_longer_idle_is_refused(tmp_path: Path) -> None:
    """A switch landing between reading the idle environment and committing the deployment (the
    admin API fills an endpoint source's endpoints in for the environment it read) is a 409 that
    stores nothing, never a deployment into the environment that just took production traffic."""
    from controlplane.errors import ConflictError
    from controlplane.model import Environment

    async with in_process(tmp_path) as (cp, client):
        await _call(client, "PUT", "/v1/services/shop", {})
        await _call(client, "PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]})
        await _call(client, "PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": ["127.0.0.1:9002"]})
        body = {"version": "v3", "endpoints": ["127.0.0.1:9003"]}
        # The caller prepared the body for blue, but green is idle.
        with pytest.raises(ConflictError, match="idle environment changed from blue to green"):
            await cp.rollouts.deploy("shop", body, target=Environment.BLUE)
        # The switch lands after deploy() read the service (green idle) and before its commit.
        stale = await cp.repo.service("shop")
        await _call(client, "PUT", "/v1/services/shop/traffic", {"weights": {"blue": 0, "green": 100}})
        read = cp.repo.service

        async def stale_read(name: str) -> Any:
            cp.repo.service = read  # only the first read is stale
            return stale

        cp.repo.service = stale_read
        with pytest.raises(ConflictError, match="idle environment changed from green to blue"):
            await cp.rollouts.deploy("shop", body)
        assert [d.version for d in await cp.repo.deployments("shop") if d.version == "v3"] == []
        environments = (await _call(client, "GET", "/v1/services/shop"))["environments"]
        assert (environments["blue"]["version"], environments["green"]["version"]) == ("v1", "v2")
