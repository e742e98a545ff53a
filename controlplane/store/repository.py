"""Typed access to stored state: services and deployment records, changed only through atomic
read-modify-write transactions.

Keys (shared by every backend)::

    services/<name>                      a service (settings, environments, traffic)
    deployments/<service>/<seq:010d>     one deployment record
    releases/<seq:010d>                  one release group (docs/releases.md)

:meth:`Repository.mutate` reads a service and its current deployment records, applies a pure
function to them and commits the result on condition that none of them changed meanwhile
(compare-and-set on their revisions). If another writer won the race, it re-reads and applies
the function again, so the function must be pure.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from ..errors import NotFoundError, NotLeader, RevisionConflict
from ..model import (
    Change,
    Deployment,
    DeploymentStatus,
    Environment,
    ReleaseGroup,
    Service,
    deployment_from_dict,
    release_group_from_dict,
    release_group_to_dict,
    deployment_to_dict,
    service_from_dict,
    service_to_dict,
)
from .base import KVStore, Txn

SERVICES = "services/"
DEPLOYMENTS = "deployments/"
RELEASES = "releases/"
RELEASE_ID_PREFIX = "release-"
MAX_ATTEMPTS = 20
# After a lost compare-and-set race, wait a random time up to this (doubling per attempt, capped)
# before re-reading: writers on several replicas that retry at once would otherwise keep
# colliding (a test with 4 writers over 2 etcd connections gave up after 20 attempts).
CONFLICT_BACKOFF_SECONDS = 0.002
CONFLICT_BACKOFF_CAP_SECONDS = 0.2


async def _back_off(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, min(CONFLICT_BACKOFF_CAP_SECONDS, CONFLICT_BACKOFF_SECONDS * 2 ** attempt)))

Mutation = Callable[[Service | None, Mapping[Environment, Deployment | None], float], Change]
Fence = tuple[str, int]  # (key, mod_revision) a fenced write requires; see controlplane.cluster
Members = Mapping[str, tuple[Service, Mapping[Environment, Deployment | None]]]
# (members as stored, the group or None when creating one with this id, now) -> (changes, group)
GroupMutation = Callable[[Members, "ReleaseGroup | None", str, float], tuple[Mapping[str, Change], ReleaseGroup]]


def service_key(name: str) -> str:
    return f"{SERVICES}{name}"


def deployment_key(service: str, seq: int) -> str:
    return f"{DEPLOYMENTS}{service}/{seq:010d}"


def release_key(seq: int) -> str:
    return f"{RELEASES}{seq:010d}"


def release_seq(release_id: str) -> int:
    """The number in ``release-<n>``; NotFoundError for anything else."""
    number = release_id[len(RELEASE_ID_PREFIX):] if release_id.startswith(RELEASE_ID_PREFIX) else ""
    if not number.isascii() or not number.isdigit():
        raise NotFoundError(f"unknown release {release_id!r}: ids look like 'release-<number>'")
    return int(number)


def _seq(deployment_id: str) -> int:
    return int(deployment_id.rsplit("-", 1)[1])


@dataclass(frozen=True)
class State:
    """Every service at one store revision."""

    revision: int
    services: tuple[Service, ...]


@dataclass(frozen=True)
class GroupCommitted:
    """One transaction that changed several services and their release group."""

    revision: int
    changes: Mapping[str, Change]
    group: ReleaseGroup
    accepted_at: float

    def per_service(self) -> tuple["Committed", ...]:
        return tuple(Committed(self.revision, change, self.accepted_at) for change in self.changes.values())


@dataclass(frozen=True)
class Committed:
    revision: int
    change: Change
    accepted_at: float  # when the commit returned (clock of this process)
    # The service's current deployments as this commit left them (what current_deployments
    # would read right after it), so that callers need no second read.
    deployments: dict[Environment, Deployment | None] | None = None


class Repository:
    def __init__(self, kv: KVStore, clock: Callable[[], float] = time.time) -> None:
        self.kv = kv
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        # Decoded services by key, with the mod_revision they were decoded at: the publisher
        # reads the whole state after every change, and decoding 1000s of unchanged services
        # (JSON, then Service) each time made registering them quadratic. Services are
        # immutable, so sharing them between states is safe.
        self._decoded: dict[str, tuple[int, Service]] = {}

    async def state(self) -> State:
        previous = self._decoded
        listing = await self.kv.list(SERVICES, unchanged={key: revision for key, (revision, _) in previous.items()})
        decoded = {key: previous[key] for key in listing.kept}
        for entry in listing.entries:
            decoded[entry.key] = (entry.mod_revision, service_from_dict(entry.value))
        self._decoded = decoded
        return State(listing.revision, tuple(decoded[key][1] for key in sorted(decoded)))

    async def service(self, name: str) -> Service:
        entry = await self.kv.get(service_key(name))
        if entry is None:
            raise NotFoundError(f"unknown service {name!r}")
        return service_from_dict(entry.value)

    async def deployments(self, service: str) -> list[Deployment]:
        listing = await self.kv.list(f"{DEPLOYMENTS}{service}/")
        return [deployment_from_dict(e.value) for e in listing.entries]

    async def current_deployments(self, service: str) -> dict[Environment, Deployment | None]:
        """The latest record of each environment that is not decommissioned."""
        listing = await self.kv.list(f"{DEPLOYMENTS}{service}/")
        return _current({e.key: deployment_from_dict(e.value) for e in listing.entries})

    async def _check_fence(self, fence: Fence | None) -> None:
        """After a conflict: NotLeader if the fence moved (retrying could never succeed)."""
        if fence is None:
            return
        entry = await self.kv.get(fence[0])
        if entry is None or entry.mod_revision != fence[1]:
            raise NotLeader(f"fenced write refused: {fence[0]} is no longer at revision {fence[1]} "
                            "(this replica is not the leader any more)")

    async def mutate(self, name: str, mutation: Mutation, *, create: bool = False, fence: Fence | None = None) -> Committed:
        """Apply ``mutation`` atomically. Raises NotFoundError for an unknown service unless
        ``create``; errors raised by ``mutation`` propagate and nothing is written. With
        ``fence`` the write also requires that key to be at that mod_revision, and raises
        NotLeader (writing nothing) once it is not."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # serializes writers of this service within this process
            for attempt in range(MAX_ATTEMPTS):
                entry = await self.kv.get(service_key(name))
                if entry is None and not create:
                    raise NotFoundError(f"unknown service {name!r}")
                service = service_from_dict(entry.value) if entry else None
                listing = await self.kv.list(f"{DEPLOYMENTS}{name}/")
                revisions = {e.key: e.mod_revision for e in listing.entries}
                records = {e.key: deployment_from_dict(e.value) for e in listing.entries}
                current = _current(records)
                change = mutation(service, current, self._clock())
                txn = Txn().expect(service_key(name), entry.mod_revision if entry else 0)
                if fence is not None:
                    txn.expect(*fence)
                txn.put(service_key(name), service_to_dict(change.service))
                for record in change.deployments:
                    key = deployment_key(name, _seq(record.id))
                    txn.expect(key, revisions.get(key, 0)).put(key, deployment_to_dict(record))
                try:
                    revision = await self.kv.commit(txn)
                except RevisionConflict:
                    await self._check_fence(fence)
                    await _back_off(attempt)
                    continue  # another replica wrote first: re-read and re-apply
                written = {deployment_key(name, _seq(r.id)): r for r in change.deployments}
                return Committed(revision, change, self._clock(), _current({**records, **written}))
        raise RevisionConflict(f"service {name!r}: gave up after {MAX_ATTEMPTS} conflicting concurrent updates")

    async def update_record(self, service: str, deployment_id: str, update: Callable[[Deployment, float], Deployment],
                            *, fence: Fence | None = None) -> int:
        """Rewrite one deployment record (any status) with compare-and-set on that record alone."""
        key = deployment_key(service, _seq(deployment_id))
        for attempt in range(MAX_ATTEMPTS):
            entry = await self.kv.get(key)
            if entry is None:
                raise NotFoundError(f"unknown deployment {deployment_id!r}")
            record = update(deployment_from_dict(entry.value), self._clock())
            txn = Txn().expect(key, entry.mod_revision).put(key, deployment_to_dict(record))
            if fence is not None:
                txn.expect(*fence)
            try:
                return await self.kv.commit(txn)
            except RevisionConflict:
                await self._check_fence(fence)
                await _back_off(attempt)
                continue
        raise RevisionConflict(f"deployment {deployment_id!r}: gave up after {MAX_ATTEMPTS} conflicting concurrent updates")

    async def deployment(self, deployment_id: str) -> Deployment:
        service, _, seq = deployment_id.rpartition("-")
        if not service or not seq.isdigit():
            raise NotFoundError(f"unknown deployment {deployment_id!r}: ids look like '<service>-<number>'")
        entry = await self.kv.get(deployment_key(service, int(seq)))
        if entry is None:
            raise NotFoundError(f"unknown deployment {deployment_id!r}")
        return deployment_from_dict(entry.value)

    # -- release groups (docs/releases.md) -------------------------------------------------------

    async def release_groups(self) -> list[ReleaseGroup]:
        listing = await self.kv.list(RELEASES)
        return [release_group_from_dict(e.value) for e in listing.entries]

    async def release_group(self, release_id: str) -> ReleaseGroup:
        entry = await self.kv.get(release_key(release_seq(release_id)))
        if entry is None:
            raise NotFoundError(f"unknown release {release_id!r}")
        return release_group_from_dict(entry.value)

    async def mutate_group(self, names: tuple[str, ...], mutation: GroupMutation, *, release_id: str | None = None,
                           fence: Fence | None = None) -> GroupCommitted:
        """Apply ``mutation`` to the services ``names`` and one release group in ONE transaction:
        every service, every deployment record it writes and the group record are compared and
        written together, so the proxies get every member's change in the same snapshot or none.

        ``release_id`` None creates a new group (the mutation gets None and the id to give it).
        Errors raised by ``mutation`` propagate and nothing is written; NotFoundError names an
        unknown service. Same retry and fencing rules as :meth:`mutate`."""
        ordered = tuple(sorted(set(names)))
        locks = [self._locks.setdefault(name, asyncio.Lock()) for name in ordered]
        for lock in locks:  # always in name order, so two group writers cannot deadlock
            await lock.acquire()
        try:
            for attempt in range(MAX_ATTEMPTS):
                txn = Txn()
                if fence is not None:
                    txn.expect(*fence)
                members: dict[str, tuple[Service, dict[Environment, Deployment | None]]] = {}
                revisions: dict[str, int] = {}
                for name in ordered:
                    entry = await self.kv.get(service_key(name))
                    if entry is None:
                        raise NotFoundError(f"unknown service {name!r}")
                    txn.expect(service_key(name), entry.mod_revision)
                    listing = await self.kv.list(f"{DEPLOYMENTS}{name}/")
                    revisions.update({e.key: e.mod_revision for e in listing.entries})
                    current: dict[Environment, Deployment | None] = {env: None for env in Environment}
                    for e in listing.entries:
                        record = deployment_from_dict(e.value)
                        if record.status is not DeploymentStatus.DECOMMISSIONED:
                            current[record.environment] = record
                    members[name] = (service_from_dict(entry.value), current)
                if release_id is None:
                    listing = await self.kv.list(RELEASES)
                    seq = max((int(e.key[len(RELEASES):]) for e in listing.entries), default=0) + 1
                    group_key, group, group_id = release_key(seq), None, f"{RELEASE_ID_PREFIX}{seq}"
                    txn.expect(group_key, 0)
                else:
                    group_key = release_key(release_seq(release_id))
                    group_entry = await self.kv.get(group_key)
                    if group_entry is None:
                        raise NotFoundError(f"unknown release {release_id!r}")
                    group, group_id = release_group_from_dict(group_entry.value), release_id
                    txn.expect(group_key, group_entry.mod_revision)
                changes, updated = mutation(members, group, group_id, self._clock())
                for name, change in changes.items():
                    if name not in members:
                        raise ValueError(f"group mutation changed {name!r}, which it did not read")
                    txn.put(service_key(name), service_to_dict(change.service))
                    for record in change.deployments:
                        key = deployment_key(name, _seq(record.id))
                        txn.expect(key, revisions.get(key, 0)).put(key, deployment_to_dict(record))
                txn.put(group_key, release_group_to_dict(updated))
                try:
                    revision = await self.kv.commit(txn)
                except RevisionConflict:
                    await self._check_fence(fence)
                    await _back_off(attempt)
                    continue
                return GroupCommitted(revision, changes, updated, self._clock())
        finally:
            for lock in reversed(locks):
                lock.release()
        raise RevisionConflict(f"release of {', '.join(ordered)}: gave up after {MAX_ATTEMPTS} conflicting concurrent updates")

def _current(records: dict[str, Deployment]) -> dict[Environment, Deployment | None]:
    """By environment, the latest (highest key) record that is not decommissioned."""
    current: dict[Environment, Deployment | None] = {env: None for env in Environment}
    for key in sorted(records):
        record = records[key]
        if record.status is not DeploymentStatus.DECOMMISSIONED:
            current[record.environment] = record
    return current
