"""Session affinity, header/cookie targeting and request mirroring with a real Envoy, a real
`bluegreen serve` and real demo apps (blue v1, green v2). Steps move on explicit promotes (long
step timers), so nothing waits on a timer except the mirror phase's analysis."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests.harness import ENVIRONMENT_HEADER, binomial_band, run_upstream, sample_environments, settle_on, wait_for
from tests.test_analysis import steady_load
from tests.test_envoy import blue_only_stack

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(180)]

CLIENTS = 200
LONG = 600  # seconds: a step timer that never fires during a test
COOKIE = "bluegreen-env"


class Deployments:
    def __init__(self, api: Any, envoy: Any, port: int) -> None:
        self.api, self.envoy, self.port = api, envoy, port
        self.url = f"http://127.0.0.1:{port}/"

    async def deploy(self, endpoint: str, version: str = "v2", **extra: Any) -> str:
        body = {"version": version, "endpoints": [endpoint], "smoke": {"checks": [{"path": "/healthz"}]},
                "strategy": {"steps": [10, 50, 100], "step_seconds": LONG, "bake_seconds": LONG}, **extra}
        created = await self.api.call("POST", "/v1/services/shop/deployments", body, expect=202)
        return str(created["id"])

    async def wait(self, deployment_id: str, timeout: float = 60, **expected: Any) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            d = await self.api.call("GET", f"/v1/deployments/{deployment_id}")
            if d["status"] in ("failed", "rolled_back") and d["status"] != expected.get("status"):
                raise AssertionError(f"{deployment_id} ended {d['status']}: {d['reason']}")
            return d if all(d[k] == v for k, v in expected.items()) else None

        return await wait_for(check, timeout=timeout, message=f"{deployment_id} reaches {expected}")  # type: ignore[no-any-return]

    async def command(self, deployment_id: str, action: str) -> None:
        await self.api.call("POST", f"/v1/deployments/{deployment_id}/{action}")

    async def routes(self) -> list[dict[str, Any]]:
        dump = await self.envoy.config_dump(resource="dynamic_route_configs")
        return [route for config in dump.get("configs", []) if config.get("route_config", {}).get("name") == "default-routes"
                for vhost in config["route_config"].get("virtual_hosts", []) for route in vhost.get("routes", [])]

    async def wait_routes(self, predicate: Any, what: str) -> None:
        async def check() -> bool:
            return bool(predicate(await self.routes()))

        await wait_for(check, timeout=30, message=f"Envoy holds {what}")

    async def wait_weights(self, green: int) -> None:
        """Envoy's production route has green at ``green`` % (and the affinity routes that go
        with it, which arrive in the same route table)."""
        def weights(routes: list[dict[str, Any]]) -> bool:
            for route in routes:
                clusters = route.get("route", {}).get("weighted_clusters", {}).get("clusters")
                if route.get("name") == "shop" and clusters is not None:
                    return {c["name"]: int(c.get("weight", 0)) for c in clusters}.get("shop-green") == green
            return False

        await self.wait_routes(weights, f"green at {green}%")


@contextlib.asynccontextmanager
async def release_stack(tmp_path: Path, *, green_error_rate: float = 0.0) -> AsyncIterator[tuple[Deployments, Any, Any, Any]]:
    async with blue_only_stack(tmp_path, {"drain_seconds": 1, "standby_seconds": 600}, green_error_rate=green_error_rate) as (
            cp, api, envoy, port, blue, green):
        yield Deployments(api, envoy, port), cp, blue, green


# =============================================================================================
# Session affinity


class Client:
    """One user with a cookie jar of its own (the affinity cookie only)."""

    def __init__(self) -> None:
        self.cookie: str | None = None
        self.seen: list[str] = []

    async def get(self, session: aiohttp.ClientSession, url: str) -> str:
        headers = {"cookie": f"other=1; {COOKIE}={self.cookie}"} if self.cookie else {}
        async with session.get(url, headers=headers) as response:
            await response.read()
            assert response.status == 200, response.status
            env = response.headers[ENVIRONMENT_HEADER]
            for value in response.headers.getall("set-cookie", []):
                name, _, rest = value.partition("=")
                if name == COOKIE:
                    self.cookie = rest.split(";", 1)[0]
                    assert f"Max-Age=3600" in value and "HttpOnly" in value, value
        self.seen.append(env)
        return env


async def everyone(clients: list[Client], url: str) -> Counter[str]:
    """Each client makes one request (16 at a time); the environments they landed on."""
    limit = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async def one(client: Client) -> str:
            async with limit:
                return await client.get(session, url)

        return Counter(await asyncio.gather(*(one(c) for c in clients)))


def in_band(counts: Counter[str], share: float) -> None:
    lo, hi = binomial_band(CLIENTS, share)
    assert counts["blue"] + counts["green"] == CLIENTS, counts
    assert lo <= counts["green"] <= hi, f"{share:.0%} of clients on green: saw {counts['green']}/{CLIENTS}, 99.9% band [{lo}, {hi}]"


async def test_affinity_keeps_each_client_on_its_version_through_the_steps_and_a_rollback_unpins(tmp_path: Path) -> None:
    async with release_stack(tmp_path) as (deployments, cp, blue, green):
        did = await deployments.deploy(green.address, affinity={"ttl_seconds": 3600})
        await deployments.wait(did, status="shifting", step=0)
        await deployments.wait_weights(10)
        clients = [Client() for _ in range(CLIENTS)]
        url = deployments.url

        in_band(await everyone(clients, url), 0.10)
        await everyone(clients, url)  # again at 10 %: nobody moves
        assert all(c.seen[0] == c.seen[1] for c in clients), [c.seen for c in clients if c.seen[0] != c.seen[1]]
        assert all(c.cookie and c.cookie.startswith(f"{c.seen[0]}:{did}:10:") for c in clients)

        await deployments.command(did, "promote")
        await deployments.wait(did, step=1)
        await deployments.wait_weights(50)
        counts = await everyone(clients, url)
        # Nobody who was on green goes back to blue; blue clients are drawn again so that the
        # share of clients on green is the step's.
        assert not [c for c in clients if c.seen[1] == "green" and c.seen[2] == "blue"]
        in_band(counts, 0.50)
        await everyone(clients, url)  # again at 50 %: nobody moves
        assert all(c.seen[2] == c.seen[3] for c in clients)

        await deployments.command(did, "promote")
        await deployments.wait(did, status="active")
        await deployments.wait_weights(100)
        await settle_on(url, "green")
        assert await everyone(clients, url) == Counter({"green": CLIENTS})

        # A rollback: every client on blue, whatever its pin says.
        await deployments.command(did, "rollback")
        await deployments.wait(did, status="rolled_back")
        await deployments.wait_weights(0)
        await settle_on(url, "blue")
        assert await everyone(clients, url) == Counter({"blue": CLIENTS})
        assert not any(r["name"].startswith("shop-pinned") for r in await deployments.routes())


# =============================================================================================
# Targeting


def _target_route_present(routes: list[dict[str, Any]]) -> bool:
    return any(r.get("name") == "shop-target" for r in routes)


async def test_targeting_sends_only_matching_requests_to_green_until_promoted(tmp_path: Path) -> None:
    async with release_stack(tmp_path) as (deployments, cp, blue, green):
        url = deployments.url
        did = await deployments.deploy(green.address, target={"headers": {"x-user-group": "beta"}, "seconds": LONG})
        d = await deployments.wait(did, status="shifting", phase="targeting")
        assert d["step"] == -1
        await deployments.wait_routes(_target_route_present, "the targeting route")
        assert await sample_environments(url, 100, headers={"x-user-group": "beta"}) == Counter({"green": 100})
        assert await sample_environments(url, 100) == Counter({"blue": 100})
        assert await sample_environments(url, 50, headers={"x-user-group": "alpha"}) == Counter({"blue": 50})

        # Promote ends the phase: the weighted steps, and no more targeting.
        await deployments.command(did, "promote")
        await deployments.wait(did, status="shifting", step=0, phase=None)
        await deployments.wait_routes(lambda routes: not _target_route_present(routes), "no targeting route")
        await deployments.command(did, "rollback")
        await deployments.wait(did, status="rolled_back")

        # A cookie rule: only the exact cookie value, wherever it is among the cookies.
        did = await deployments.deploy(green.address, version="v2b", target={"cookie": {"name": "beta", "value": "yes"}, "seconds": LONG})
        await deployments.wait(did, status="shifting", phase="targeting")
        await deployments.wait_routes(_target_route_present, "the cookie targeting route")
        for cookie in ("beta=yes", "a=1; beta=yes", "beta=yes; a=1", "a=1; beta=yes; b=2"):
            assert await sample_environments(url, 20, headers={"cookie": cookie}) == Counter({"green": 20}), cookie
        for cookie in ("beta=yess", "beta=no", "xbeta=yes", "a=beta=yes", "beta=ye"):
            assert await sample_environments(url, 20, headers={"cookie": cookie}) == Counter({"blue": 20}), cookie
        assert await sample_environments(url, 50) == Counter({"blue": 50})


# =============================================================================================
# Mirroring


async def _production_requests(session: aiohttp.ClientSession, upstream: Any) -> int:
    """Requests the app got without the preview mark: here, only mirrored copies."""
    async with session.get(f"{upstream.url}/_bluegreen/requests") as response:
        return int((await response.json())["production"])


MIRROR_ANALYSIS = {"interval_seconds": 1, "max_error_rate": 0.05, "max_p99_ms": None, "min_requests": 5, "no_data": "wait",
                   "failure_limit": 2}


async def test_mirror_phase_catches_a_failing_version_before_any_user_and_lets_a_good_one_through(tmp_path: Path) -> None:
    async with release_stack(tmp_path, green_error_rate=1.0) as (deployments, cp, blue, bad_green), \
            run_upstream("green", "v3") as good_green, aiohttp.ClientSession() as session:
        url = deployments.url
        stop = asyncio.Event()
        async with steady_load(url, stop) as statuses:
            did = await deployments.deploy(bad_green.address, mirror={"percent": 50, "seconds": LONG}, analysis=MIRROR_ANALYSIS)
            await deployments.wait(did, status="ready", phase="mirror")
            d = await deployments.wait(did, status="failed", timeout=90)
        assert d["reason"].startswith("analysis: error rate"), d["reason"]
        assert "mirror phase failed" in d["history"][-1]["reason"], d["history"]
        assert statuses and set(statuses) == {200}, Counter(statuses)  # every production answer came from blue, fine
        assert await _production_requests(session, bad_green) > 0  # the mirrored copies did reach green
        view = await deployments.api.call("GET", "/v1/services/shop")
        assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
        await deployments.wait_routes(lambda routes: not any(r.get("route", {}).get("request_mirror_policies") for r in routes),
                                      "no mirror policy")

        # A good version passes the mirror phase and goes on to the steps.
        stop = asyncio.Event()
        async with steady_load(url, stop) as statuses:
            did = await deployments.deploy(good_green.address, version="v3", mirror={"percent": 50, "seconds": 1},
                                           analysis=MIRROR_ANALYSIS)
            d = await deployments.wait(did, status="shifting", step=0, timeout=90)
        assert any("mirror phase passed" in e["reason"] for e in d["history"]), d["history"]
        assert await _production_requests(session, good_green) > 0
        assert set(statuses) == {200}, Counter(statuses)
