"""Pure unit tests of the deployment workflow's transitions (``controlplane/deploy/transitions.py``) and of
the analysis verdict (``deploy.driver.judge``). No I/O: services and deployment records are
built by hand, every transition gets an explicit ``now``, and the result is applied the way
``Repository.mutate`` applies it (a record replaces the one with its id; decommissioned records
leave the "current" view)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import pytest

from controlplane.deploy import transitions as rollout
from controlplane.deploy.spec import Analysis, parse_deployment_spec, spec_to_dict
from controlplane.errors import ConflictError, ValidationError
from controlplane.model import (
    Change,
    Deployment,
    DeploymentStatus as S,
    Endpoint,
    Environment,
    EnvironmentState,
    Event,
    Service,
    Traffic,
    deployment_from_dict,
    deployment_to_dict,
)
from controlplane.deploy.driver import judge

BLUE, GREEN = Environment.BLUE, Environment.GREEN
T0 = 1_000_000.0
BLUE_STATE = EnvironmentState("v1", (Endpoint("127.0.0.1", 9001),))
GREEN_ENDPOINT = "127.0.0.1:9002"

Current = dict[Environment, Deployment | None]


def spec(steps: list[int] | None = None, *, step_seconds: float = 600, bake_seconds: float = 0, auto_promote: bool = True,
         version: str = "v2", endpoints: list[str] | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {
        "version": version,
        "endpoints": endpoints or [GREEN_ENDPOINT],
        "strategy": {"steps": steps or [10, 50, 100], "step_seconds": step_seconds, "bake_seconds": bake_seconds,
                     "auto_promote": auto_promote},
        **extra,
    }
    return parse_deployment_spec(body)


def blue_service(**changes: Any) -> Service:
    """shop: blue v1 registered by hand and taking 100 %; drain 1 s, standby 2 s."""
    return replace(Service("shop", drain_seconds=1, standby_seconds=2, blue=BLUE_STATE, deployment_seq=1), **changes)


def blue_record(**changes: Any) -> Deployment:
    return replace(Deployment(id="shop-1", service="shop", version="v1", environment=BLUE, status=S.ACTIVE,
                              deployed_at=T0 - 100, activated_at=T0 - 100, updated_at=T0 - 100), **changes)


def apply(service: Service, current: Current, change: Change) -> tuple[Service, Current]:
    """What the repository would store: new records replace their old versions."""
    updated: Current = dict(current)
    for record in change.deployments:
        if record.status is S.DECOMMISSIONED:
            if updated.get(record.environment) is not None and updated[record.environment].id == record.id:  # type: ignore[union-attr]
                updated[record.environment] = None
        else:
            updated[record.environment] = record
    return change.service, updated


def by_id(change: Change) -> dict[str, Deployment]:
    return {d.id: d for d in change.deployments}


def assert_events(before: Current, change: Change, expected: Mapping[str, tuple[str, str]]) -> None:
    """Exactly the records in ``expected`` changed, each by exactly one new history event with
    that (status, actor), stamped with the record's updated_at."""
    old = {d.id: d for d in before.values() if d is not None}
    records = by_id(change)
    assert set(records) == set(expected), f"changed records {sorted(records)}, expected {sorted(expected)}"
    for rid, (status, actor) in expected.items():
        record = records[rid]
        prior = old[rid].history if rid in old else ()
        assert record.history[: len(prior)] == prior, f"{rid}: earlier history was rewritten"
        new = record.history[len(prior):]
        assert len(new) == 1, f"{rid}: expected exactly one new event, got {new}"
        event = new[0]
        assert (event.status, event.actor) == (status, actor), f"{rid}: {event}"
        assert event.reason, f"{rid}: event without a reason"
        assert event.at == record.updated_at
        assert record.status.value == status


def started(steps: list[int] | None = None, now: float = T0, **kwargs: Any) -> tuple[Service, Current, str]:
    """blue v1 active; a deployment of v2 into green has just started."""
    service, current = blue_service(), {BLUE: blue_record(), GREEN: None}
    change = rollout.start(service, current, spec(steps, **kwargs), now)
    service, current = apply(service, current, change)
    return service, current, current[GREEN].id  # type: ignore[union-attr]


def shifting(steps: list[int] | None = None, step: int = 0, now: float = T0 + 10, **kwargs: Any) -> tuple[Service, Current, str]:
    """...smoke passed and the shift is at ``step``."""
    service, current, did = started(steps, **kwargs)
    service, current = apply(service, current, rollout.smoke_passed(service, current, did, now, "ok"))
    for i in range(step + 1):
        service, current = apply(service, current, rollout.shift(service, current, did, i, now, rollout.AUTOMATIC, f"step {i}"))
    return service, current, did


def completed(now: float = T0 + 20, **kwargs: Any) -> tuple[Service, Current, str]:
    """...promoted to 100 %: green active and baking, blue draining."""
    service, current, did = shifting(**kwargs)
    service, current = apply(service, current, rollout.promote(service, current, did, now, full=True))
    return service, current, did


# =============================================================================================
# start


def test_start_registers_the_new_version_in_the_idle_environment() -> None:
    service, current = blue_service(), {BLUE: blue_record(), GREEN: None}
    change = rollout.start(service, current, spec(), T0)
    assert_events(current, change, {"shop-2": ("deploying", "api")})
    new = by_id(change)["shop-2"]
    assert (new.environment, new.version, new.status, new.step, new.counterpart) == (GREEN, "v2", S.DEPLOYING, -1, "shop-1")
    assert new.spec is not None and new.spec["strategy"]["steps"] == [10, 50, 100]
    assert new.in_progress
    assert change.service.green == EnvironmentState("v2", (Endpoint("127.0.0.1", 9002),))
    assert change.service.deployment_seq == 2
    assert change.service.traffic == service.traffic  # no traffic before the smoke tests


