"""Leader election and the replica registry on etcd (see the package docstring for fencing).

Per replica, etcd holds (under ``<prefix>cluster/``, all attached to the replica's lease, so
they vanish within the lease TTL when the replica dies):

    replicas/<id>      its /v1/cluster row, rewritten every ``heartbeat`` seconds
    leader             {"id": ...} of the leader, created once per term

Election: ``put leader if it does not exist`` (compare mod_revision == 0) with our lease. The
losers watch the key and try again when it goes away. The leader steps down locally when its
lease cannot be refreshed (``EtcdStore.keep_alive`` raises ``LeaseLost`` after one TTL without
an answer) or when the key is no longer its own; fenced writes cover the moments in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Callable

from ..errors import RevisionConflict, StoreError
from ..store.base import Txn
from ..store.etcd import EtcdStore, LeaseLost
from . import LEADER_KEY, REPLICAS, Callback, Fence, Info

log = logging.getLogger(__name__)


class EtcdCoordinator:
    def __init__(self, store: EtcdStore, replica_id: str, info: Info, *, ttl: int = 5, heartbeat: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.replica_id = replica_id
        self.ttl = ttl
        self.heartbeat = heartbeat
        self._info = info
        self._clock = clock
        self._fence: Fence | None = None
        self._lease = 0
        self._task: asyncio.Task[None] | None = None
        self._on_elected: Callback | None = None
        self._on_deposed: Callback | None = None
        self.leader_id: str | None = None

    @property
    def is_leader(self) -> bool:
        return self._fence is not None

    @property
    def lease(self) -> int:
        """The current lease (0 between leases): other leased keys of this replica use it."""
        return self._lease

    def fence(self) -> Fence | None:
        return self._fence

    async def start(self, on_elected: Callback, on_deposed: Callback) -> None:
        self._on_elected, self._on_deposed = on_elected, on_deposed
        self._task = asyncio.create_task(self._run(), name="cluster-coordinator")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._step_down("stopping")
        if self._lease:
            # Revoking deletes our leader key and registry row at once: the next leader need
            # not wait for the TTL after a clean shutdown.
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(self._lease)
            self._lease = 0

    async def view(self) -> dict[str, Any]:
        leader = await self.store.get(LEADER_KEY)
        listing = await self.store.list(REPLICAS)
        self.leader_id = leader.value.get("id") if leader else None
        return {"leader": self.leader_id, "replicas": [e.value for e in listing.entries]}

    async def replica_count(self) -> int:
        return len((await self.store.list(REPLICAS)).entries)

    # -- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._lease = await self.store.grant_lease(self.ttl)
                failures = 0
                await self._register()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.store.keep_alive(self._lease, self.ttl))
                    group.create_task(self._heartbeat())
                    group.create_task(self._campaign())
            except* (LeaseLost, StoreError) as errors:
                log.warning("replica %s: lost its etcd lease or etcd (%s); stepping down and rejoining",
                            self.replica_id, "; ".join(str(e) for e in errors.exceptions))
            except* Exception as errors:  # a bug must not end the coordination for good
                log.error("replica %s: coordination failed; stepping down and rejoining",
                          self.replica_id, exc_info=errors.exceptions[0])
            await self._step_down("lease lost")
            self._lease = 0
            failures += 1
            await asyncio.sleep(random.random() * min(2.0, 0.2 * 2 ** min(failures, 5)))

    async def _register(self) -> None:
        row = {**self._info(), "id": self.replica_id, "last_seen": self._clock()}
        await self.store.commit(Txn().put(REPLICAS + self.replica_id, row, lease=self._lease))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            await self._register()

    async def _campaign(self) -> None:
        watcher = self.store.watch_prefix(LEADER_KEY)
        try:
            await watcher.__anext__()
            while True:
                if self._fence is None:
                    try:
                        revision = await self.store.commit(Txn().expect(LEADER_KEY, 0).put(
                            LEADER_KEY, {"id": self.replica_id, "since": self._clock()}, lease=self._lease))
                    except RevisionConflict:
                        pass
                    else:
                        self._fence = Fence(LEADER_KEY, revision)
                        self.leader_id = self.replica_id
                        log.info("replica %s is the leader (fence revision %d)", self.replica_id, revision)
                        assert self._on_elected is not None
                        await self._on_elected()
                        continue
                entry = await self.store.get(LEADER_KEY)
                self.leader_id = entry.value.get("id") if entry else None
                if self._fence is not None and (entry is None or entry.mod_revision != self._fence.mod_revision):
                    await self._step_down("the leader key is no longer ours")
                    continue
                if entry is None:
                    continue  # vacant: campaign at once
                await watcher.__anext__()  # wait for the leader key to change
        finally:
            await watcher.aclose()

    async def _step_down(self, why: str) -> None:
        if self._fence is None:
            return
        self._fence = None
        log.warning("replica %s is no longer the leader: %s", self.replica_id, why)
        if self._on_deposed is not None:
            await self._on_deposed()
