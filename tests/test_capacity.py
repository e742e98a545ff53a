"""The capacity guard and scale hooks (docs/capacity.md): a real control plane, a real Envoy and
real upstreams. Blue serves with capacity 4; green v2 is deployed with one endpoint; the 50 %
step waits in the ``scaling`` phase, the scale webhook is asked for capacity 2, and registering
three more green endpoints lets the deployment finish. Green's share, as stored and as Envoy
routes, never exceeds what its capacity allows."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from controlplane import model
from controlplane.deploy import spec as deploy_spec
from controlplane.errors import ValidationError
from tests.harness import run_upstream, wait_for
from tests.test_workflow import events, webhook_server, workflow_stack

BLUE_CAPACITY = 4


def test_endpoint_weights_parse_and_store_unchanged_without_weights() -> None:
    state = model.parse_environment_spec({"version": "v1", "endpoints": ["10.0.0.1:80", {"address": "10.0.0.2:80", "weight": 3}]})
    assert state.capacity == 4
    assert [e.to_json() for e in state.endpoints] == ["10.0.0.1:80", {"address": "10.0.0.2:80", "weight": 3}]
    for bad, words in [({"address": "10.0.0.2:80", "weight": 0}, "weight must be an integer between 1"),
                       ({"address": "10.0.0.2:80", "wieght": 2}, "unknown field(s) in endpoint: wieght"),
                       ({"weight": 2}, "'address' ('IP:PORT') is required")]:
        with pytest.raises(ValidationError, match=".*".join(map(lambda w: w.replace("(", r"\(").replace(")", r"\)"), [words]))):
            model.parse_environment_spec({"version": "v1", "endpoints": [bad]})


def test_scale_spec_errors_name_the_field() -> None:
    base = {"version": "v2", "endpoints": ["10.0.0.1:80"]}
    with pytest.raises(ValidationError, match="scale.on_timeout must be one of fail, rollback"):
        deploy_spec.parse_deployment_spec({**base, "scale": {"on_timeout": "explode"}})
    with pytest.raises(ValidationError, match=r"scale.commands\[0\] must be a non-empty list"):
        deploy_spec.parse_deployment_spec({**base, "scale": {"commands": ["scale-up"]}})
    with pytest.raises(ValidationError, match="unknown field.*in scale: timeout"):
        deploy_spec.parse_deployment_spec({**base, "scale": {"timeout": 3}})


def test_standby_capacity_takes_a_number_or_a_percent_string_and_keeps_its_old_alias() -> None:
    base = {"version": "v2", "endpoints": ["10.0.0.1:80"]}

    def standby(scale: dict[str, Any]) -> float:
        parsed = deploy_spec.parse_deployment_spec({**base, "scale": scale}).scale
        assert parsed is not None
        return parsed.standby_capacity_percent

    assert standby({"standby_capacity": 50}) == 50
    assert standby({"standby_capacity": "50%"}) == 50
    assert standby({"standby_capacity": " 12.5 % "}) == 12.5
    assert standby({"standby_capacity_percent": 30}) == 30  # deprecated alias
    assert standby({}) == 0
    with pytest.raises(ValidationError, match="give standby_capacity or its deprecated alias standby_capacity_percent, not both"):
        standby({"standby_capacity": 50, "standby_capacity_percent": 50})
    for bad in ["50", "half%", "%", True, [50]]:
        with pytest.raises(ValidationError, match="scale.standby_capacity must be"):
            standby({"standby_capacity": bad})
    with pytest.raises(ValidationError, match="scale.standby_capacity must be between 0 and 100"):
        standby({"standby_capacity": "150%"})
    # Stored under the documented name, and a stored spec parses back to the same value.
    spec = deploy_spec.parse_deployment_spec({**base, "scale": {"standby_capacity_percent": 40}})
    stored = deploy_spec.spec_to_dict(spec)
    assert stored["scale"]["standby_capacity"] == 40 and "standby_capacity_percent" not in stored["scale"]
    assert deploy_spec.parse_deployment_spec(stored) == spec


@pytest.mark.envoy
@pytest.mark.timeout(180)
async def test_a_step_waits_for_capacity_and_goes_on_when_endpoints_arrive(tmp_path: Path) -> None:
    async with workflow_stack(tmp_path, drain_seconds=1, standby_seconds=1) as s, webhook_server() as hooks, \
            contextlib.AsyncExitStack() as extra:
        await s.api.call("PUT", "/v1/services/shop/environments/blue",
                         {"version": "v1", "endpoints": [{"address": s.blue.address, "weight": BLUE_CAPACITY}]})
        green_endpoints: list[Any] = [s.green.address]
        seen: list[tuple[str, int, int]] = []  # (where, green weight, green capacity when seen)
        stop = asyncio.Event()

        async def sample() -> None:
            # Green's share as stored and as Envoy routes it, next to green's stored capacity
            # at that moment (read before the weights, so a capacity seen is never newer).
            while not stop.is_set():
                capacity = len(green_endpoints)
                view = await s.service()
                seen.append(("stored", view["traffic"]["weights"]["green"], capacity))
                seen.append(("envoy", (await s.envoy_weights()).get("shop-green", 0), capacity))
                await asyncio.sleep(0.05)  # a sampling rate, not a synchronisation

        sampler = asyncio.create_task(sample())
        body = s.body([25, 50, 100], step_seconds=1, bake_seconds=0,
                      scale={"webhooks": [{"url": f"{hooks.url}/scale"}], "timeout_seconds": 600, "standby_capacity": "50%"})
        did = await s.deploy(body)
        waiting = await s.wait_deployment(did, "waits for capacity at 50%", timeout=60, status="shifting", phase="scaling",
                                          step=0, scaling_step=1)
        assert waiting["baseline_capacity"] == BLUE_CAPACITY
        assert "50% needs capacity 2 in green, it has 1" in events(waiting)[-1][2] or any(
            "50% needs capacity 2 in green, it has 1" in e[2] for e in events(waiting))

        async def asked() -> list[dict[str, Any]] | None:
            bodies = [c["body"] for c in hooks.calls if c["path"] == "/scale"]
            return bodies or None
        bodies = await wait_for(asked, timeout=30, message="the scale webhook is called")
        assert bodies[0] == {"service": "shop", "environment": "green", "deployment": did, "desired_capacity": 2, "current_capacity": 1}
        assert (await s.service())["traffic"]["weights"] == {"blue": 75, "green": 25}
        await s.wait_envoy(75, 25)

        # A new version in the deploying environment is still refused; more endpoints are not.
        refused = await s.api.call("PUT", "/v1/services/shop/environments/green", {"version": "v9", "endpoints": green_endpoints}, expect=409)
        assert did in refused["error"]
        for _ in range(3):
            green_endpoints.append((await extra.enter_async_context(run_upstream("green", "v2"))).address)
        await s.api.call("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": green_endpoints})
        done = await s.wait_deployment(did, "finishes", timeout=60, status="active", baking=False)
        assert done["phase"] is None and done["scaling_step"] is None
        reasons = [e[2] for e in events(done)]
        assert any("capacity 4 in green is enough; step 1: 50%" in r for r in reasons), reasons
        assert any("scale hooks for green: desired capacity 2, current 1: 1 called" in r for r in reasons), reasons

        async def shrunk() -> dict[str, Any] | None:
            return next((c["body"] for c in hooks.calls if c["path"] == "/scale" and c["body"]["environment"] == "blue"), None)
        standby = await wait_for(shrunk, timeout=60, message="the scale hook shrinks blue to the warm pool after decommission")
        assert standby["desired_capacity"] == 2 and standby["current_capacity"] == 0  # 50 % of 4
        stop.set()
        await sampler

    # Green's share never exceeded what its capacity allowed: share x 4 / 100 <= capacity.
    assert seen and max(w for _, w, _ in seen) == 100
    too_much = [x for x in seen if x[1] * BLUE_CAPACITY > 100 * x[2]]
    assert not too_much, too_much
    assert any(where == "envoy" and w == 25 for where, w, _ in seen)
