"""Release groups: several services released together, in lockstep (docs/releases.md). Pure.

A release group is a stored record naming one ordinary workflow deployment per member service.
Nothing here re-implements the workflow: every function computes the per-member transition of
``transitions.py`` for each member and returns all of them, with the group's new record, for
:meth:`Repository.mutate_group` to commit in ONE store transaction. One transaction is one store
revision and so one published snapshot: no proxy ever holds a route table in which the members
disagree. The group rule on top of the per-member rules:

* a step (or the bake) ends for all members together, only when it may end for every one;
* a breach that rolls one member back rolls every member back, in the same transaction;
* a member that fails before production traffic (smoke tests) fails the others too;
* while the group is in progress its services carry ``release_group``: a request on one of them
  alone (deploy, traffic, switch, rollback, a command on its deployment) is refused (409).

Drain, standby and decommission of the replaced environments stay per member, as for any
deployment (their timers are per service and change no member's weights).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from . import transitions
from .spec import Analysis, DeploymentSpec, parse_deployment_spec
from ..errors import ConflictError, ValidationError
from ..model import (
    Change,
    Deployment,
    DeploymentStatus as S,
    Environment,
    Event,
    ReleaseGroup,
    ReleaseGroupStatus as G,
    Service,
    reject_unknown,
    require_object,
    validate_service_name,
)

Current = Mapping[Environment, Deployment | None]
Members = Mapping[str, tuple[Service, Current]]
GroupChange = tuple[dict[str, Change], ReleaseGroup]

SHARED_FIELDS = {"strategy", "smoke", "analysis", "decommission", "convergence", "affinity"}
# Phases that are per service by nature, or that let one member wait while the others move:
# not in a release (yet). Each is refused by name rather than silently ignored.
NOT_IN_RELEASES = {
    "migrations": "apply migrations with each service's own deployment before the release",
    "mirror": "a mirror phase is per service",
    "target": "a targeting phase is per service",
    "scale": "the capacity guard could hold one member while the others move",
}
MEMBER_FIELDS = {"version", "endpoints"}
# Every group change is ONE store transaction: per member its service and up to two deployment
# records, each compared and written. etcd refuses a transaction of more than 128 operations
# (its --max-txn-ops default): 32 members stay well within it, whatever the step.
MAX_SERVICES = 32


# ---------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True)
class ReleaseRequest:
    """A validated ``POST /v1/releases`` body: one deployment spec per member service."""

    members: Mapping[str, DeploymentSpec]
    spec: Mapping[str, Any]  # the body as given (stored on the group record)


def parse_release_request(body: object) -> ReleaseRequest:
    """Validate the whole request; ValidationError names the field (``services.web.endpoints``,
    ``smoke.checks[1].service``, ...)."""
    spec = require_object("release", body)
    for name, why in NOT_IN_RELEASES.items():
        if spec.get(name) is not None:
            raise ValidationError(f"{name} is not supported in a release: {why}")
    reject_unknown("release", spec, {"services"} | SHARED_FIELDS | set(NOT_IN_RELEASES))
    services = require_object("services", spec.get("services"))
    if len(services) < 2:
        raise ValidationError("services must name at least two services (a release of one service is a deployment: "
                              "POST /v1/services/{name}/deployments)")
    if len(services) > MAX_SERVICES:
        raise ValidationError(f"services: at most {MAX_SERVICES} services in one release, got {len(services)} (every step of "
                              "a release is one store transaction, and etcd caps those); split it into several releases")
    for name, member in services.items():
        validate_service_name(name)
        reject_unknown(f"services.{name}", require_object(f"services.{name}", member), MEMBER_FIELDS)
    _check_smoke_targets(spec.get("smoke"), set(services))
    members: dict[str, DeploymentSpec] = {}
    for name in sorted(services):
        try:
            members[name] = parse_deployment_spec(member_body(spec, name))
        except ValidationError as exc:
            text = str(exc)
            member_field = text.startswith(("version", "endpoint", "environment", "invalid", "'address'"))
            raise ValidationError(f"services.{name}: {text}" if member_field else text) from None
    if any(m.analysis is not None and m.analysis.prometheus is not None for m in members.values()):
        raise ValidationError("analysis.prometheus is not supported in a release: members are judged from the proxies' own stats")
    return ReleaseRequest(members, dict(spec))


def _check_smoke_targets(smoke: object, names: set[str]) -> None:
    if not isinstance(smoke, Mapping):
        return  # parse_deployment_spec names the problem
    for kind in ("checks", "webhooks"):
        items = smoke.get(kind)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, Mapping) and "service" in item and item["service"] not in names:
                raise ValidationError(f"smoke.{kind}[{i}].service: {item['service']!r} is not a service of this release "
                                      f"({', '.join(sorted(names))})")


def member_body(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The deployment request of member ``name``: its version and endpoints, the shared fields,
    and the smoke checks and webhooks that name it or no service (smoke commands run for every
    member)."""
    body: dict[str, Any] = {key: spec[key] for key in SHARED_FIELDS if spec.get(key) is not None}
    body.update(spec["services"][name])
    smoke = spec.get("smoke")
    if isinstance(smoke, Mapping):
        mine = dict(smoke)
        for kind in ("checks", "webhooks"):
            if isinstance(smoke.get(kind), list):
                mine[kind] = [{k: v for k, v in item.items() if k != "service"} for item in smoke[kind]
                              if not isinstance(item, Mapping) or item.get("service", name) == name]
        body["smoke"] = mine
    return body


