"""Operations on services: the only place that changes stored state.

Each operation validates its input, applies a pure model transition inside an atomic store
transaction (:meth:`Repository.mutate`), and returns what was committed. The xDS push follows
from the store's change notification (see ``fleet.Publisher``), never from here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

from ..errors import ConflictError
from . import transitions
from .releases import refuse_if_held
from ..model import (
    Change,
    Deployment,
    DeploymentStatus,
    Environment,
    EnvironmentState,
    Fleet,
    Service,
    apply_service_spec,
    full_weights,
    parse_environment_spec,
    parse_weights,
    rollback_target,
    route_conflict,
    set_environment,
    set_weights,
    switch_target,
    validate_service_name,
)
from ..store.repository import Committed, Repository

Current = Mapping[Environment, Deployment | None]


def _not_during_deployment(service: Service, current: Current) -> None:
    for record in current.values():
        if record is not None and record.in_progress:
            raise ConflictError(
                f"deployment {record.id} of {service.name} is in progress ({record.status.value}); "
                f"steer it with /v1/deployments/{record.id}/{{promote,pause,resume,rollback,abort}}"
            )


def _scales_deployment(service: Service, current: Current, env: Environment, state: EnvironmentState) -> Deployment | None:
    """The deployment under way whose new environment ``env`` this registration scales (same
    version, at least one endpoint) once its smoke tests passed; None for anything else, which a
    deployment in progress refuses. Scaling the environment a deployment moves traffic to is how
    its capacity guard is satisfied (docs/capacity.md); while it bakes at 100 % (active), scaling
    it is what an autoscaler or an endpoint source does."""
    d = transitions.in_progress(current)
    if d is None or d.environment is not env or d.status not in (DeploymentStatus.READY, DeploymentStatus.SHIFTING,
                                                                 DeploymentStatus.ACTIVE):
        return None
    if state.version != service.environment(env).version or not state.endpoints:
        return None
    return d


def with_actor(change: Change, actor: str, now: float) -> Change:
    """The change with history events made on request (actor ``api``) credited to ``actor``,
    the authenticated caller. The pure transitions only know "a request" and "the timer"."""
    if actor == transitions.API:
        return change
    records = tuple(
        replace(d, history=tuple(replace(e, actor=actor) if e.actor == transitions.API and e.at == now else e for e in d.history))
        for d in change.deployments
    )
    return replace(change, deployments=records)


def _no_owner(service: str, env: Environment) -> None:
    return None


class Operations:
    def __init__(self, repo: Repository, fleets: tuple[Fleet, ...]) -> None:
        self.repo = repo
        self.fleets = fleets
        # Raises ConflictError when an endpoint source owns the environment (set by the app
        # when endpoint sources are configured; see controlplane.sources).
        self.check_not_owned: Callable[[str, Environment], None] = _no_owner

    async def put_service(self, name: str, body: object, *, actor: str = transitions.API) -> Committed:
        validate_service_name(name)
        others = list((await self.repo.state()).services)

        def mutation(service: Service | None, current: Current, now: float) -> Change:
            updated = apply_service_spec(service, name, body)
            clash = route_conflict(self.fleets, others, updated)
            if clash:
                raise ConflictError(clash)
            return Change(updated)

        # The conflict check reads other services outside the transaction; two concurrent
        # creations of clashing routes could both pass. Creating services is rare and done by
        # people or pipelines, and a clash is visible in the route table (first one wins).
        return await self.repo.mutate(name, lambda s, c, now: with_actor(mutation(s, c, now), actor, now), create=True)

    async def put_environment(self, name: str, env_name: str, body: object, *, actor: str = transitions.API,
                              source: str | None = None) -> Committed:
        """Register an environment's version and endpoints. An environment owned by an endpoint
        source is refused (409 naming it) unless ``source`` is that source's own write."""
        env = Environment.parse(env_name)
        state = parse_environment_spec(body)
        if source is None:
            self.check_not_owned(name, env)

        def mutation(service: Service | None, current: Current, now: float) -> Change:
            assert service is not None
            deploying = _scales_deployment(service, current, env, state)
            if deploying is None:
                # More endpoints of the new version stay allowed in a release (they move no
                # traffic); anything else on a held member is refused naming the release.
                refuse_if_held(service, f"changing {env.value}'s endpoints")
                _not_during_deployment(service, current)
            change = set_environment(service, env, state, current, now)
            if deploying is not None and deploying.phase == transitions.SCALING and transitions.capacity_shortfall(
                    change.service, deploying, transitions.scaling_weight(change.service, deploying)) is None:
                # The capacity the waiting step needs has arrived: shift in the same transaction.
                return transitions.capacity_ready(change.service, current, deploying.id, now, actor=transitions.API)
            return change

        return await self.repo.mutate(name, lambda s, c, now: with_actor(mutation(s, c, now), actor, now))

    async def set_traffic(self, name: str, body: object, *, actor: str = transitions.API) -> Committed:
        weights = parse_weights(body)

        def mutation(service: Service | None, current: Current, now: float) -> Change:
            assert service is not None
            refuse_if_held(service, "a manual traffic change")
            _not_during_deployment(service, current)
            return set_weights(service, weights, current, now)

        return await self.repo.mutate(name, lambda s, c, now: with_actor(mutation(s, c, now), actor, now))

    async def switch(self, name: str, to: str | None, *, actor: str = transitions.API) -> Committed:
        target_env = Environment.parse(to) if to is not None else None

        def mutation(service: Service | None, current: Current, now: float) -> Change:
            assert service is not None
            refuse_if_held(service, "a switch")
            _not_during_deployment(service, current)
            target = switch_target(service, target_env)
            return set_weights(service, full_weights(target), current, now)

        return await self.repo.mutate(name, lambda s, c, now: with_actor(mutation(s, c, now), actor, now))

    async def rollback(self, name: str, *, actor: str = transitions.API) -> Committed:
        def mutation(service: Service | None, current: Current, now: float) -> Change:
            assert service is not None
            refuse_if_held(service, "rolling back one member")
            # A deployment made by the workflow is rolled back by the workflow, so its records
            # and the replaced environment's go where the history expects them.
            live = current.get(service.traffic.active if service.traffic.weight(service.traffic.active) == 100 else service.traffic.idle)
            for record in (live, *current.values()):
                if record is not None and record.spec is not None and record.status in (DeploymentStatus.SHIFTING, DeploymentStatus.ACTIVE):
                    if service.environment(record.environment.other).registered:
                        return transitions.rollback(service, current, record.id, now, transitions.API, "rollback requested")
            target = rollback_target(service)
            return set_weights(service, full_weights(target), current, now, rollback=True)

        return await self.repo.mutate(name, lambda s, c, now: with_actor(mutation(s, c, now), actor, now))
