"""The etcd backend's own behaviour (the shared contract is in test_store.py), the replica
coordination on it (election, fencing, registry), against the real 3-member etcd cluster."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator

import pytest

from controlplane.cluster import LEADER_KEY, REPLICAS
from controlplane.cluster.etcd import EtcdCoordinator
from controlplane.errors import ConfigError, NotLeader, StoreError
from controlplane.model import Change, Service, apply_service_spec
from controlplane.store.base import Txn
from controlplane.store.etcd import CONFIG_MARKER, EtcdStore, open_etcd_store
from controlplane.store.repository import Repository
from controlplane.store.url import EtcdURL, SQLiteURL, parse_store_url
from tests.etcd import EtcdCluster, fresh_prefix
from tests.harness import wait_for

pytestmark = pytest.mark.timeout(90)
WAIT = 10.0


@pytest.fixture
async def prefix() -> str:
    return fresh_prefix()


@pytest.fixture
async def store(etcd: EtcdCluster, prefix: str) -> AsyncIterator[EtcdStore]:
    s = await open_etcd_store(etcd.endpoints, prefix)
    try:
        yield s
    finally:
        await s.close()


# -- --store URLs ----------------------------------------------------------------------------------


def test_store_urls() -> None:
    assert parse_store_url("sqlite:///var/lib/bg/state.db") == SQLiteURL(__import__("pathlib").Path("/var/lib/bg/state.db"))
    assert parse_store_url("etcd://10.0.0.1:2379") == EtcdURL(("10.0.0.1:2379",), "/bluegreen/")
    assert parse_store_url("etcd://a:1,b:2/team/x/") == EtcdURL(("a:1", "b:2"), "/team/x/")
    for bad, message in [("etcd://", "at least one"), ("etcd://host", "HOST:PORT"), ("etcd://h:99999", "HOST:PORT"),
                         ("sqlite://relative.db", "absolute"), ("redis://x:1", "unknown scheme")]:
        with pytest.raises(ConfigError, match=message):
            parse_store_url(bad)


# -- config revision vs coordination keys -----------------------------------------------------------


async def test_coordination_writes_neither_move_the_config_revision_nor_wake_the_watch(store: EtcdStore) -> None:
    r1 = await store.commit(Txn().put("services/a", {"v": 1}))
    watcher = store.watch()
    try:
        assert await asyncio.wait_for(watcher.__anext__(), WAIT) == r1
        pending = asyncio.ensure_future(watcher.__anext__())
        for i in range(3):
            await store.commit(Txn().put(f"{REPLICAS}r{i}", {"i": i}))
        listing = await store.list("services/")
        assert listing.revision == r1 == await store.revision()
        assert not pending.done()
        r2 = await store.commit(Txn().put("deployments/a/0000000001", {"id": "a-1"}))
        assert await asyncio.wait_for(pending, WAIT) == r2 == await store.revision()
        assert [e.key for e in (await store.list("")).entries] == ["deployments/a/0000000001", "services/a"]
        assert (await store.get(CONFIG_MARKER)) is not None  # the marker lives among coordination keys
    finally:
        await watcher.aclose()


async def test_two_clients_compare_and_set_concurrently_lose_no_update(etcd: EtcdCluster, prefix: str) -> None:
    """Two replicas (two connections) incrementing one service: every increment lands."""
    a, b = await open_etcd_store(etcd.endpoints, prefix), await open_etcd_store(etcd.endpoints, prefix)
    try:
        await Repository(a).mutate("shop", lambda s, c, now: Change(apply_service_spec(s, "shop", {"drain_seconds": 0})), create=True)

        def increment(service: Service | None, current: Any, now: float) -> Change:
            assert service is not None
            return Change(dataclasses.replace(service, drain_seconds=service.drain_seconds + 1))

        async def bump(kv: EtcdStore) -> None:
            for _ in range(8):
                await Repository(kv).mutate("shop", increment)

        await asyncio.wait_for(asyncio.gather(bump(a), bump(b), bump(a), bump(b)), 60)
        assert (await Repository(b).service("shop")).drain_seconds == 32
    finally:
        await a.close()
        await b.close()


# -- leases -------------------------------------------------------------------------------------------


async def test_leased_keys_vanish_with_their_lease(store: EtcdStore) -> None:
    lease = await store.grant_lease(2)
    await store.commit(Txn().put(f"{REPLICAS}me", {"x": 1}, lease=lease))
    keeper = asyncio.ensure_future(store.keep_alive(lease, 2))
    try:
        assert await store.get(f"{REPLICAS}me") is not None
    finally:
        keeper.cancel()
    await store.revoke_lease(lease)
    assert await store.get(f"{REPLICAS}me") is None


# -- etcd gone -------------------------------------------------------------------------------------------


async def test_all_members_down_raises_store_error_naming_etcd_and_watch_resumes(etcd: EtcdCluster, prefix: str) -> None:
    s = await open_etcd_store(etcd.endpoints, prefix, timeout=1.0)
    try:
        r1 = await s.commit(Txn().put("services/a", {"v": 1}))
        watcher = s.watch()
        assert await asyncio.wait_for(watcher.__anext__(), WAIT) == r1
        for i in range(3):
            etcd.stop_member(i)
        with pytest.raises(StoreError, match=r"etcd at 127\.0\.0\.1:\d+,127\.0\.0\.1:\d+,127\.0\.0\.1:\d+: commit failed"):
            await s.commit(Txn().put("services/a", {"v": 2}))
        with pytest.raises(StoreError, match="etcd at"):
            await s.get("services/a")
        pending = asyncio.ensure_future(watcher.__anext__())
        etcd.ensure_all_running()
        # A write through another client while ours reconnects: our watch resumes and sees it.
        other = await open_etcd_store(etcd.endpoints, prefix, timeout=10.0)
        try:
            r2 = await other.commit(Txn().put("services/b", {"v": 1}))
        finally:
            await other.close()
        assert await asyncio.wait_for(pending, 30) >= r2
        entry = await wait_for(lambda: s.get("services/a"), timeout=30, message="store back")
        assert entry.value == {"v": 1}  # the failed write left nothing
        await watcher.aclose()
    finally:
        etcd.ensure_all_running()
        await s.close()


async def test_one_member_down_changes_nothing(etcd: EtcdCluster, prefix: str) -> None:
    s = await open_etcd_store(etcd.endpoints, prefix, timeout=10.0)
    try:
        etcd.stop_member(0)  # the first endpoint: the channel has to move to another member
        etcd.wait_healthy()
        r = await s.commit(Txn().put("services/a", {"v": 1}))
        assert (await s.get("services/a")).mod_revision == r  # type: ignore[union-attr]
    finally:
        etcd.ensure_all_running()
        await s.close()


# -- election and fencing -----------------------------------------------------------------------------


class Replica:
    def __init__(self, kv: EtcdStore, name: str) -> None:
        self.kv = kv
        self.events: list[str] = []
        self.coordinator = EtcdCoordinator(kv, name, lambda: {"xds": "x", "admin": "a", "connected_proxies": 0, "store_revision": 0},
                                           ttl=2, heartbeat=0.5)

    async def start(self) -> None:
        async def elected() -> None:
            self.events.append("elected")

        async def deposed() -> None:
            self.events.append("deposed")

        await self.coordinator.start(elected, deposed)


async def test_one_leader_fenced_writes_and_takeover(etcd: EtcdCluster, prefix: str) -> None:
    kvs = [await open_etcd_store(etcd.endpoints, prefix) for _ in range(2)]
    replicas = [Replica(kv, f"r{i}") for i, kv in enumerate(kvs)]
    try:
        await Repository(kvs[0]).mutate("shop", lambda s, c, now: Change(apply_service_spec(s, "shop", {})), create=True)
        for r in replicas:
            await r.start()
        leader = await wait_for(lambda: [r for r in replicas if r.coordinator.is_leader], timeout=WAIT, message="a leader")
        assert len(leader) == 1
        first, other = leader[0], next(r for r in replicas if r is not leader[0])
        view = await wait_for(lambda: _full_view(other.coordinator), timeout=WAIT, message="both registered")
        assert view["leader"] == first.coordinator.replica_id
        fence = first.coordinator.fence()
        assert fence is not None and fence.key == LEADER_KEY
        repo = Repository(first.kv)
        await repo.mutate("shop", lambda s, c, now: Change(apply_service_spec(s, "shop", {"drain_seconds": 3})),
                          fence=(fence.key, fence.mod_revision))

        # The leader goes away (its lease revoked, as when it dies and the TTL runs out).
        first.coordinator._task.cancel()  # type: ignore[union-attr]
        await first.kv.revoke_lease(first.coordinator.lease)
        await wait_for(lambda: other.coordinator.is_leader, timeout=WAIT, message="takeover")
        # The deposed leader's fenced write fails and stores nothing.
        with pytest.raises(NotLeader):
            await repo.mutate("shop", lambda s, c, now: Change(apply_service_spec(s, "shop", {"drain_seconds": 99})),
                              fence=(fence.key, fence.mod_revision))
        assert (await Repository(other.kv).service("shop")).drain_seconds == 3
    finally:
        for r in replicas:
            await r.coordinator.stop()
        for kv in kvs:
            await kv.close()


async def _full_view(coordinator: EtcdCoordinator) -> dict[str, Any] | None:
    view = await coordinator.view()
    return view if len(view["replicas"]) == 2 and view["leader"] else None


# -- fleet-wide views: proxy summaries and telemetry through etcd ----------------------------------------


async def test_telemetry_reported_to_a_follower_reaches_the_leaders_analysis(etcd: EtcdCluster, prefix: str) -> None:
    from controlplane.cluster.shared import FleetTelemetry, SharedState
    from controlplane.telemetry import ClusterReport, MetricsSink

    kvs = [await open_etcd_store(etcd.endpoints, prefix) for _ in range(2)]
    sinks = [MetricsSink(), MetricsSink()]
    status = {"generation": 7, "proxies": 2, "acked": 2, "lagging": [], "rejecting": [], "converged": True}
    shared = [SharedState(kv, f"r{i}", ("edge",), lambda: 0, lambda fleet, require_all: dict(status), sinks[i])
              for i, kv in enumerate(kvs)]
    leases = [await kv.grant_lease(10) for kv in kvs]
    try:
        leader = FleetTelemetry(sinks[0], shared[0])
        for s, lease in zip(shared, leases):
            await s.write_once(lease)  # the starting point of each replica's sums
        await shared[0].refresh()
        start = leader.snapshot()
        # A proxy on the follower reports 10 requests, 2 of them 5xx; one on the leader 5 and 0.
        sinks[1].record("edge-2", {"shop-green": ClusterReport(requests=10, errors=2)})
        sinks[0].record("edge-1", {"shop-green": ClusterReport(requests=5, errors=0)})
        await shared[1].write_once(leases[1])
        await shared[0].refresh()
        window = leader.since(start, "shop-green")
        assert (window.requests, window.errors) == (15, 2), window
        assert "replica:r1" in window.proxies and "edge-1" in window.proxies
        # The follower's proxy summary is part of the leader's view of the fleet.
        [(replica, summary)] = shared[0].remote("edge").items()
        assert replica == "r1" and (summary["connected"], summary["generation"], summary["converged"]) == (2, 7, True)
        # Nothing changed: no write (the load grows with changes, not with time or proxies).
        before = await kvs[1].list("cluster/")
        await shared[1].write_once(leases[1])
        assert [e.mod_revision for e in (await kvs[1].list("cluster/")).entries] == [e.mod_revision for e in before.entries]
    finally:
        for kv, lease in zip(kvs, leases):
            await kv.revoke_lease(lease)
            await kv.close()


# -- release groups --------------------------------------------------------------------------------


async def test_a_release_of_the_most_services_allowed_fits_in_etcd_transactions(store: EtcdStore) -> None:
    """A release's changes are single transactions (docs/releases.md) and etcd caps one at 128
    operations: at releases.MAX_SERVICES members, the heaviest group changes commit, creating the
    release over standby environments it replaces (two records per member) and rolling every
    member back (two records per member)."""
    from controlplane.deploy import releases, transitions
    from controlplane.deploy.operations import Operations

    repo = Repository(store)
    operations = Operations(repo, ())
    names = tuple(f"s{i:02d}" for i in range(releases.MAX_SERVICES))
    for name in names:
        await operations.put_service(name, {"domains": [f"{name}.example"], "drain_seconds": 0, "standby_seconds": 3600})
        # v1 on blue, then v2 on green: blue is left in standby, which the release replaces.
        for env, version, port in (("blue", "v1", 9001), ("green", "v2", 9002)):
            await operations.put_environment(name, env, {"version": version, "endpoints": [f"127.0.0.1:{port}"]})
        await operations.switch(name, "green")  # blue: standby (drain_seconds 0)
    request = releases.parse_release_request({"services": {n: {"version": "v3", "endpoints": ["127.0.0.1:9003"]} for n in names},
                                              "strategy": {"steps": [50, 100], "step_seconds": 600}})
    created = await repo.mutate_group(names, lambda m, _, group_id, now: releases.create(m, group_id, request, now, "api"))
    assert all(len(change.deployments) == 2 for change in created.changes.values()), "each member replaces a standby"
    group = created.group
    for name in names:
        d = releases.member_record(group, await repo.current_deployments(name), name)
        await repo.mutate(name, lambda s, c, now, i=d.id: transitions.smoke_passed(s, c, i, now, "ok"))
    shifted = await repo.mutate_group(names, lambda m, g, _, now: releases.proceed_all(g, m, now), release_id=group.id)
    rolled = await repo.mutate_group(names, lambda m, g, _, now: releases.rollback_all(g, m, now, "api", "test"),
                                     release_id=group.id)
    assert rolled.group.status.value == "rolled_back" and rolled.revision > shifted.revision
    assert all(len(change.deployments) == 2 for change in rolled.changes.values()), "each member writes two records"
