"""The deployment workflow as pure transitions: deploy, verify, shift, bake, drain, standby,
decommission, and the commands that steer it (promote, pause, resume, rollback, abort).

Every function takes the service, its current deployment records and ``now``, checks that the
transition is allowed *in that state*, and returns a :class:`~controlplane.model.Change` with a
history event, or raises. The driver (``driver.py``) and the API call them inside
:meth:`Repository.mutate`, so a command and a timer racing on the same deployment are applied
one after the other on fresh state, and the second one sees what the first did (a promote that
arrives after an automatic rollback is refused, not applied on top of it).

Lifecycle of the deployment in the idle environment::

    deploying ──smoke ok──► ready ──► shifting (step 0 … n) ──► active (baking) ──► active
        │                       │       │  ▲ pause/resume            │
        └──smoke failed/abort──►failed◄─┘  └──┴── rollback/abort/analysis ──► rolled_back

Optional phases before step 0, each with a stored deadline and judged like a step:
``ready`` with phase ``mirror`` (shadow traffic only; a failure there ends in ``failed``: no user
was served by the new version) and ``shifting`` at step -1 with phase ``targeting`` (matching
requests only; promote ends it early). While a deployment needs routing beyond weights
(affinity pins, targeting, mirroring) it is on the service as ``service.release``.

and of the environment it replaces: active ──(weight 0)──► draining ──► standby ──► decommissioned.

With analysis, a step or the bake ends only with a judged interval (:func:`analysis_result`):
its deadline is a minimum, never a reason to move on unjudged (:func:`analysis_hold`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping

from .spec import Analysis, DeploymentSpec, Strategy, parse_deployment_spec, spec_to_dict
from ..errors import ConflictError
from ..model import (
    Change,
    Deployment,
    DeploymentStatus as S,
    Environment,
    EnvironmentState,
    Event,
    Release,
    Service,
    Traffic,
)

Current = Mapping[Environment, Deployment | None]

API = "api"
AUTOMATIC = "automatic"


def _event(d: Deployment, status: S, now: float, actor: str, why: str, **changes: object) -> Deployment:
    """``d`` in ``status`` with one more history event; ``changes`` sets other fields (its
    ``reason`` is the record's failure reason, ``why`` is the event's)."""
    return replace(d, status=status, updated_at=now, history=d.history + (Event(now, status.value, actor, why),), **changes)  # type: ignore[arg-type]


def spec_of(d: Deployment) -> DeploymentSpec:
    assert d.spec is not None, f"{d.id} is not a workflow deployment"
    return parse_deployment_spec(d.spec)


def in_progress(current: Current) -> Deployment | None:
    for record in current.values():
        if record is not None and record.in_progress:
            return record
    return None


def _traffic(service: Service, env: Environment, weight: int) -> Traffic:
    """Weights with ``weight`` on ``env``; at 100 the environment becomes active."""
    old = service.traffic
    weights = {env: weight, env.other: 100 - weight}
    active, previous = old.active, old.previous
    if weight == 100 and old.active is not env:
        active, previous = env, old.active
    return Traffic(active=active, previous=previous, blue=weights[Environment.BLUE], green=weights[Environment.GREEN])


# ---------------------------------------------------------------------------------------------
# Starting


def start(service: Service, current: Current, spec: DeploymentSpec, now: float, actor: str = API) -> Change:
    """Register the new version in the idle environment (status deploying)."""
    busy = in_progress(current)
    if busy is not None:
        raise ConflictError(f"deployment {busy.id} of {service.name} is in progress ({busy.status.value}); finish, roll back or abort it first")
    traffic = service.traffic
    if traffic.weight(traffic.active) != 100:
        raise ConflictError(
            f"{service.name} has a manual split in progress ({traffic.blue}/{traffic.green}); "
            "finish it (switch) or roll it back before deploying"
        )
    target = traffic.idle
    stable = current.get(target.other)
    records: list[Deployment] = []
    replaced = current.get(target)
    was_live = replaced is not None and replaced.status in (S.STANDBY, S.DRAINING)
    seq = service.deployment_seq + 1
    if replaced is not None:
        records.append(_event(replaced, S.DECOMMISSIONED, now, actor, f"replaced by {service.name}-{seq} ({spec.version})",
                              deadline=None, hooks_pending=was_live, counterpart=f"{service.name}-{seq}"))
    new = Deployment(
        id=f"{service.name}-{seq}",
        service=service.name,
        version=spec.version,
        environment=target,
        status=S.DEPLOYING,
        deployed_at=now,
        updated_at=now,
        spec=spec_to_dict(spec),
        counterpart=stable.id if stable is not None and service.environment(target.other).registered else None,
        baseline_capacity=service.environment(target.other).capacity or None,
        history=(Event(now, S.DEPLOYING.value, actor, f"deploy {spec.version} to {target.value}"),),
    )
    records.append(new)
    updated = replace(service.with_environment(target, spec.endpoints), deployment_seq=seq)
    return Change(updated, tuple(records))


def _find(current: Current, deployment_id: str) -> Deployment:
    for record in current.values():
        if record is not None and record.id == deployment_id:
            return record
    raise ConflictError(f"deployment {deployment_id} is no longer current")


EXPAND_APPLIED = "expand migrations applied"


def expand_applied(service: Service, current: Current, deployment_id: str, now: float, detail: str) -> Change:
    """The deployment's expand files are in the database (before its smoke tests run)."""
    d = _find(current, deployment_id)
    if d.status is not S.DEPLOYING:
        raise ConflictError(f"deployment {d.id} is {d.status.value}, not deploying")
    return Change(service, (_event(d, S.DEPLOYING, now, AUTOMATIC, f"{EXPAND_APPLIED}: {detail}"),))