def test_start_refuses_while_a_deployment_is_in_progress() -> None:
    service, current, did = shifting()
    with pytest.raises(ConflictError, match=f"deployment {did} of shop is in progress"):
        rollout.start(service, current, spec(version="v3"), T0 + 30)
    # ...also while it is still baking at 100 %.
    service, current, did = completed(bake_seconds=60)
    assert current[GREEN].baking  # type: ignore[union-attr]
    with pytest.raises(ConflictError, match=did):
        rollout.start(service, current, spec(version="v3"), T0 + 30)


def test_start_refuses_during_a_manual_split() -> None:
    service = blue_service(green=EnvironmentState("v2", (Endpoint("127.0.0.1", 9002),)),
                           traffic=Traffic(active=BLUE, blue=90, green=10))
    current: Current = {BLUE: blue_record(), GREEN: replace(blue_record(), id="shop-2", environment=GREEN, status=S.SHIFTING)}
    with pytest.raises(ConflictError, match=r"manual split in progress \(90/10\)"):
        rollout.start(service, current, spec(), T0)


def test_start_decommissions_a_standby_idle_environment_and_queues_its_hooks() -> None:
    # green v2 took over from blue v1, which is now standby; v3 goes into blue.
    service, current, did = completed()
    service, current = apply(service, current, rollout.bake_due(service, current, did, T0 + 20))
    service, current = apply(service, current, rollout.drain_due(service, current, "shop-1", T0 + 21))
    assert current[BLUE].status is S.STANDBY  # type: ignore[union-attr]
    change = rollout.start(service, current, spec(version="v3", endpoints=["127.0.0.1:9003"]), T0 + 22)
    assert_events(current, change, {"shop-1": ("decommissioned", "api"), "shop-3": ("deploying", "api")})
    old, new = by_id(change)["shop-1"], by_id(change)["shop-3"]
    assert old.hooks_pending and old.counterpart == "shop-3" and old.deadline is None
    assert (new.environment, new.counterpart) == (BLUE, did)
    assert change.service.blue == EnvironmentState("v3", (Endpoint("127.0.0.1", 9003),))


def test_start_replacing_a_failed_or_rolled_back_record_calls_no_hooks() -> None:
    service, current, did = shifting()
    service, current = apply(service, current, rollout.rollback(service, current, did, T0 + 11, rollout.API, "no"))
    change = rollout.start(service, current, spec(version="v3"), T0 + 12)
    assert_events(current, change, {did: ("decommissioned", "api"), "shop-3": ("deploying", "api")})
    assert not by_id(change)[did].hooks_pending  # it never left the fleet config with traffic on it


def test_first_deployment_of_a_service_has_no_counterpart_and_goes_straight_to_100() -> None:
    service = Service("shop", drain_seconds=1, standby_seconds=2)  # blue takes 100 % but nothing is registered
    current: Current = {BLUE: None, GREEN: None}
    change = rollout.start(service, current, spec([10, 50, 100]), T0)
    assert_events(current, change, {"shop-1": ("deploying", "api")})
    assert by_id(change)["shop-1"].counterpart is None
    service, current = apply(service, current, change)
    service, current = apply(service, current, rollout.smoke_passed(service, current, "shop-1", T0 + 1, "ok"))
    change = rollout.shift(service, current, "shop-1", 0, T0 + 2, rollout.AUTOMATIC, "smoke tests passed")
    assert_events(current, change, {"shop-1": ("active", "automatic")})
    assert change.service.traffic.weights == {"blue": 0, "green": 100}
    assert change.service.traffic.active is GREEN
    assert by_id(change)["shop-1"].baking


# =============================================================================================
# smoke


def test_smoke_passed_and_failed() -> None:
    service, current, did = started()
    ok = rollout.smoke_passed(service, current, did, T0 + 1, "smoke tests passed (1 through x)")
    assert_events(current, ok, {did: ("ready", "automatic")})
    bad = rollout.smoke_failed(service, current, did, T0 + 1, "GET /healthz: status 500, expected 200")
    assert_events(current, bad, {did: ("failed", "automatic")})
    record = by_id(bad)[did]
    assert record.reason == "GET /healthz: status 500, expected 200" and "smoke tests failed" in record.history[-1].reason
    assert not record.in_progress
    assert bad.service.traffic == service.traffic
    service, current = apply(service, current, ok)
    with pytest.raises(ConflictError, match="not deploying"):
        rollout.smoke_failed(service, current, did, T0 + 2, "late")


# =============================================================================================
# shift, step_due, promote


def test_shift_puts_the_step_weight_on_the_new_environment_with_a_deadline() -> None:
    service, current, did = started()
    service, current = apply(service, current, rollout.smoke_passed(service, current, did, T0 + 1, "ok"))
    change = rollout.shift(service, current, did, 0, T0 + 2, rollout.AUTOMATIC, "smoke tests passed; shifting")
    assert_events(current, change, {did: ("shifting", "automatic")})
    record = by_id(change)[did]
    assert (record.step, record.deadline, record.awaiting_promote) == (0, T0 + 2 + 600, False)
    assert change.service.traffic == Traffic(active=BLUE, previous=None, blue=90, green=10)
    service, current = apply(service, current, change)
    for bad_step in (0, -1, 3):
        with pytest.raises(ConflictError, match="is not ahead of step 0"):
            rollout.shift(service, current, did, bad_step, T0 + 3, rollout.API, "x")


