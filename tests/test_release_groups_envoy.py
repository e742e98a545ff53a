"""Release groups with a real Envoy (docs/releases.md): two services released together. Envoy's
own /config_dump is sampled as fast as it answers throughout, and every route table it held gave
both services the same weights; a breach in one member (its green answers 5xx) rolls back both."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests.harness import free_port, run_control_plane, run_upstream, wait_for
from tests.test_analysis import steady_load
from tests.test_envoy import Api, envoy_for, write_config

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(240)]

SERVICES = ("api", "web")


@dataclass
class Pair:
    api: Api
    envoy: Any
    port: int
    green: dict[str, Any]  # service -> its green upstream (registered by the release)


@contextlib.asynccontextmanager
async def two_services(tmp_path: Path, *, api_green_error_rate: float = 0.0) -> AsyncIterator[Pair]:
    """web and api, each with blue v1 serving 100 % through one Envoy, and a green v2 app running."""
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port, free_port())
    async with contextlib.AsyncExitStack() as stack:
        blue = {n: await stack.enter_async_context(run_upstream("blue", "v1")) for n in SERVICES}
        green = {n: await stack.enter_async_context(run_upstream("green", "v2", error_rate=api_green_error_rate if n == "api" else 0.0))
                 for n in SERVICES}
        cp = await stack.enter_async_context(run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        envoy = await stack.enter_async_context(envoy_for(cp, "edge-1"))
        api = Api(session, cp.admin_url)
        for name in SERVICES:
            await api.call("PUT", f"/v1/services/{name}", {"prefix": f"/{name}", "drain_seconds": 1, "standby_seconds": 300})
            await api.call("PUT", f"/v1/services/{name}/environments/blue", {"version": "v1", "endpoints": [blue[name].address]})

        async def converged() -> bool:
            views = [await api.call("GET", f"/v1/services/{name}") for name in SERVICES]
            return all(v["convergence"]["proxies"] == 1 and v["convergence"]["acked"] == 1 for v in views)

        await wait_for(converged, timeout=30, message="Envoy converged on web and api")
        await envoy.wait_ready()
        yield Pair(api, envoy, port, green)


async def green_weights(envoy: Any) -> tuple[int | None, ...] | None:
    """(api's green weight, web's green weight) in the route table Envoy holds right now; None
    for a service whose route is not there; None overall before any route table arrived."""
    dump = await envoy.config_dump(resource="dynamic_route_configs")
    found: dict[str, int] = {}
    seen_table = False
    for config in dump.get("configs", []):
        for vhost in config.get("route_config", {}).get("virtual_hosts", []):
            seen_table = True
            for route in vhost.get("routes", []):
                clusters = route.get("route", {}).get("weighted_clusters", {}).get("clusters")
                if route.get("name") in SERVICES and clusters is not None:
                    weights = {c["name"]: int(c.get("weight", 0)) for c in clusters}
                    found[route["name"]] = weights.get(f"{route['name']}-green", 0)
                elif route.get("name") in SERVICES:
                    cluster = route.get("route", {}).get("cluster", "")
                    found[route["name"]] = 100 if cluster.endswith("-green") else 0
    return tuple(found.get(n) for n in SERVICES) if seen_table else None


@contextlib.asynccontextmanager
async def sampling(envoy: Any) -> AsyncIterator[list[tuple[int | None, ...]]]:
    """Every route table Envoy holds, read back to back (no pause between reads) until the block ends."""
    samples: list[tuple[int | None, ...]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            weights = await green_weights(envoy)
            if weights is not None:
                samples.append(weights)

    task = asyncio.create_task(sample())

    async def first() -> bool:
        if task.done():
            task.result()  # a sampler that died says why
        return bool(samples)

    # The table before the block's first change is sampled: the coverage checks can count on it.
    await wait_for(first, timeout=30, message="first route table sampled")
    try:
        yield samples
    finally:
        stop.set()
        await task


def assert_members_agree(samples: list[tuple[int | None, ...]]) -> None:
    assert samples, "no route table sampled"
    split = [s for s in samples if len(set(s)) != 1]
    assert not split, f"{len(split)} of {len(samples)} route tables gave api and web different green weights, e.g. {split[:5]}"


async def release_settled(api: Api, release_id: str, timeout: float = 90) -> dict[str, Any]:
    async def over() -> dict[str, Any] | None:
        view = await api.call("GET", f"/v1/releases/{release_id}")
        return view if view["status"] != "in_progress" else None

    return await wait_for(over, timeout=timeout, message=f"{release_id} settles")  # type: ignore[no-any-return]


def release(green: dict[str, Any], steps: list[int], step_seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "services": {n: {"version": "v2", "endpoints": [green[n].address]} for n in SERVICES},
        "strategy": {"steps": steps, "step_seconds": step_seconds, "bake_seconds": 0},
        **extra,
    }


async def test_every_route_table_envoy_held_gave_both_members_the_same_weights(tmp_path: Path) -> None:
    async with two_services(tmp_path) as s, sampling(s.envoy) as samples:
        created = await s.api.call("POST", "/v1/releases", release(s.green, [10, 50, 100], 3), expect=202)
        view = await release_settled(s.api, created["id"])
        assert view["status"] == "complete", view

        async def at_100() -> bool:
            return await green_weights(s.envoy) == (100, 100)

        await wait_for(at_100, timeout=30, message="Envoy routes 100 % green for both")
    assert_members_agree(samples)
    assert samples[0] == (0, 0), samples[:3]
    seen = {sample[0] for sample in samples}
    # Each step was held in Envoy long enough to be sampled: the check above covers every step.
    assert {0, 10, 50, 100} <= seen, f"weights seen: {sorted(seen)} ({len(samples)} samples)"
    for member in view["members"]:
        assert member["status"] == "active" and member["weights"] == {"blue": 0, "green": 100}


async def test_a_breach_in_one_member_rolls_back_both(tmp_path: Path) -> None:
    async with two_services(tmp_path, api_green_error_rate=0.5) as s, sampling(s.envoy) as samples:
        stop = asyncio.Event()
        async with steady_load(f"http://127.0.0.1:{s.port}/api/", stop), steady_load(f"http://127.0.0.1:{s.port}/web/", stop):
            analysis = {"interval_seconds": 1, "max_error_rate": 0.05, "max_p99_ms": None, "min_requests": 10,
                        "no_data": "wait", "failure_limit": 2}
            created = await s.api.call("POST", "/v1/releases", release(s.green, [50, 100], 600, analysis=analysis), expect=202)
            view = await release_settled(s.api, created["id"])

            async def back_to_blue() -> bool:
                return await green_weights(s.envoy) == (0, 0)

            await wait_for(back_to_blue, timeout=30, message="Envoy routes both back to blue")
        web_id = dict((m["service"], m["deployment"]) for m in view["members"])["web"]
        web = await s.api.call("GET", f"/v1/deployments/{web_id}")
    assert view["status"] == "rolled_back", view
    assert "api breached" in view["reason"], view["reason"]
    assert {m["service"]: m["status"] for m in view["members"]} == {"api": "rolled_back", "web": "rolled_back"}
    assert {m["service"]: m["weights"]["green"] for m in view["members"]} == {"api": 0, "web": 0}
    assert "api breached" in web["reason"]
    assert_members_agree(samples)
    assert (50, 50) in samples, "the release shifted before the breach rolled it back"