def expand_done(d: Deployment) -> bool:
    return any(e.reason.startswith(EXPAND_APPLIED) for e in d.history)


def smoke_passed(service: Service, current: Current, deployment_id: str, now: float, detail: str) -> Change:
    d = _find(current, deployment_id)
    if d.status is not S.DEPLOYING:
        raise ConflictError(f"deployment {d.id} is {d.status.value}, not deploying")
    return Change(service, (_event(d, S.READY, now, AUTOMATIC, detail),))


def smoke_failed(service: Service, current: Current, deployment_id: str, now: float, reason: str) -> Change:
    d = _find(current, deployment_id)
    if d.status is not S.DEPLOYING:
        raise ConflictError(f"deployment {d.id} is {d.status.value}, not deploying")
    return Change(service, (_event(d, S.FAILED, now, AUTOMATIC, f"smoke tests failed: {reason}", reason=reason),))


# ---------------------------------------------------------------------------------------------
# Before the shift: mirroring and targeting

MIRROR = "mirror"
TARGETING = "targeting"


def proceed(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    """The smoke tests passed: start the first phase the spec asks for (mirror, targeting), or
    the shift. With nothing to shift from (the first version of a service) there is no
    production traffic to mirror or to target, and the shift goes straight to 100 %."""
    d = _find(current, deployment_id)
    if d.status is not S.READY or d.phase is not None:
        raise ConflictError(f"deployment {d.id} is {d.status.value}{f' ({d.phase})' if d.phase else ''}, not ready to proceed")
    spec = spec_of(d)
    if d.counterpart is not None and spec.mirror is not None:
        return _start_mirror(service, d, now, spec)
    if d.counterpart is not None and spec.target is not None:
        return _start_targeting(service, d, now, spec, "smoke tests passed")
    return shift(service, current, d.id, 0, now, AUTOMATIC, "smoke tests passed; shifting")


def _start_mirror(service: Service, d: Deployment, now: float, spec: DeploymentSpec) -> Change:
    assert spec.mirror is not None
    mirror = spec.mirror
    updated = replace(service, release=Release(d.id, d.environment, mirror_percent=mirror.percent))
    why = f"smoke tests passed; mirroring {mirror.percent:g}% of production requests to {d.environment.value} for {mirror.seconds:g}s"
    return Change(updated, (_event(d, S.READY, now, AUTOMATIC, why, phase=MIRROR, deadline=now + mirror.seconds,
                                   intervals_judged=0, failures=0, no_data_intervals=0, extended=False),))


def _start_targeting(service: Service, d: Deployment, now: float, spec: DeploymentSpec, after: str) -> Change:
    assert spec.target is not None
    target = spec.target
    rule = target.rule
    what = ", ".join([f"{k}: {v}" for k, v in rule.headers] + ([f"cookie {rule.cookie[0]}={rule.cookie[1]}"] if rule.cookie else []))
    updated = replace(service, release=Release(d.id, d.environment, target=rule))
    why = f"{after}; targeting: requests with {what} go to {d.environment.value} for {target.seconds:g}s or until promoted"
    return Change(updated, (_event(d, S.SHIFTING, now, AUTOMATIC, why, phase=TARGETING, step=-1, deadline=now + target.seconds,
                                   intervals_judged=0, failures=0, no_data_intervals=0, extended=False),))


def phase_due(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    """The mirror or targeting phase's time is up: go on to the next phase (as :func:`step_due`
    for a step: with analysis it is extended once while unjudged, otherwise it ends with the
    interval in progress)."""
    d = _find(current, deployment_id)
    if d.phase is None or d.paused_remaining is not None:
        raise ConflictError(f"deployment {d.id} is not in a timed mirror or targeting phase")
    if d.deadline is None or d.deadline > now:
        raise ConflictError(f"deployment {d.id}: the {d.phase} phase is not over yet")
    analysis = spec_of(d).analysis
    if analysis is not None:
        return _extend(service, d, now, analysis, f"{d.phase} phase")
    return _after_phase(service, current, d, now, f"after {_phase_seconds(d):g}s")


def _phase_seconds(d: Deployment) -> float:
    spec = spec_of(d)
    if d.phase == MIRROR and spec.mirror is not None:
        return spec.mirror.seconds
    return spec.target.seconds if spec.target is not None else 0.0


def _after_phase(service: Service, current: Current, d: Deployment, now: float, after: str) -> Change:
    spec = spec_of(d)
    if d.phase == MIRROR and spec.target is not None:
        return _start_targeting(service, d, now, spec, f"mirror phase passed {after}")
    return shift(service, current, d.id, 0, now, AUTOMATIC, f"{d.phase} phase passed {after}; shifting")


def _mirror_failed(service: Service, d: Deployment, now: float, actor: str, reason: str) -> Change:
    """The mirror phase failed: no production response ever came from the new version."""
    updated = replace(service, release=None)
    return Change(updated, (_event(d, S.FAILED, now, actor, f"mirror phase failed: {reason}", reason=reason,
                                   deadline=None, phase=None),))


# ---------------------------------------------------------------------------------------------
# Shifting


def _release_for(service: Service, d: Deployment, weight: int) -> Release | None:
    """The routing a step at ``weight`` needs beyond weights: affinity pins while split."""
    affinity = spec_of(d).affinity or service.affinity
    if affinity is None or not 0 < weight < 100:
        return None
    before = service.traffic.weight(d.environment)
    earlier = service.release.earlier if service.release is not None and service.release.deployment == d.id else ()
    if 0 < before < weight:
        earlier = tuple(sorted({*earlier, before}))
    return Release(d.id, d.environment, affinity=affinity, earlier=earlier)


def _steps(service: Service, d: Deployment) -> tuple[int, ...]:
    # With nothing to shift from (the first version of a service), there is no gradual shift.
    return spec_of(d).strategy.steps if d.counterpart is not None else (100,)


def shift(service: Service, current: Current, deployment_id: str, step: int, now: float, actor: str, reason: str) -> Change:
    """Put the weight of ``step`` on the new environment. Reaching 100 starts the bake and the
    old environment's drain."""
    d = _find(current, deployment_id)
    if d.status not in (S.READY, S.SHIFTING):
        raise ConflictError(f"deployment {d.id} is {d.status.value}; only a ready or shifting deployment can shift")
    steps = _steps(service, d)
    if not 0 <= step < len(steps) or step <= d.step:
        raise ConflictError(f"deployment {d.id}: step {step} is not ahead of step {d.step} of {list(steps)}")
    weight = steps[step]
    short = capacity_shortfall(service, d, weight)
    if short is not None:
        return _start_scaling(service, d, step, weight, short, now, actor, reason)
    strategy: Strategy = spec_of(d).strategy
    updated = replace(service, traffic=_traffic(service, d.environment, weight), release=_release_for(service, d, weight))
    records: list[Deployment] = []
    if weight < 100:
        records.append(_event(d, S.SHIFTING, now, actor, reason, step=step, deadline=now + strategy.step_seconds,
                              paused_remaining=None, awaiting_promote=False, intervals_judged=0, extended=False, phase=None,
                              scaling_step=None))
    else:
        records.append(_event(d, S.ACTIVE, now, actor, reason, step=step, deadline=now + strategy.bake_seconds,
                              baking=True, activated_at=now, paused_remaining=None, awaiting_promote=False,
                              intervals_judged=0, extended=False, phase=None, scaling_step=None))
        old = current.get(d.environment.other)
        if old is not None and old.status not in (S.DECOMMISSIONED, S.FAILED):
            records.append(_event(old, S.DRAINING, now, AUTOMATIC, f"replaced by {d.id}; in-flight requests finish",
                                  deadline=now + service.drain_seconds, counterpart=d.id))
    return Change(updated, tuple(records))


# ---------------------------------------------------------------------------------------------
# The capacity guard (docs/capacity.md)

SCALING = "scaling"


def required_capacity(d: Deployment, weight: int) -> int | None:
    """The capacity the new environment of ``d`` needs to take ``weight`` %: that share of the
    capacity that served 100 % when ``d`` started, plus the headroom, rounded up. None: no guard
    (no ``scale`` in the spec, or nothing served before)."""
    scale = spec_of(d).scale
    if scale is None or not d.baseline_capacity:
        return None
    # Integer percent arithmetic first, so 50 % of 4 is exactly 2 and not 2.0000000000000004 -> 3.
    exact = d.baseline_capacity * weight * (100 + scale.headroom_percent)
    return math.ceil(round(exact, 6) / 10_000)


def capacity_shortfall(service: Service, d: Deployment, weight: int) -> tuple[int, int] | None:
    """(needed, have) when the new environment is too small for ``weight`` %, else None."""
    needed = required_capacity(d, weight)
    have = service.environment(d.environment).capacity
    if needed is None or have >= needed:
        return None
    return needed, have


def _start_scaling(service: Service, d: Deployment, step: int, weight: int, short: tuple[int, int], now: float,
                   actor: str, after: str) -> Change:
    """Hold the current weights: the ``scaling`` phase waits for capacity to take ``weight`` %."""
    scale = spec_of(d).scale
    assert scale is not None
    needed, have = short
    why = (f"{after}; scaling: {weight}% needs capacity {needed} in {d.environment.value}, it has {have}; "
           f"waiting up to {scale.timeout_seconds:g}s (then {scale.on_timeout})")
    return Change(service, (_event(d, d.status, now, actor, why, phase=SCALING, scaling_step=step,
                                   deadline=now + scale.timeout_seconds, paused_remaining=None, awaiting_promote=False),))


def scaling_weight(service: Service, d: Deployment) -> int:
    """The weight the scaling phase of ``d`` waits to give its environment."""
    assert d.scaling_step is not None, f"{d.id} is not scaling"
    return _steps(service, d)[d.scaling_step]


def capacity_ready(service: Service, current: Current, deployment_id: str, now: float, actor: str = AUTOMATIC) -> Change:
    """The new environment now has the capacity the waiting step needs: shift to it."""
    d = _find(current, deployment_id)
    if d.phase != SCALING or d.scaling_step is None:
        raise ConflictError(f"deployment {d.id} is not waiting for capacity")
    weight = _steps(service, d)[d.scaling_step]
    if capacity_shortfall(service, d, weight) is not None:
        raise ConflictError(f"deployment {d.id}: {d.environment.value} still lacks the capacity for {weight}%")
    have = service.environment(d.environment).capacity
    return shift(service, current, d.id, d.scaling_step, now, actor,
                 f"capacity {have} in {d.environment.value} is enough; step {d.scaling_step}: {weight}%")


def scale_timeout(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    """The scaling phase outlived ``scale.timeout_seconds``. Before any production traffic the
    deployment fails. Holding a share, ``rollback`` moves all traffic back; ``fail`` stops at
    the share it has, paused, for an operator to resume (which asks for capacity again) or roll back."""
    d = _find(current, deployment_id)
    if d.phase != SCALING or d.deadline is None or d.deadline > now:
        raise ConflictError(f"deployment {d.id} is not at the end of a scaling phase")
    scale = spec_of(d).scale
    assert scale is not None
    why = f"scale timeout: {d.environment.value} did not reach the capacity needed within {scale.timeout_seconds:g}s"
    if d.status is S.READY:
        cleared = replace(service, release=None) if service.release is not None and service.release.deployment == d.id else service
        return Change(cleared, (_event(d, S.FAILED, now, AUTOMATIC, why, reason=why, deadline=None, phase=None, scaling_step=None),))
    if scale.on_timeout == "rollback":
        rolled = rollback(service, current, d.id, now, AUTOMATIC, why)
        first = replace(rolled.deployments[0], scaling_step=None)
        return Change(rolled.service, (first,) + rolled.deployments[1:])
    held = f"{why}; paused at {service.traffic.weight(d.environment)}%: add capacity and resume, or roll back"
    return Change(service, (_event(d, S.SHIFTING, now, AUTOMATIC, held, phase=None, scaling_step=None, deadline=None,
                                   paused_remaining=0.0),))


def step_due(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    """The step's time is up: advance, or wait for a promote before 100 %.

    With analysis the step is not over until it has been judged (see :func:`analysis_hold`):
    the first call past the deadline of a step that must go on records why, once
    ("step 0 (10%) extended: ..."); a step that may end ends with the interval in progress
    (:func:`analysis_result`), never here. Either way a second call raises ConflictError."""
    d = _find(current, deployment_id)
    if d.status is not S.SHIFTING or d.paused_remaining is not None or d.awaiting_promote or d.phase is not None:
        raise ConflictError(f"deployment {d.id} is not running a timed step")
    if d.deadline is None or d.deadline > now:
        raise ConflictError(f"deployment {d.id}: step {d.step} is not over yet")
    analysis = spec_of(d).analysis
    if analysis is not None:
        return _extend(service, d, now, analysis, f"step {d.step} ({_steps(service, d)[d.step]}%)")
    return _advance(service, current, d, now, f"after {spec_of(d).strategy.step_seconds:g}s")


def _advance(service: Service, current: Current, d: Deployment, now: float, after: str) -> Change:
    steps = _steps(service, d)
    nxt = d.step + 1
    if steps[nxt] == 100 and not spec_of(d).strategy.auto_promote:
        waiting = _event(d, S.SHIFTING, now, AUTOMATIC, f"holding at {steps[d.step]}%: waiting for promote",
                         awaiting_promote=True, deadline=None)
        return Change(service, (waiting,))
    return shift(service, current, d.id, nxt, now, AUTOMATIC, f"step {nxt}: {steps[nxt]}% {after}")


NOT_JUDGED = "no full analysis interval judged yet"


def analysis_hold(d: Deployment, analysis: Analysis | None) -> str | None:
    """Why the step or bake of ``d`` must go on past its deadline to be judged, or None.

    Analysis always judges: a phase needs at least one judged interval, and never ends on a
    breach (more traffic never moves onto a version whose last interval breached; the
    failure_limit decides when it rolls back). None does not end the phase by itself: it ends
    with the next interval judged ok (:func:`analysis_result`), so no partial interval at the
    deadline goes unjudged."""
    if analysis is None:
        return None
    if d.intervals_judged == 0:
        if d.no_data_intervals:
            return (f"{NOT_JUDGED} ({d.no_data_intervals} interval(s) with fewer than {analysis.min_requests} requests; "
                    f"no_data_limit {analysis.no_data_limit})")
        return NOT_JUDGED
    if d.failures:
        return f"its last analysis interval breached a threshold ({d.failures}/{analysis.failure_limit})"
    return None


def timer_due(d: Deployment, analysis: Analysis | None, now: float) -> bool:
    """Whether :func:`step_due` or :func:`bake_due` has something to do for ``d`` at ``now``: its
    deadline has passed, and without analysis it ends; with analysis it is extended, once."""
    if d.deadline is None or d.deadline > now or d.paused_remaining is not None or d.awaiting_promote:
        return False
    return analysis is None or (not d.extended and analysis_hold(d, analysis) is not None)


def _extend(service: Service, d: Deployment, now: float, analysis: Analysis, phase: str) -> Change:
    hold = analysis_hold(d, analysis)
    if hold is None:
        raise ConflictError(f"deployment {d.id}: {phase} ends with the analysis interval in progress")
    if d.extended:
        raise ConflictError(f"deployment {d.id}: {phase} is already extended: {hold}")
    return Change(service, (_event(d, d.status, now, AUTOMATIC, f"{phase} extended: {hold}", extended=True),))


def _judged(d: Deployment) -> str:
    n = d.intervals_judged
    return f"{n} analysis interval{'s' if n != 1 else ''} judged"


def promote(service: Service, current: Current, deployment_id: str, now: float, *, full: bool = False,
            to_step: int | None = None) -> Change:
    """Advance to the next step now (``full``: straight to 100 %; ``to_step``: to that step
    index, a no-op if already there or past it, so a retried call cannot advance twice). At the
    hold before 100 % (auto_promote false) the next step is 100 %."""
    d = _find(current, deployment_id)
    steps = _steps(service, d)
    if to_step is not None and not 0 <= to_step < len(steps):
        raise ConflictError(f"deployment {d.id}: step {to_step} does not exist; steps are 0..{len(steps) - 1} of {list(steps)}")
    if d.status is S.ACTIVE and (full or to_step is not None):
        return Change(service)  # already at 100 %: the promote has happened
    if to_step is not None and d.status is S.SHIFTING and d.step >= to_step:
        return Change(service)
    if d.status is not S.SHIFTING:
        raise ConflictError(f"deployment {d.id} is {d.status.value}; only a shifting deployment can be promoted")
    target = len(steps) - 1 if full else (to_step if to_step is not None else d.step + 1)
    return shift(service, current, deployment_id, target, now, API, f"promoted to {steps[target]}%")


def bake_due(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    """The bake's time is up: the deployment is complete. With analysis, as for a step
    (:func:`step_due`): extended once while unjudged, otherwise it ends with the interval in
    progress."""
    d = _find(current, deployment_id)
    if d.status is not S.ACTIVE or not d.baking or d.paused_remaining is not None:
        raise ConflictError(f"deployment {d.id} is not baking")
    if d.deadline is None or d.deadline > now:
        raise ConflictError(f"deployment {d.id}: bake is not over yet")
    analysis = spec_of(d).analysis
    if analysis is not None:
        return _extend(service, d, now, analysis, "bake")
    return _bake_finished(service, d, now, "bake finished; deployment complete")


def _bake_finished(service: Service, d: Deployment, now: float, reason: str) -> Change:
    return Change(service, (_event(d, S.ACTIVE, now, AUTOMATIC, reason, baking=False, deadline=None),))


def pause(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    d = _find(current, deployment_id)
    if not (d.status is S.SHIFTING or (d.status is S.ACTIVE and d.baking)):
        raise ConflictError(f"deployment {d.id} is {d.status.value}; only a shifting or baking deployment can be paused")
    if d.paused_remaining is not None:
        return Change(service)  # already paused: idempotent
    remaining = max(0.0, d.deadline - now) if d.deadline is not None else 0.0
    return Change(service, (_event(d, d.status, now, API, "paused", paused_remaining=remaining, deadline=None),))


def resume(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    d = _find(current, deployment_id)
    if d.paused_remaining is None:
        if d.status is S.SHIFTING or d.baking:
            return Change(service)  # not paused: idempotent
        raise ConflictError(f"deployment {d.id} is {d.status.value}, not paused")
    deadline = None if d.awaiting_promote else now + d.paused_remaining
    return Change(service, (_event(d, d.status, now, API, "resumed", paused_remaining=None, deadline=deadline),))


def rollback(service: Service, current: Current, deployment_id: str, now: float, actor: str, reason: str) -> Change:
    """100 % back to the environment the deployment replaced, pushed at once."""
    d = _find(current, deployment_id)
    if d.status is S.ROLLED_BACK:
        return Change(service)  # already rolled back: idempotent
    if d.status in (S.DEPLOYING, S.READY):
        raise ConflictError(f"deployment {d.id} has taken no production traffic ({d.status.value}); abort it instead")
    if d.status not in (S.SHIFTING, S.ACTIVE):
        raise ConflictError(f"deployment {d.id} is {d.status.value}; nothing to roll back")
    back = d.environment.other
    if not service.environment(back).registered:
        raise ConflictError(f"cannot roll back {d.id}: {back.value} has no endpoints (was it decommissioned?)")
    old = current.get(back)
    if old is not None and old.status not in (S.ACTIVE, S.DRAINING, S.STANDBY):
        # e.g. a newer deployment is being verified there: never send traffic to it unverified
        raise ConflictError(
            f"cannot roll back {d.id}: {back.value} now holds {old.id} ({old.status.value}), "
            f"not the version {d.id} replaced; abort {old.id} first"
        )
    # No release routing outlives the rollback: no pin, target or mirror keeps sending anyone there.
    updated = replace(service, traffic=_traffic(service, back, 100), release=None)
    records = [_event(d, S.ROLLED_BACK, now, actor, reason, reason=reason, deadline=None, paused_remaining=None,
                      awaiting_promote=False, baking=False, phase=None, scaling_step=None)]
    if old is not None:
        records.append(_event(old, S.ACTIVE, now, actor, f"rollback of {d.id}: {reason}", deadline=None, waiting_for=None))
    return Change(updated, tuple(records))


def abort(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    d = _find(current, deployment_id)
    if d.status in (S.FAILED, S.ROLLED_BACK):
        return Change(service)  # already stopped: idempotent
    if d.status in (S.DEPLOYING, S.READY):
        cleared = replace(service, release=None) if service.release is not None and service.release.deployment == d.id else service
        return Change(cleared, (_event(d, S.FAILED, now, API, "aborted before taking production traffic", reason="aborted",
                                       deadline=None, phase=None, scaling_step=None),))
    return rollback(service, current, deployment_id, now, API, "aborted")


def analysis_result(service: Service, current: Current, deployment_id: str, now: float, figures: Mapping[str, object],
                    breach: str | None, failure_limit: int) -> Change:
    """Record one judged analysis interval; ``failure_limit`` consecutive breaches roll back.

    An interval judged ok at or after the deadline of its step or bake ends that phase, in the
    same change: the step advances (or holds for a promote), the bake finishes."""
    d = _find(current, deployment_id)
    return _record_interval(service, current, d, now, figures, breach, failure_limit, no_data_intervals=0)


def under_analysis(d: Deployment) -> bool:
    """A step, the bake, or a mirror or targeting phase: the analysis judges ``d`` now."""
    return d.status is S.SHIFTING or (d.status is S.ACTIVE and d.baking) or (d.status is S.READY and d.phase == MIRROR)


def _record_interval(service: Service, current: Current, d: Deployment, now: float, figures: Mapping[str, object],
                     breach: str | None, failure_limit: int, *, no_data_intervals: int) -> Change:
    if not under_analysis(d):
        raise ConflictError(f"deployment {d.id} is not under analysis")
    judged = d.intervals_judged + 1
    if breach is None:
        passed = replace(d, analysis=dict(figures), intervals=_kept_intervals(d, figures, now), failures=0, intervals_judged=judged, no_data_intervals=no_data_intervals,
                         updated_at=now)
        if passed.paused_remaining is not None or passed.deadline is None or passed.deadline > now or passed.phase == SCALING:
            return Change(service, (passed,))
        if passed.baking:
            return _bake_finished(service, passed, now, f"bake finished; deployment complete ({_judged(passed)})")
        if passed.phase is not None:
            return _after_phase(service, {**current, d.environment: passed}, passed, now, f"after {_phase_seconds(d):g}s; {_judged(passed)}")
        after = f"after {spec_of(d).strategy.step_seconds:g}s; {_judged(passed)}"
        return _advance(service, {**current, d.environment: passed}, passed, now, after)
    failures = d.failures + 1
    if failures >= failure_limit and d.phase == MIRROR:
        failed = _mirror_failed(service, d, now, AUTOMATIC, f"analysis: {breach} ({failures} consecutive)")
        first = replace(failed.deployments[0], analysis=dict(figures), failures=failures, intervals_judged=judged,
                        no_data_intervals=no_data_intervals)
        return Change(failed.service, (first,))
    if failures >= failure_limit:
        rolled = rollback(service, current, d.id, now, AUTOMATIC, f"analysis: {breach} ({failures} consecutive)")
        first = replace(rolled.deployments[0], analysis=dict(figures), intervals=_kept_intervals(d, figures, now), failures=failures, intervals_judged=judged,
                        no_data_intervals=no_data_intervals)
        return Change(rolled.service, (first,) + rolled.deployments[1:])
    breached = _event(d, d.status, now, AUTOMATIC, f"analysis breach {failures}/{failure_limit}: {breach}",
                      analysis=dict(figures), intervals=_kept_intervals(d, figures, now), failures=failures,
                      intervals_judged=judged, no_data_intervals=no_data_intervals)
    return Change(service, (breached,))


def analysis_wait(service: Service, current: Current, deployment_id: str, now: float, figures: Mapping[str, object],
                  reason: str, *, no_data_limit: int, failure_limit: int) -> Change:
    """Not enough traffic to judge, and the policy says wait: record the figures only; the
    step or bake goes on (it is not judged). The ``no_data_limit``-th such interval in a row,
    and every one after it, counts as a breach instead."""
    d = _find(current, deployment_id)
    if not under_analysis(d):
        raise ConflictError(f"deployment {d.id} is not under analysis")
    waited = d.no_data_intervals + 1
    if waited >= no_data_limit:
        breach = f"{reason}, {waited} intervals in a row (no_data_limit {no_data_limit})"
        return _record_interval(service, current, d, now, figures, breach, failure_limit, no_data_intervals=waited)
    return Change(service, (replace(d, analysis=dict(figures), intervals=_kept_intervals(d, figures, now),
                                    no_data_intervals=waited, updated_at=now),))


INTERVALS_KEPT = 30  # enough for the dashboard's charts; a record stays small


def _kept_intervals(d: Deployment, figures: Mapping[str, object], now: float) -> tuple[Mapping[str, Any], ...]:
    """``d``'s interval figures with this one (stamped ``at``) appended, the oldest dropped."""
    return (d.intervals + ({**figures, "at": now},))[-INTERVALS_KEPT:]


# ---------------------------------------------------------------------------------------------
# The environment that was replaced: drain, standby, decommission


def drain_due(service: Service, current: Current, deployment_id: str, now: float) -> Change:
    d = _find(current, deployment_id)
    if d.status is not S.DRAINING or d.deadline is None or d.deadline > now:
        raise ConflictError(f"deployment {d.id} is not at the end of its drain")
    return Change(service, (_event(d, S.STANDBY, now, AUTOMATIC, f"drained; standby for instant rollback ({service.standby_seconds}s)",
                                   deadline=now + service.standby_seconds),))


def routing_text(d: Deployment, proxies: tuple[str, ...]) -> str:
    """What a decommission of ``d`` waits for, as the record and its history show it."""
    return f"proxies still routing to {d.environment.value}: {', '.join(proxies)}"


def decommission(service: Service, current: Current, deployment_id: str, now: float, actor: str, reason: str, *,
                 still_routing: tuple[str, ...] = (), force: bool = False) -> Change:
    """Retire a drained or standby environment: it leaves the fleet config (its endpoints are
    removed) and the decommission webhooks are called.

    ``still_routing`` names connected proxies whose route configuration still sends production
    traffic to the environment (e.g. they NACKed the cutover). Removing it under them would
    send their requests to retired instances, so that is refused (ConflictError) unless
    ``force``, which the history records with the proxies' names."""
    d = _find(current, deployment_id)
    if d.status not in (S.STANDBY, S.DRAINING):
        raise ConflictError(f"deployment {d.id} is {d.status.value}; only a draining or standby environment can be decommissioned")
    if actor == AUTOMATIC and (d.deadline is None or d.deadline > now):
        raise ConflictError(f"deployment {d.id}: standby is not over yet")
    if service.traffic.weight(d.environment) > 0:
        raise ConflictError(f"deployment {d.id}: {d.environment.value} still takes traffic")
    if still_routing and not force:
        raise ConflictError(f"deployment {d.id}: {routing_text(d, still_routing)}; they have not taken the route "
                            "that moved traffic away (see GET /v1/proxies); decommission with force=true to remove it anyway")
    if still_routing:
        reason = f"{reason}; forced while {routing_text(d, still_routing)}"
    updated = service.with_environment(d.environment, EnvironmentState())
    updated = replace(updated, traffic=replace(updated.traffic, previous=None))
    return Change(updated, (_event(d, S.DECOMMISSIONED, now, actor, reason, deadline=None, hooks_pending=True, waiting_for=None),))


def decommission_waiting(service: Service, current: Current, deployment_id: str, now: float, still_routing: tuple[str, ...]) -> Change:
    """A due decommission waits for proxies that still route to the environment: record what it
    waits for on the deployment, and in its history when the wait begins (not on every look)."""
    d = _find(current, deployment_id)
    if d.status is not S.STANDBY or d.deadline is None or d.deadline > now:
        raise ConflictError(f"deployment {d.id} is not a standby due for decommission")
    text = routing_text(d, still_routing)
    if d.waiting_for == text:
        return Change(service)
    if d.waiting_for is not None:
        return Change(service, (replace(d, waiting_for=text, updated_at=now),))
    return Change(service, (_event(d, S.STANDBY, now, AUTOMATIC, f"decommission waits: {text}", waiting_for=text),))