def test_shift_to_100_starts_the_bake_and_the_old_environments_drain() -> None:
    service, current, did = shifting(step=1, bake_seconds=30)
    change = rollout.shift(service, current, did, 2, T0 + 50, rollout.AUTOMATIC, "step 2")
    assert_events(current, change, {did: ("active", "automatic"), "shop-1": ("draining", "automatic")})
    new, old = by_id(change)[did], by_id(change)["shop-1"]
    assert (new.baking, new.deadline, new.activated_at, new.step) == (True, T0 + 80, T0 + 50, 2)
    assert (old.deadline, old.counterpart) == (T0 + 51, did)  # drain_seconds 1
    assert change.service.traffic == Traffic(active=GREEN, previous=BLUE, blue=0, green=100)
    assert change.service.blue == BLUE_STATE  # still registered while it drains


def test_step_due_waits_for_the_deadline_then_advances_automatically() -> None:
    service, current, did = shifting(step_seconds=5, now=T0)
    with pytest.raises(ConflictError, match="not over yet"):
        rollout.step_due(service, current, did, T0 + 4.9)
    change = rollout.step_due(service, current, did, T0 + 5)
    assert_events(current, change, {did: ("shifting", "automatic")})
    record = by_id(change)[did]
    assert record.step == 1 and record.deadline == T0 + 10
    assert record.history[-1].reason == "step 1: 50% after 5s"
    assert change.service.traffic.weights == {"blue": 50, "green": 50}
    service, current = apply(service, current, change)
    change = rollout.step_due(service, current, did, T0 + 10)
    assert_events(current, change, {did: ("active", "automatic"), "shop-1": ("draining", "automatic")})
    assert change.service.traffic.weights == {"blue": 0, "green": 100}


def test_without_auto_promote_the_step_before_100_holds_until_promoted() -> None:
    service, current, did = shifting(step=1, step_seconds=5, auto_promote=False, now=T0)
    change = rollout.step_due(service, current, did, T0 + 5)
    assert_events(current, change, {did: ("shifting", "automatic")})
    held = by_id(change)[did]
    assert held.awaiting_promote and held.deadline is None and held.step == 1
    assert "waiting for promote" in held.history[-1].reason
    assert change.service.traffic.weights == {"blue": 50, "green": 50}  # unchanged
    service, current = apply(service, current, change)
    with pytest.raises(ConflictError, match="not running a timed step"):
        rollout.step_due(service, current, did, T0 + 1000)
    change = rollout.promote(service, current, did, T0 + 1000)
    assert_events(current, change, {did: ("active", "api"), "shop-1": ("draining", "automatic")})
    assert not by_id(change)[did].awaiting_promote
    assert change.service.traffic.weights == {"blue": 0, "green": 100}


def test_auto_promote_false_does_not_hold_the_earlier_steps() -> None:
    service, current, did = shifting(step=0, step_seconds=5, auto_promote=False, now=T0)
    change = rollout.step_due(service, current, did, T0 + 5)
    assert by_id(change)[did].step == 1 and not by_id(change)[did].awaiting_promote


def test_promote_advances_one_step_or_all_the_way() -> None:
    service, current, did = shifting()
    one = rollout.promote(service, current, did, T0 + 20)
    assert_events(current, one, {did: ("shifting", "api")})
    assert by_id(one)[did].step == 1 and by_id(one)[did].history[-1].reason == "promoted to 50%"
    assert by_id(one)[did].deadline == T0 + 20 + 600  # a fresh step
    assert one.service.traffic.weights == {"blue": 50, "green": 50}
    full = rollout.promote(service, current, did, T0 + 20, full=True)
    assert_events(current, full, {did: ("active", "api"), "shop-1": ("draining", "automatic")})
    assert full.service.traffic.weights == {"blue": 0, "green": 100}
    service, current = apply(service, current, full)
    with pytest.raises(ConflictError, match="only a shifting deployment can be promoted"):
        rollout.promote(service, current, did, T0 + 21)


def test_promote_refuses_before_the_shift() -> None:
    service, current, did = started()
    with pytest.raises(ConflictError, match="deploying; only a shifting"):
        rollout.promote(service, current, did, T0 + 1)
    with pytest.raises(ConflictError, match="deploying; only a shifting"):
        rollout.promote(service, current, did, T0 + 1, full=True)


def test_promote_to_a_step_is_idempotent() -> None:
    service, current, did = shifting()
    change = rollout.promote(service, current, did, T0 + 20, to_step=1)
    assert_events(current, change, {did: ("shifting", "api")})
    assert by_id(change)[did].step == 1
    service, current = apply(service, current, change)
    assert rollout.promote(service, current, did, T0 + 21, to_step=1) == Change(service)  # a retried call
    assert rollout.promote(service, current, did, T0 + 21, to_step=0) == Change(service)
    with pytest.raises(ConflictError, match="step 3 does not exist"):
        rollout.promote(service, current, did, T0 + 21, to_step=3)
    change = rollout.promote(service, current, did, T0 + 22, to_step=2)
    assert_events(current, change, {did: ("active", "api"), "shop-1": ("draining", "automatic")})
    service, current = apply(service, current, change)
    # At 100 % a retried full or stepped promote is a no-op, a plain one is refused.
    assert rollout.promote(service, current, did, T0 + 23, to_step=2) == Change(service)
    assert rollout.promote(service, current, did, T0 + 23, full=True) == Change(service)
    with pytest.raises(ConflictError, match="only a shifting deployment can be promoted"):
        rollout.promote(service, current, did, T0 + 23)


def test_bake_due_completes_the_deployment() -> None:
    service, current, did = completed(bake_seconds=30, now=T0 + 20)
    with pytest.raises(ConflictError, match="bake is not over yet"):
        rollout.bake_due(service, current, did, T0 + 49)
    change = rollout.bake_due(service, current, did, T0 + 50)
    assert_events(current, change, {did: ("active", "automatic")})
    record = by_id(change)[did]
    assert not record.baking and record.deadline is None and not record.in_progress
    assert record.history[-1].reason.startswith("bake finished")


