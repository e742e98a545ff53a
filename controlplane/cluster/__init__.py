"""Replicas and their leader.

A *coordinator* tells the rest of the control plane who this replica is, whether it leads the
workflow, and the *fence* its workflow writes carry. Two implementations:

* :class:`Standalone` (SQLite, one process): always the leader, no fence, one replica.
* :class:`controlplane.cluster.etcd.EtcdCoordinator`: leader election on etcd with a lease, a
  registry of replicas (one leased key each, refreshed every second), and the fence.

**Fencing.** The leader key is created in a transaction that requires it not to exist, attached
to the leader's lease, and never rewritten while the leadership lasts: its ``mod_revision`` is
fixed. Every workflow write of the leader adds "leader key still at that mod_revision" to its
compare-and-set (:class:`Fence`). A deposed leader (its lease expired, another replica elected)
therefore cannot store a step: its write fails with :class:`~controlplane.errors.NotLeader` and
its driver stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

LEADER_KEY = "cluster/leader"
REPLICAS = "cluster/replicas/"


@dataclass(frozen=True)
class Fence:
    """A compare every fenced write adds: ``key`` must still be at ``mod_revision``."""

    key: str
    mod_revision: int


Callback = Callable[[], Awaitable[None]]
Info = Callable[[], dict[str, Any]]  # this replica's row of /v1/cluster (without last_seen)


class Coordinator(Protocol):
    replica_id: str

    @property
    def is_leader(self) -> bool: ...

    def fence(self) -> Fence | None:
        """The fence for a workflow write now; None when no fencing applies (standalone)."""
        ...

    async def start(self, on_elected: Callback, on_deposed: Callback) -> None: ...

    async def stop(self) -> None: ...

    async def view(self) -> dict[str, Any]:
        """``{"leader": id, "replicas": [rows]}`` for GET /v1/cluster."""
        ...


class Standalone:
    """One process on its own store: the leader from start to stop."""

    def __init__(self, replica_id: str, info: Info, clock: Callable[[], float] = time.time) -> None:
        self.replica_id = replica_id
        self._info = info
        self._clock = clock

    @property
    def is_leader(self) -> bool:
        return True

    def fence(self) -> Fence | None:
        return None

    async def start(self, on_elected: Callback, on_deposed: Callback) -> None:
        await on_elected()

    async def stop(self) -> None:
        pass

    async def view(self) -> dict[str, Any]:
        return {"leader": self.replica_id, "replicas": [{**self._info(), "id": self.replica_id, "last_seen": self._clock()}]}