# ---------------------------------------------------------------------------------------------
# Reading a group


def member_record(group: ReleaseGroup, current: Current, name: str) -> Deployment:
    deployment_id = dict(group.members)[name]
    for record in current.values():
        if record is not None and record.id == deployment_id:
            return record
    raise ConflictError(f"release {group.id}: deployment {deployment_id} of {name} is no longer current")


def records(group: ReleaseGroup, members: Members) -> dict[str, Deployment]:
    return {name: member_record(group, members[name][1], name) for name in group.services}


def holder_refusal(service: Service, what: str) -> str:
    """The 409 message for ``what`` on a service that a release holds."""
    return (f"{service.name} is held by release {service.release_group}: {what} would split the release; "
            f"steer it with /v1/releases/{service.release_group}/{{promote,pause,resume,rollback,abort}}")


def refuse_if_held(service: Service, what: str) -> None:
    if service.release_group is not None:
        raise ConflictError(holder_refusal(service, what))


# ---------------------------------------------------------------------------------------------
# Creating


def create(members: Members, group_id: str, request: ReleaseRequest, now: float, actor: str) -> GroupChange:
    """Start one deployment per member (status deploying) and hold the services."""
    changes: dict[str, Change] = {}
    started: dict[str, Deployment] = {}
    for name in sorted(members):
        service, current = members[name]
        refuse_if_held(service, "another release")
        change = transitions.start(service, current, request.members[name], now, actor)
        new = change.deployments[-1]
        note = Event(now, S.DEPLOYING.value, actor, f"part of release {group_id} ({', '.join(sorted(members))})")
        started[name] = replace(new, history=new.history + (note,))
        changes[name] = Change(replace(change.service, release_group=group_id), change.deployments[:-1] + (started[name],))
    fresh = sorted(name for name, d in started.items() if d.counterpart is None)
    if fresh and len(fresh) < len(started):
        # Those would go straight to 100 % while the others step: the members would disagree.
        raise ConflictError(f"{', '.join(fresh)} has no version serving production traffic yet while "
                            f"{', '.join(sorted(set(started) - set(fresh)))} has; deploy the first version of "
                            f"{', '.join(fresh)} on its own, then release the services together")
    group = ReleaseGroup(
        id=group_id, status=G.IN_PROGRESS, members=tuple(sorted((n, d.id) for n, d in started.items())),
        spec=request.spec, created_at=now, updated_at=now,
        history=(Event(now, G.IN_PROGRESS.value, actor,
                       "release of " + ", ".join(f"{n} {d.version} ({d.id})" for n, d in sorted(started.items()))),),
    )
    return changes, group


# ---------------------------------------------------------------------------------------------
# Lockstep


MemberTransition = Callable[[Service, Current, Deployment], Change | None]


def _each(group: ReleaseGroup, members: Members, transition: MemberTransition) -> dict[str, Change]:
    changes: dict[str, Change] = {}
    for name in group.services:
        service, current = members[name]
        change = transition(service, current, member_record(group, current, name))
        if change is not None:
            changes[name] = change
    return changes