# =============================================================================================
# pause / resume


def test_pause_and_resume_keep_the_remaining_time_and_are_idempotent() -> None:
    service, current, did = shifting(now=T0)  # step deadline T0 + 600
    paused = rollout.pause(service, current, did, T0 + 100)
    assert_events(current, paused, {did: ("shifting", "api")})
    record = by_id(paused)[did]
    assert (record.paused_remaining, record.deadline) == (500.0, None)
    service, current = apply(service, current, paused)
    assert rollout.pause(service, current, did, T0 + 200).deployments == ()  # already paused
    with pytest.raises(ConflictError):
        rollout.step_due(service, current, did, T0 + 10_000)
    resumed = rollout.resume(service, current, did, T0 + 300)
    assert_events(current, resumed, {did: ("shifting", "api")})
    record = by_id(resumed)[did]
    assert (record.paused_remaining, record.deadline) == (None, T0 + 800)
    assert resumed.service.traffic == service.traffic
    service, current = apply(service, current, resumed)
    assert rollout.resume(service, current, did, T0 + 400).deployments == ()  # not paused


def test_pause_while_awaiting_promote_resumes_without_a_deadline() -> None:
    service, current, did = shifting(step=1, step_seconds=5, auto_promote=False, now=T0)
    service, current = apply(service, current, rollout.step_due(service, current, did, T0 + 5))
    service, current = apply(service, current, rollout.pause(service, current, did, T0 + 6))
    resumed = rollout.resume(service, current, did, T0 + 7)
    record = by_id(resumed)[did]
    assert record.awaiting_promote and record.deadline is None and record.paused_remaining is None


def test_pause_during_the_bake_and_refusals() -> None:
    service, current, did = completed(bake_seconds=60, now=T0 + 20)
    change = rollout.pause(service, current, did, T0 + 30)
    assert_events(current, change, {did: ("active", "api")})
    assert by_id(change)[did].paused_remaining == 50.0
    service, current = apply(service, current, change)
    with pytest.raises(ConflictError, match="not baking"):
        rollout.bake_due(service, current, did, T0 + 1000)
    service, current, did = started()
    with pytest.raises(ConflictError, match="only a shifting or baking deployment can be paused"):
        rollout.pause(service, current, did, T0 + 1)
    with pytest.raises(ConflictError, match="not paused"):
        rollout.resume(service, current, did, T0 + 1)


def test_promote_while_paused_runs_the_next_step() -> None:
    service, current, did = shifting(now=T0)
    service, current = apply(service, current, rollout.pause(service, current, did, T0 + 1))
    change = rollout.promote(service, current, did, T0 + 2)
    record = by_id(change)[did]
    assert record.paused_remaining is None and record.deadline == T0 + 602 and record.step == 1


# =============================================================================================
# rollback, abort


def test_rollback_during_the_shift_sends_everything_back() -> None:
    service, current, did = shifting(step=1)
    change = rollout.rollback(service, current, did, T0 + 30, rollout.API, "rollback requested")
    assert_events(current, change, {did: ("rolled_back", "api"), "shop-1": ("active", "api")})
    new = by_id(change)[did]
    assert (new.reason, new.deadline, new.paused_remaining, new.awaiting_promote, new.baking) == ("rollback requested", None, None, False, False)
    assert not new.in_progress
    assert change.service.traffic == Traffic(active=BLUE, previous=None, blue=100, green=0)
    assert change.service.green == service.green  # stays registered (preview, inspection)
    service, current = apply(service, current, change)
    # Rolling back again (a retried call) changes nothing; abort likewise.
    assert rollout.rollback(service, current, did, T0 + 31, rollout.API, "again") == Change(service)
    assert rollout.abort(service, current, did, T0 + 31) == Change(service)
    with pytest.raises(ConflictError, match="rolled_back; only a shifting deployment can be promoted"):
        rollout.promote(service, current, did, T0 + 31)


def test_rollback_after_100_reactivates_the_draining_environment() -> None:
    service, current, did = completed()
    change = rollout.rollback(service, current, did, T0 + 21, rollout.API, "bad")
    assert_events(current, change, {did: ("rolled_back", "api"), "shop-1": ("active", "api")})
    assert by_id(change)["shop-1"].deadline is None  # no longer draining towards decommission
    assert change.service.traffic == Traffic(active=BLUE, previous=GREEN, blue=100, green=0)


def test_rollback_refuses_without_production_traffic_or_without_a_target() -> None:
    service, current, did = started()
    with pytest.raises(ConflictError, match="abort it instead"):
        rollout.rollback(service, current, did, T0 + 1, rollout.API, "x")
    service, current, did = completed()
    service = service.with_environment(BLUE, EnvironmentState())  # blue decommissioned meanwhile
    with pytest.raises(ConflictError, match="blue has no endpoints"):
        rollout.rollback(service, current, did, T0 + 21, rollout.API, "x")


def test_abort_before_traffic_fails_and_during_the_shift_rolls_back() -> None:
    service, current, did = started()
    change = rollout.abort(service, current, did, T0 + 1)
    assert_events(current, change, {did: ("failed", "api")})
    assert by_id(change)[did].reason == "aborted" and change.service.traffic == service.traffic
    service, current, did = shifting()
    change = rollout.abort(service, current, did, T0 + 20)
    assert_events(current, change, {did: ("rolled_back", "api"), "shop-1": ("active", "api")})
    assert by_id(change)[did].reason == "aborted"
    assert change.service.traffic.weights == {"blue": 100, "green": 0}


