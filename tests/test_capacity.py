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


# ---------------------------------------------------------------------------------------------
# The scaling phase's timeout, on the pure state machine with the clock passed in


def _scaling_at(steps: list[int], on_timeout: str) -> tuple[Any, Any, str, float]:
    """blue has capacity 4, green v2 one endpoint; the deployment is waiting in `scaling` for
    the first step that needs more than 1. Returns (service, current, id, deadline)."""
    from controlplane.deploy import transitions
    from tests.test_rollout import T0, apply, blue_record, blue_service, spec

    blue = model.EnvironmentState("v1", (model.Endpoint("127.0.0.1", 9001, BLUE_CAPACITY),))
    service, current = blue_service(blue=blue), {model.Environment.BLUE: blue_record(), model.Environment.GREEN: None}
    body = spec(steps, step_seconds=60, scale={"timeout_seconds": 300, "on_timeout": on_timeout})
    service, current = apply(service, current, transitions.start(service, current, body, T0))
    did = current[model.Environment.GREEN].id
    service, current = apply(service, current, transitions.smoke_passed(service, current, did, T0 + 1, "ok"))
    service, current = apply(service, current, transitions.proceed(service, current, did, T0 + 2))
    d = current[model.Environment.GREEN]
    if d.phase != transitions.SCALING:  # the first step fitted: its time runs out, the next needs more
        service, current = apply(service, current, transitions.step_due(service, current, did, d.deadline))
    d = current[model.Environment.GREEN]
    assert d.phase == transitions.SCALING and d.deadline is not None
    return service, current, did, d.deadline


@pytest.mark.parametrize("on_timeout", ["fail", "rollback"])
def test_scaling_timeout_before_any_traffic_fails(on_timeout: str) -> None:
    from controlplane.deploy import transitions
    from controlplane.errors import ConflictError

    service, current, did, deadline = _scaling_at([50, 100], on_timeout)
    assert current[model.Environment.GREEN].status is model.DeploymentStatus.READY and service.traffic.weight(model.Environment.GREEN) == 0
    with pytest.raises(ConflictError, match="not at the end of a scaling phase"):
        transitions.scale_timeout(service, current, did, deadline - 1)
    change = transitions.scale_timeout(service, current, did, deadline)
    (failed,) = change.deployments
    assert failed.status is model.DeploymentStatus.FAILED and failed.phase is None
    assert "did not reach the capacity needed within 300s" in failed.history[-1].reason
    assert change.service.traffic.weight(model.Environment.BLUE) == 100


def test_scaling_timeout_holding_a_share_with_fail_pauses_at_that_share() -> None:
    from controlplane.deploy import transitions

    service, current, did, deadline = _scaling_at([25, 50, 100], "fail")
    assert service.traffic.weight(model.Environment.GREEN) == 25
    change = transitions.scale_timeout(service, current, did, deadline)
    (held,) = change.deployments
    assert held.status is model.DeploymentStatus.SHIFTING and held.phase is None and held.paused_remaining == 0.0
    assert "paused at 25%: add capacity and resume, or roll back" in held.history[-1].reason
    assert change.service.traffic.weight(model.Environment.GREEN) == 25


def test_scaling_timeout_holding_a_share_with_rollback_moves_everything_back() -> None:
    from controlplane.deploy import transitions

    service, current, did, deadline = _scaling_at([25, 50, 100], "rollback")
    change = transitions.scale_timeout(service, current, did, deadline)
    rolled = next(d for d in change.deployments if d.id == did)
    assert rolled.status is model.DeploymentStatus.ROLLED_BACK and rolled.scaling_step is None
    assert change.service.traffic.weight(model.Environment.BLUE) == 100


# ---------------------------------------------------------------------------------------------
# After decommission: the scale hooks get the warm pool (0 by default)


@pytest.mark.parametrize("standby, desired", [({}, 0), ({"standby_capacity": "50%"}, 2), ({"standby_capacity_percent": 25}, 1)])
async def test_after_decommission_the_scale_hook_gets_the_standby_capacity(standby: dict[str, Any], desired: int) -> None:
    import aiohttp

    from controlplane.deploy import driver
    from controlplane.metrics import Metrics
    from tests.test_rollout import blue_record

    async with webhook_server() as hooks, aiohttp.ClientSession() as session:
        metrics = Metrics()
        rollouts = driver.Rollouts(None, (), metrics, None)  # type: ignore[arg-type]
        rollouts._session = session
        body = {"version": "v2", "endpoints": ["127.0.0.1:9002"],
                "scale": {"webhooks": [{"url": f"{hooks.url}/scale"}, {"url": "http://127.0.0.1:9/refused"}], **standby}}
        owner = model.Deployment(id="shop-2", service="shop", version="v2", environment=model.Environment.GREEN,
                                 status=model.DeploymentStatus.ACTIVE, deployed_at=0, updated_at=0, baseline_capacity=BLUE_CAPACITY,
                                 spec=deploy_spec.spec_to_dict(deploy_spec.parse_deployment_spec(body)))
        summary = await rollouts._standby_scale(blue_record(status=model.DeploymentStatus.DECOMMISSIONED), owner)
    assert [c["body"] for c in hooks.calls] == [{"service": "shop", "environment": "blue", "deployment": "shop-1",
                                                 "desired_capacity": desired, "current_capacity": 0}]
    assert summary is not None and f"desired capacity {desired}, current 0" in summary
    assert metrics.scale_hook_calls.labels("ok")._value.get() == 1
    assert metrics.scale_hook_calls.labels("failed")._value.get() == 1


def test_status_shows_what_a_scaling_deployment_waits_for() -> None:
    from controlplane import cli

    line = cli._deployment_line({"id": "shop-2", "version": "v2", "environment": "green", "status": "shifting", "step": 0,
                                 "phase": "scaling", "scaling_step": 1, "baseline_capacity": 4,
                                 "spec": {"strategy": {"steps": [25, 50, 100]}, "scale": {"headroom_percent": 50}}})
    assert "SCALING: needs capacity 3 for step 2/3 (50%)" in line