def settle(group: ReleaseGroup, members: Members, changes: dict[str, Change], now: float, actor: str,
           reason: str) -> GroupChange:
    """The group's status from its members after ``changes``; a group that ends frees its services
    (in the same transaction). ``reason`` goes into the group's history when its status changes."""
    after: dict[str, Deployment] = {}
    for name in group.services:
        service, current = members[name]
        record = member_record(group, current, name)
        written = changes[name].deployments if name in changes else ()
        after[name] = next((d for d in written if d.id == record.id), record)
    status = G.IN_PROGRESS
    if any(d.status is S.ROLLED_BACK for d in after.values()):
        status = G.ROLLED_BACK
    elif any(d.status is S.FAILED for d in after.values()):
        status = G.FAILED
    elif all(d.status is S.ACTIVE and not d.baking for d in after.values()):
        status = G.COMPLETE
    if status is group.status:
        return changes, replace(group, updated_at=now)
    if status.terminal:
        for name in group.services:
            service = changes[name].service if name in changes else members[name][0]
            if service.release_group == group.id:
                kept = changes[name].deployments if name in changes else ()
                changes[name] = Change(replace(service, release_group=None), kept)
    ended = replace(group, status=status, updated_at=now, reason=reason if status in (G.FAILED, G.ROLLED_BACK) else None,
                    history=group.history + (Event(now, status.value, actor, reason),))
    return changes, ended


def _require_in_progress(group: ReleaseGroup, action: str) -> None:
    if group.status is not G.IN_PROGRESS:
        raise ConflictError(f"release {group.id} is {group.status.value}; only a release in progress can {action}")


def proceed_all(group: ReleaseGroup, members: Members, now: float) -> GroupChange:
    """Every member passed its smoke tests: take step 0 on all of them at once."""
    _require_in_progress(group, "start shifting")
    mine = records(group, members)
    waiting = sorted(n for n, d in mine.items() if d.status is not S.READY or d.phase is not None)
    if waiting:
        raise ConflictError(f"release {group.id}: not every member is ready ({', '.join(waiting)})")
    changes = _each(group, members, lambda s, c, d: transitions.proceed(s, c, d.id, now))
    return settle(group, members, changes, now, transitions.AUTOMATIC, "every member passed its smoke tests; shifting")


def fail_unshifted(group: ReleaseGroup, members: Members, now: float, reason: str) -> GroupChange:
    """A member failed before production traffic: the others still verifying fail too."""
    def fail(service: Service, current: Current, d: Deployment) -> Change | None:
        if d.status not in (S.DEPLOYING, S.READY):
            return None
        event = Event(now, S.FAILED.value, transitions.AUTOMATIC, f"release {group.id}: {reason}")
        failed = replace(d, status=S.FAILED, updated_at=now, reason=reason, deadline=None, phase=None, scaling_step=None,
                         history=d.history + (event,))
        return Change(service, (failed,))

    changes = _each(group, members, fail)
    return settle(group, members, changes, now, transitions.AUTOMATIC, reason)


def rollback_all(group: ReleaseGroup, members: Members, now: float, actor: str, reason: str, *,
                 aborting: bool = False) -> GroupChange:
    """Every member back to the version it replaced (members still verifying fail instead), in
    one transaction. Idempotent on a group that already ended that way."""
    if group.status in (G.ROLLED_BACK, G.FAILED):
        return {}, group
    if group.status is G.COMPLETE and aborting:
        raise ConflictError(f"release {group.id} is complete; roll it back instead of aborting it")

    def back(service: Service, current: Current, d: Deployment) -> Change | None:
        if d.status in (S.SHIFTING, S.ACTIVE):
            return transitions.rollback(service, current, d.id, now, actor, f"release {group.id}: {reason}")
        if d.status in (S.DEPLOYING, S.READY):
            event = Event(now, S.FAILED.value, actor, f"release {group.id}: {reason}")
            return Change(service, (replace(d, status=S.FAILED, updated_at=now, reason=reason, deadline=None, phase=None,
                                            history=d.history + (event,)),))
        return None

    changes = _each(group, members, back)
    changes, ended = settle(group, members, changes, now, actor, reason)
    if not ended.status.terminal or ended.status is G.COMPLETE:
        raise ConflictError(f"release {group.id}: nothing to roll back")
    return changes, ended


def command_all(group: ReleaseGroup, members: Members, action: str, now: float, *, full: bool = False,
                to_step: int | None = None, actor: str = transitions.API) -> GroupChange:
    """promote, pause, resume, rollback or abort every member, as the deployment command does."""
    if action == "rollback":
        return rollback_all(group, members, now, actor, "rollback requested")
    if action == "abort":
        return rollback_all(group, members, now, actor, "aborted", aborting=True)
    _require_in_progress(group, action)
    per_member: dict[str, MemberTransition] = {
        "promote": lambda s, c, d: transitions.promote(s, c, d.id, now, full=full, to_step=to_step),
        "pause": lambda s, c, d: transitions.pause(s, c, d.id, now),
        "resume": lambda s, c, d: transitions.resume(s, c, d.id, now),
    }
    changes = {name: change for name, change in _each(group, members, per_member[action]).items()
               if change.deployments or change.service != members[name][0]}
    return settle(group, members, changes, now, actor, f"{action} requested")