# =============================================================================================
# analysis


FIGURES = {"requests": 100, "errors": 30, "error_rate": 0.3, "p99_ms": 12.0}


def test_analysis_counts_consecutive_breaches_and_resets_on_a_pass() -> None:
    service, current, did = shifting()
    change = rollout.analysis_result(service, current, did, T0 + 20, FIGURES, "error rate 0.300 > 0.01", 3)
    assert_events(current, change, {did: ("shifting", "automatic")})
    record = by_id(change)[did]
    assert record.failures == 1 and record.analysis == FIGURES
    assert record.history[-1].reason == "analysis breach 1/3: error rate 0.300 > 0.01"
    assert change.service.traffic == service.traffic
    service, current = apply(service, current, change)
    change = rollout.analysis_result(service, current, did, T0 + 25, {"requests": 50, "error_rate": 0.0}, None, 3)
    record = by_id(change)[did]
    assert record.failures == 0 and record.analysis == {"requests": 50, "error_rate": 0.0}
    # A passing interval records its figures but is no transition: no history event.
    assert record.history == current[GREEN].history  # type: ignore[union-attr]
    assert record.status is S.SHIFTING and change.service.traffic == service.traffic


def test_analysis_rolls_back_at_the_failure_limit() -> None:
    service, current, did = shifting(step=1)
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 20, FIGURES, "bad", 2))
    change = rollout.analysis_result(service, current, did, T0 + 25, FIGURES, "error rate 0.300 > max_error_rate 0.01", 2)
    assert_events(current, change, {did: ("rolled_back", "automatic"), "shop-1": ("active", "automatic")})
    record = by_id(change)[did]
    assert record.reason == "analysis: error rate 0.300 > max_error_rate 0.01 (2 consecutive)"
    assert record.failures == 2 and record.analysis == FIGURES
    assert change.service.traffic.weights == {"blue": 100, "green": 0}


def test_analysis_during_the_bake_and_after_it() -> None:
    service, current, did = completed(bake_seconds=60)
    change = rollout.analysis_result(service, current, did, T0 + 30, FIGURES, "bad", 1)
    assert_events(current, change, {did: ("rolled_back", "automatic"), "shop-1": ("active", "automatic")})
    assert change.service.traffic == Traffic(active=BLUE, previous=GREEN, blue=100, green=0)
    service, current = apply(service, current, rollout.bake_due(service, current, did, T0 + 80))
    with pytest.raises(ConflictError, match="not under analysis"):
        rollout.analysis_result(service, current, did, T0 + 90, FIGURES, "bad", 1)


def test_analysis_wait_records_the_figures_only() -> None:
    service, current, did = shifting()
    change = rollout.analysis_wait(service, current, did, T0 + 20, {"requests": 3}, "only 3 requests", no_data_limit=10, failure_limit=2)
    record = by_id(change)[did]
    assert record.analysis == {"requests": 3} and record.history == current[GREEN].history  # type: ignore[union-attr]
    assert record.failures == 0 and record.status is S.SHIFTING
    assert (record.no_data_intervals, record.intervals_judged) == (1, 0)  # waiting judges nothing


# =============================================================================================
# analysis always judges: a step or bake never ends unjudged

SHORT = {"interval_seconds": 3, "max_error_rate": 0.05, "min_requests": 5, "failure_limit": 2}
OK = {"requests": 50, "error_rate": 0.0}


def judged_shift(failure_limit: int = 2, **kwargs: Any) -> tuple[Service, Current, str]:
    """Steps 10/50/100 of 1 s each, no bake, analysis every 3 s: shifting at 10 % since T0."""
    kwargs.setdefault("step_seconds", 1)
    kwargs.setdefault("analysis", dict(SHORT, failure_limit=failure_limit))
    return shifting(now=T0, **kwargs)


def test_a_step_shorter_than_the_interval_is_extended_until_an_interval_is_judged() -> None:
    service, current, did = judged_shift()
    analysis = rollout.spec_of(current[GREEN]).analysis  # type: ignore[arg-type]
    assert not rollout.timer_due(current[GREEN], analysis, T0 + 0.9)  # type: ignore[arg-type]
    assert rollout.timer_due(current[GREEN], analysis, T0 + 1)  # type: ignore[arg-type]
    change = rollout.step_due(service, current, did, T0 + 1)
    assert_events(current, change, {did: ("shifting", "automatic")})
    record = by_id(change)[did]
    assert record.history[-1].reason == "step 0 (10%) extended: no full analysis interval judged yet"
    assert record.extended and record.step == 0 and change.service.traffic == service.traffic
    # A promote is a person's decision: it needs no judged interval.
    assert by_id(rollout.promote(service, current, did, T0 + 1))[did].step == 1
    service, current = apply(service, current, change)
    # Extended once: the timer has nothing more to do, and a second call is refused.
    assert not rollout.timer_due(current[GREEN], analysis, T0 + 2)  # type: ignore[arg-type]
    with pytest.raises(ConflictError, match="already extended: no full analysis interval judged yet"):
        rollout.step_due(service, current, did, T0 + 2)
    # The first interval judged ok ends the step, in the same change.
    change = rollout.analysis_result(service, current, did, T0 + 3, OK, None, 2)
    assert_events(current, change, {did: ("shifting", "automatic")})
    record = by_id(change)[did]
    assert record.history[-1].reason == "step 1: 50% after 1s; 1 analysis interval judged"
    assert (record.step, record.deadline, record.analysis) == (1, T0 + 4, OK)
    assert (record.intervals_judged, record.extended) == (0, False)  # a new step starts unjudged
    assert change.service.traffic.weights == {"blue": 50, "green": 50}


def test_a_breach_in_an_extended_step_rolls_back_before_more_traffic_moves() -> None:
    service, current, did = judged_shift(failure_limit=1)
    service, current = apply(service, current, rollout.step_due(service, current, did, T0 + 1))
    change = rollout.analysis_result(service, current, did, T0 + 3, FIGURES, "error rate 0.300 > max_error_rate 0.05", 1)
    assert_events(current, change, {did: ("rolled_back", "automatic"), "shop-1": ("active", "automatic")})
    record = by_id(change)[did]
    assert record.step == 0 and record.reason == "analysis: error rate 0.300 > max_error_rate 0.05 (1 consecutive)"
    assert change.service.traffic.weights == {"blue": 100, "green": 0}


def test_a_step_never_ends_on_a_breach_and_failure_limit_keeps_its_meaning() -> None:
    service, current, did = judged_shift(failure_limit=3, step_seconds=5)
    # A breach before the deadline: one of three allowed, and the step may not end on it.
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 3, FIGURES, "bad", 3))
    change = rollout.step_due(service, current, did, T0 + 5)
    assert by_id(change)[did].history[-1].reason == (
        "step 0 (10%) extended: its last analysis interval breached a threshold (1/3)")
    service, current = apply(service, current, change)
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 6, FIGURES, "bad", 3))
    assert current[GREEN].status is S.SHIFTING and current[GREEN].step == 0  # type: ignore[union-attr]
    assert current[GREEN].failures == 2  # type: ignore[union-attr]
    # A pass resets the count and, past the deadline, ends the step.
    change = rollout.analysis_result(service, current, did, T0 + 9, OK, None, 3)
    record = by_id(change)[did]
    assert (record.step, record.failures) == (1, 0)
    assert record.history[-1].reason == "step 1: 50% after 5s; 3 analysis intervals judged"


def test_the_interval_in_progress_at_the_deadline_is_judged_before_the_step_ends() -> None:
    service, current, did = judged_shift(step_seconds=5)
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 3, OK, None, 2))
    assert current[GREEN].step == 0 and current[GREEN].intervals_judged == 1  # type: ignore[union-attr]
    # The deadline passes mid-interval: nothing for the timer to do, no event; the step goes on.
    analysis = rollout.spec_of(current[GREEN]).analysis  # type: ignore[arg-type]
    assert not rollout.timer_due(current[GREEN], analysis, T0 + 5)  # type: ignore[arg-type]
    with pytest.raises(ConflictError, match="ends with the analysis interval in progress"):
        rollout.step_due(service, current, did, T0 + 5)
    change = rollout.analysis_result(service, current, did, T0 + 6, OK, None, 2)
    assert_events(current, change, {did: ("shifting", "automatic")})
    assert by_id(change)[did].history[-1].reason == "step 1: 50% after 5s; 2 analysis intervals judged"


def test_with_analysis_and_no_bake_the_100_percent_step_is_still_judged() -> None:
    service, current, did = judged_shift(step=2, failure_limit=1)  # at 100 %, bake 0 s
    record = current[GREEN]
    assert record.status is S.ACTIVE and record.baking and record.deadline == T0  # type: ignore[union-attr]
    change = rollout.bake_due(service, current, did, T0)
    assert_events(current, change, {did: ("active", "automatic")})
    assert by_id(change)[did].history[-1].reason == "bake extended: no full analysis interval judged yet"
    service, current = apply(service, current, change)
    assert current[GREEN].in_progress  # type: ignore[union-attr]
    bad = rollout.analysis_result(service, current, did, T0 + 3, FIGURES, "bad", 1)
    assert by_id(bad)[did].status is S.ROLLED_BACK
    done = rollout.analysis_result(service, current, did, T0 + 3, OK, None, 1)
    record = by_id(done)[did]
    assert record.status is S.ACTIVE and not record.baking and not record.in_progress
    assert record.history[-1].reason == "bake finished; deployment complete (1 analysis interval judged)"


def test_the_cutover_is_timed_once_not_again_at_an_event_of_the_bake() -> None:
    from controlplane.deploy.driver import _just_activated

    service, current, did = judged_shift(step=1)
    change = rollout.analysis_result(service, current, did, T0 + 3, OK, None, 2)  # judged: on to 100 %
    assert _just_activated(by_id(change)[did])
    service, current = apply(service, current, change)
    extended = by_id(rollout.bake_due(service, current, did, T0 + 3))[did]
    assert extended.status is S.ACTIVE and extended.baking and not _just_activated(extended)
    breached = by_id(rollout.analysis_result(service, current, did, T0 + 6, FIGURES, "bad", 2))[did]
    assert breached.status is S.ACTIVE and not _just_activated(breached)


def test_a_judged_step_before_100_still_holds_for_a_promote_without_auto_promote() -> None:
    service, current, did = judged_shift(step=1, auto_promote=False)
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 3, OK, None, 2))
    record = current[GREEN]
    assert record.awaiting_promote and record.step == 1 and record.deadline is None  # type: ignore[union-attr]
    assert record.history[-1].reason == "holding at 50%: waiting for promote"  # type: ignore[union-attr]