def timers_due(group: ReleaseGroup, members: Members, analysis: Analysis | None, now: float) -> GroupChange:
    """The step's or the bake's deadline passed: each member due moves on (without analysis:
    all of them, together; with analysis the deadline only extends the phase until judged)."""
    _require_in_progress(group, "move on")
    mine = records(group, members)
    due = {n for n, d in mine.items() if d.status in (S.SHIFTING, S.ACTIVE) and transitions.timer_due(d, analysis, now)}
    if not due:
        raise ConflictError(f"release {group.id}: no member's timer is due")
    if analysis is None and len(due) < len(mine):
        raise ConflictError(f"release {group.id}: only {', '.join(sorted(due))} due; the members move together")

    def on_time(service: Service, current: Current, d: Deployment) -> Change | None:
        if d.service not in due:
            return None
        if d.status is S.SHIFTING:
            return transitions.step_due(service, current, d.id, now)
        return transitions.bake_due(service, current, d.id, now)

    changes = _each(group, members, on_time)
    return settle(group, members, changes, now, transitions.AUTOMATIC, "bake finished on every member; release complete")


@dataclass(frozen=True)
class Verdict:
    """One member's analysis interval, judged by the driver."""

    verdict: str  # ok | breach | wait
    figures: Mapping[str, object]
    reason: str | None = None


def judged_all(group: ReleaseGroup, members: Members, verdicts: Mapping[str, Verdict], analysis: Analysis,
               now: float) -> GroupChange:
    """Record one judged interval per member. A member rolled back by it rolls back every member;
    the step or bake ends, for all together, only when every member's interval was judged ok
    and its phase may end; otherwise each member just records its interval."""
    _require_in_progress(group, "be judged")
    mine = records(group, members)
    recorded: dict[str, Change] = {}
    for name, d in mine.items():
        service, current = members[name]
        v = verdicts[name]
        held = {**current, d.environment: replace(d, deadline=None)}  # record only: nothing moves on yet
        if v.verdict == "wait":
            change = transitions.analysis_wait(service, held, d.id, now, v.figures, v.reason or "no data",
                                               no_data_limit=analysis.no_data_limit, failure_limit=analysis.failure_limit)
        else:
            change = transitions.analysis_result(service, held, d.id, now, v.figures,
                                                 v.reason if v.verdict == "breach" else None, analysis.failure_limit)
        first = change.deployments[0]
        if first.status is S.ROLLED_BACK:
            return _breached(group, members, name, change, now)
        recorded[name] = Change(service, (replace(first, deadline=d.deadline),) + change.deployments[1:])

    def may_end(name: str) -> bool:
        d = recorded[name].deployments[0]
        return (verdicts[name].verdict == "ok" and d.paused_remaining is None and not d.awaiting_promote
                and d.deadline is not None and d.deadline <= now and transitions.analysis_hold(d, analysis) is None)

    if all(may_end(name) for name in mine):
        ended = {name: transitions.analysis_result(members[name][0], members[name][1], d.id, now, verdicts[name].figures,
                                                   None, analysis.failure_limit) for name, d in mine.items()}
        return settle(group, members, ended, now, transitions.AUTOMATIC,
                      "bake finished on every member; release complete")
    return settle(group, members, recorded, now, transitions.AUTOMATIC, "analysis interval recorded")


def _breached(group: ReleaseGroup, members: Members, name: str, rolled: Change, now: float) -> GroupChange:
    reason = f"{name} breached: {rolled.deployments[0].reason}"
    others = {n: m for n, m in members.items() if n != name}
    changes, _ = rollback_all(replace(group, members=tuple((n, i) for n, i in group.members if n != name)), others, now,
                              transitions.AUTOMATIC, reason)
    changes[name] = rolled
    return settle(group, members, changes, now, transitions.AUTOMATIC, f"analysis: {reason}; every member rolled back")


def phase_of(group: ReleaseGroup, mine: Mapping[str, Deployment]) -> str:
    """One word for the group's progress, for views and the CLI."""
    if group.status is not G.IN_PROGRESS:
        return group.status.value
    ds = list(mine.values())
    if any(d.paused_remaining is not None for d in ds):
        return "paused"
    if any(d.awaiting_promote for d in ds):
        return "awaiting_promote"
    if any(d.status is S.DEPLOYING for d in ds):
        return "deploying"
    if all(d.status is S.READY for d in ds):
        return "ready"
    if any(d.status is S.SHIFTING for d in ds):
        return "shifting"
    if any(d.baking for d in ds):
        return "baking"
    return "in_progress"