def test_no_data_wait_is_bounded_by_no_data_limit() -> None:
    service, current, did = judged_shift(analysis=dict(SHORT, no_data_limit=3))
    service, current = apply(service, current, rollout.step_due(service, current, did, T0 + 1))
    for i in (1, 2):  # waiting: figures only, no judgement, the step goes on
        change = rollout.analysis_wait(service, current, did, T0 + 3 * i, {"requests": 1}, "only 1 requests in 3s (min_requests 5)",
                                       no_data_limit=3, failure_limit=2)
        assert by_id(change)[did].history == current[GREEN].history  # type: ignore[union-attr]
        service, current = apply(service, current, change)
    assert current[GREEN].no_data_intervals == 2 and current[GREEN].step == 0  # type: ignore[union-attr]
    # The third interval in a row counts as a breach; the fourth reaches failure_limit.
    change = rollout.analysis_wait(service, current, did, T0 + 9, {"requests": 1}, "only 1 requests in 3s (min_requests 5)",
                                   no_data_limit=3, failure_limit=2)
    assert by_id(change)[did].history[-1].reason == (
        "analysis breach 1/2: only 1 requests in 3s (min_requests 5), 3 intervals in a row (no_data_limit 3)")
    service, current = apply(service, current, change)
    change = rollout.analysis_wait(service, current, did, T0 + 12, {"requests": 1}, "only 1 requests in 3s (min_requests 5)",
                                   no_data_limit=3, failure_limit=2)
    record = by_id(change)[did]
    assert record.status is S.ROLLED_BACK and record.step == 0
    assert record.reason == "analysis: only 1 requests in 3s (min_requests 5), 4 intervals in a row (no_data_limit 3) (2 consecutive)"


def test_the_extension_event_counts_the_intervals_that_waited_for_traffic() -> None:
    service, current, did = judged_shift()
    change = rollout.analysis_wait(service, current, did, T0 + 0.5, {"requests": 0}, "only 0 requests", no_data_limit=10, failure_limit=2)
    service, current = apply(service, current, change)
    reason = by_id(rollout.step_due(service, current, did, T0 + 1))[did].history[-1].reason
    assert reason == "step 0 (10%) extended: no full analysis interval judged yet (1 interval(s) with fewer than 5 requests; no_data_limit 10)"


def test_the_judging_state_survives_a_restart_and_old_records_load() -> None:
    service, current, did = judged_shift()
    service, current = apply(service, current, rollout.step_due(service, current, did, T0 + 1))
    record = current[GREEN]
    assert deployment_from_dict(deployment_to_dict(record)) == record  # type: ignore[arg-type]
    # A record and spec stored by a release before no_data_limit and the judging fields.
    old = deployment_to_dict(record)  # type: ignore[arg-type]
    for key in ("intervals_judged", "no_data_intervals", "extended"):
        del old[key]
    old["spec"] = {"version": "v2", "endpoints": [GREEN_ENDPOINT], "strategy": {"steps": [10, 50, 100], "step_seconds": 1},
                   "analysis": {"interval_seconds": 3, "min_requests": 5}}
    loaded = deployment_from_dict(old)
    assert (loaded.intervals_judged, loaded.no_data_intervals, loaded.extended) == (0, 0, False)
    analysis = rollout.spec_of(loaded).analysis
    assert analysis == Analysis(interval_seconds=3, min_requests=5, no_data_limit=10)
    current = {**current, GREEN: loaded}
    change = rollout.step_due(service, current, did, T0 + 2)
    assert by_id(change)[did].history[-1].reason == "step 0 (10%) extended: no full analysis interval judged yet"


def test_the_driver_parses_a_stored_spec_once_per_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane.deploy import driver

    calls: list[object] = []
    real = driver.parse_deployment_spec
    monkeypatch.setattr(driver, "parse_deployment_spec", lambda body: calls.append(body) or real(body))
    rollouts = driver.Rollouts(None, (), None, None)  # type: ignore[arg-type]
    _, current, _ = judged_shift()
    record = current[GREEN]
    assert record is not None
    for _ in range(3):
        assert rollouts._spec(replace(record, updated_at=T0 + 5)).analysis is not None
    assert len(calls) == 1
    # Another deployment of the service (or the same id after the service was re-created) is parsed anew.
    rollouts._spec(replace(record, deployed_at=T0 + 99))
    assert len(calls) == 2


def test_analysis_spec_no_data_limit() -> None:
    assert spec(analysis={}).analysis.no_data_limit == 10
    assert spec(analysis={"no_data_limit": 1}).analysis.no_data_limit == 1
    with pytest.raises(ValidationError, match="analysis.no_data_limit must be between 1 and 1000"):
        spec(analysis={"no_data_limit": 0})
    # An interval longer than the step is accepted: each step lasts at least one interval.
    assert spec(step_seconds=1, analysis={"interval_seconds": 30}).analysis.interval_seconds == 30
    body = spec(analysis={"no_data_limit": 4})
    assert parse_deployment_spec(spec_to_dict(body)) == body


# =============================================================================================
# drain, standby, decommission


def test_drain_then_standby_then_decommission_on_their_deadlines() -> None:
    service, current, did = completed(now=T0 + 20)  # blue draining until T0 + 21
    with pytest.raises(ConflictError, match="not at the end of its drain"):
        rollout.drain_due(service, current, "shop-1", T0 + 20.5)
    change = rollout.drain_due(service, current, "shop-1", T0 + 21)
    assert_events(current, change, {"shop-1": ("standby", "automatic")})
    assert by_id(change)["shop-1"].deadline == T0 + 23  # standby_seconds 2
    assert change.service == service
    service, current = apply(service, current, change)
    with pytest.raises(ConflictError, match="standby is not over yet"):
        rollout.decommission(service, current, "shop-1", T0 + 22, rollout.AUTOMATIC, "x")
    change = rollout.decommission(service, current, "shop-1", T0 + 23, rollout.AUTOMATIC, "standby of 2s is over")
    assert_events(current, change, {"shop-1": ("decommissioned", "automatic")})
    old = by_id(change)["shop-1"]
    assert old.hooks_pending and old.deadline is None
    assert change.service.blue == EnvironmentState()  # leaves the fleet config
    assert change.service.traffic == Traffic(active=GREEN, previous=None, blue=0, green=100)


def test_decommission_on_request_ends_the_standby_early() -> None:
    service, current, did = completed(now=T0 + 20)
    change = rollout.decommission(service, current, "shop-1", T0 + 20.1, rollout.API, "decommissioned on request")
    assert_events(current, change, {"shop-1": ("decommissioned", "api")})
    assert change.service.blue == EnvironmentState()


def test_decommission_refuses_while_the_environment_takes_traffic_or_is_not_retired() -> None:
    service, current, did = completed(now=T0 + 20)
    split = replace(service, traffic=Traffic(active=GREEN, previous=BLUE, blue=10, green=90))
    with pytest.raises(ConflictError, match="blue still takes traffic"):
        rollout.decommission(split, current, "shop-1", T0 + 100, rollout.API, "x")
    with pytest.raises(ConflictError, match="only a draining or standby environment"):
        rollout.decommission(service, current, did, T0 + 100, rollout.API, "x")
    service, current = blue_service(), {BLUE: blue_record(), GREEN: None}
    with pytest.raises(ConflictError, match="active; only a draining or standby"):
        rollout.decommission(service, current, "shop-1", T0, rollout.API, "x")


def test_unknown_deployment_is_a_conflict() -> None:
    service, current, did = started()
    with pytest.raises(ConflictError, match="shop-9 is no longer current"):
        rollout.promote(service, current, "shop-9", T0)


def test_a_full_timed_run_has_one_event_per_transition_in_order() -> None:
    service, current, did = started(steps=[50, 100], step_seconds=1, bake_seconds=1, now=T0)
    steps = [
        lambda s, c, t: rollout.smoke_passed(s, c, did, t, "ok"),
        lambda s, c, t: rollout.shift(s, c, did, 0, t, rollout.AUTOMATIC, "smoke tests passed; shifting"),
        lambda s, c, t: rollout.step_due(s, c, did, t),
        lambda s, c, t: rollout.bake_due(s, c, did, t),
    ]
    for i, transition in enumerate(steps):
        service, current = apply(service, current, transition(service, current, T0 + 1 + 2 * i))
    events = [(e.status, e.actor) for e in current[GREEN].history]  # type: ignore[union-attr]
    assert events == [("deploying", "api"), ("ready", "automatic"), ("shifting", "automatic"), ("active", "automatic"),
                      ("active", "automatic")]
    assert [e.at for e in current[GREEN].history] == sorted(e.at for e in current[GREEN].history)  # type: ignore[union-attr]


# =============================================================================================
# judge


@pytest.mark.parametrize(
    ("no_data", "verdict"),
    [("fail", "breach"), ("wait", "wait"), ("pass", "ok")],
)
def test_judge_too_few_requests_follows_the_no_data_policy(no_data: str, verdict: str) -> None:
    analysis = Analysis(min_requests=20, no_data=no_data, interval_seconds=5)
    result, reason = judge(analysis, {"requests": 19, "error_rate": 1.0, "p99_ms": 10_000})
    assert result == verdict
    if verdict == "ok":
        assert reason is None
    else:
        assert reason == "only 19 requests in 5s (min_requests 20)"
    assert judge(analysis, {})[0] == verdict  # no figures at all: no data


@pytest.mark.parametrize(
    ("figures", "verdict", "reason"),
    [
        ({"requests": 20, "error_rate": 0.0, "p99_ms": 10.0}, "ok", None),
        ({"requests": 20, "error_rate": 0.05, "p99_ms": 10.0}, "ok", None),  # at the limit is fine
        ({"requests": 20, "error_rate": 0.06, "p99_ms": 10.0}, "breach", "error rate 0.060 > max_error_rate 0.05"),
        ({"requests": 20, "error_rate": 0.0, "p99_ms": 250.5}, "breach", "p99 250.5 ms > max_p99_ms 250"),
        ({"requests": 20, "error_rate": 0.0, "p99_ms": 250.0}, "ok", None),
        ({"requests": 20, "error_rate": None, "p99_ms": None}, "ok", None),
        ({"requests": 20, "error_rate": 0.5, "p99_ms": 1000.0}, "breach", "error rate 0.500 > max_error_rate 0.05"),
    ],
)
def test_judge_thresholds(figures: dict[str, Any], verdict: str, reason: str | None) -> None:
    analysis = Analysis(min_requests=20, max_error_rate=0.05, max_p99_ms=250.0, no_data="fail")
    assert judge(analysis, figures) == (verdict, reason)


def test_judge_without_a_latency_limit_ignores_p99() -> None:
    analysis = Analysis(min_requests=0, max_p99_ms=None)
    assert judge(analysis, {"requests": 0, "error_rate": 0.0, "p99_ms": 99_999.0}) == ("ok", None)


def test_events_are_plain_values() -> None:
    # The history is what the API renders: at, status, actor, reason.
    service, current, did = started()
    [event] = current[GREEN].history  # type: ignore[union-attr]
    assert event == Event(T0, "deploying", "api", "deploy v2 to green")


def test_rollback_of_a_completed_deployment_refuses_while_a_new_one_is_deploying_into_its_target() -> None:
    service, current, did = completed()
    service, current = apply(service, current, rollout.bake_due(service, current, did, T0 + 20))
    service, current = apply(service, current, rollout.drain_due(service, current, "shop-1", T0 + 21))
    # v3 goes into blue (the standby side): blue's endpoints are now v3's, not yet smoke-tested.
    service, current = apply(service, current, rollout.start(service, current, spec(version="v3", endpoints=["127.0.0.1:9003"]), T0 + 22))
    assert current[BLUE].status is S.DEPLOYING  # type: ignore[union-attr]
    with pytest.raises(ConflictError, match="shop-3"):
        rollout.rollback(service, current, did, T0 + 23, rollout.API, "rollback requested")
