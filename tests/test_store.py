"""Tests of the state store against both real backends (SQLite files under tmp_path, and a real
3-member etcd cluster with a key prefix per test), of the typed Repository on top of them, and of
the xDS versions derived from stored state.

The contract tests take the ``store`` fixture, which runs them once per backend. They assert
revisions relative to each other (etcd's revision is global to the cluster, so it starts wherever
the cluster is), except where a test is SQLite-only.

Watches are awaited with asyncio.wait_for and a timeout, never with sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from controlplane import typeurls
from controlplane.fleet import SnapshotBuilder, service_version
from controlplane.errors import BlueGreenError, NotFoundError, RevisionConflict, StoreError, ValidationError
from controlplane.model import (
    DEFAULT_FLEET,
    Change,
    Deployment,
    DeploymentStatus,
    Endpoint,
    Environment,
    EnvironmentState,
    Fleet,
    ListenerSpec,
    Service,
    Traffic,
    apply_service_spec,
    deployment_to_dict,
    full_weights,
    service_from_dict,
    service_to_dict,
    set_environment,
    set_weights,
)
from controlplane.store.base import Txn
from controlplane.store.repository import DEPLOYMENTS, SERVICES, Repository, deployment_key, service_key
from controlplane.store.etcd import EtcdStore, open_etcd_store
from controlplane.store.sqlite import SQLiteStore, open_sqlite_store
from tests.etcd import EtcdCluster, fresh_prefix

pytestmark = pytest.mark.timeout(30)

BLUE, GREEN = Environment.BLUE, Environment.GREEN
WAIT = 5.0  # seconds; generous upper bound for anything that should happen "at once"

VALUE: dict[str, Any] = {
    "name": "shop",
    "nested": {"list": [1, 2.5, "three", None, True, False], "empty": {}, "unicode": "grün ✓ \u2028"},
    "float": 1722500000.123456,
    "big": 2**53,
    "neg": -7,
}


@pytest.fixture(params=["sqlite", "etcd"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SQLiteStore | EtcdStore]:
    s: SQLiteStore | EtcdStore
    if request.param == "sqlite":
        s = await open_sqlite_store(tmp_path / "state" / "store.db")
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd")
        s = await open_etcd_store(cluster.endpoints, fresh_prefix())
    try:
        yield s
    finally:
        await s.close()


async def wait_until(watcher: AsyncIterator[int], revision: int) -> int:
    """Next values of ``watcher`` until one reaches ``revision``; that value (asserting none
    overshoots it, or goes backwards)."""
    previous = -1
    async for seen in watcher:
        assert previous < seen <= revision, (previous, seen, revision)
        if seen == revision:
            return seen
        previous = seen
    raise AssertionError("watch ended")


async def wait_for_seen(seen: list[int], revision: int) -> None:
    while not seen or seen[-1] < revision:
        await asyncio.sleep(0.01)


async def snapshot_of(store: SQLiteStore | EtcdStore) -> tuple[int, dict[str, tuple[dict[str, Any], int]]]:
    listing = await store.list("")
    return listing.revision, {e.key: (e.value, e.mod_revision) for e in listing.entries}


# =============================================================================================
# Revisions, get and list


async def test_fresh_store_is_empty_at_revision_zero(store: SQLiteStore | EtcdStore) -> None:
    assert await store.revision() == 0
    assert await store.get("services/shop") is None
    listing = await store.list(SERVICES)
    assert (listing.revision, listing.entries) == (0, ())


async def test_commit_increments_the_global_revision(store: SQLiteStore | EtcdStore) -> None:
    r1 = await store.commit(Txn().put("services/a", {"n": 1}))
    r2 = await store.commit(Txn().put("services/b", {"n": 2}).put("services/c", {"n": 3}))
    r3 = await store.commit(Txn().put("services/a", {"n": 4}))
    assert 0 < r1 < r2 < r3
    assert await store.revision() == r3
    a, b, c = [await store.get(f"services/{k}") for k in "abc"]
    assert a is not None and b is not None and c is not None
    # Each key carries the revision of the commit that last wrote it; one txn, one revision.
    assert (a.mod_revision, b.mod_revision, c.mod_revision) == (r3, r2, r2)
    assert a.value == {"n": 4}
    r4 = await store.commit(Txn().delete("services/b"))
    assert r4 > r3
    assert await store.get("services/b") is None
    # A deletion moves the listing's revision too (the generation proxies are served).
    assert (await store.list(SERVICES)).revision == r4 == await store.revision()


async def test_get_and_list_return_equal_dicts(store: SQLiteStore | EtcdStore) -> None:
    await store.commit(Txn().put("services/shop", VALUE))
    entry = await store.get("services/shop")
    assert entry is not None and entry.value == VALUE and entry.key == "services/shop"
    listing = await store.list(SERVICES)
    assert [(e.key, e.value) for e in listing.entries] == [("services/shop", VALUE)]
    # The caller's dict is not aliased by the store.
    assert entry.value is not VALUE


async def test_list_is_a_prefix_range(store: SQLiteStore | EtcdStore) -> None:
    keys = [
        "services/a",
        "services/b/c",
        "services/zzz",
        "services/\u00e9",
        "services",
        "servicesX/a",
        "services0",
        "services.",
        "service/a",
        "deployments/a/0000000001",
        "deployments/a-b/0000000001",
        "deployments/ab/0000000001",
    ]
    txn = Txn()
    for i, key in enumerate(keys):
        txn.put(key, {"i": i})
    revision = await store.commit(txn)

    listing = await store.list(SERVICES)
    assert listing.revision == revision
    assert [e.key for e in listing.entries] == ["services/a", "services/b/c", "services/zzz", "services/\u00e9"]
    assert all(e.mod_revision == revision for e in listing.entries)
    assert [e.key for e in (await store.list("deployments/a/")).entries] == ["deployments/a/0000000001"]
    assert [e.key for e in (await store.list(DEPLOYMENTS)).entries] == [
        "deployments/a-b/0000000001",
        "deployments/a/0000000001",
        "deployments/ab/0000000001",
    ]
    assert len((await store.list("")).entries) == len(keys)
    assert (await store.list("nothing/")).entries == ()


# =============================================================================================
# Compare-and-set


async def test_list_skips_what_the_reader_already_has(store: SQLiteStore | EtcdStore) -> None:
    first = await store.commit(Txn().put("services/a", {"v": 1}).put("services/b", {"v": 1}).put("services/c", {"v": 1}))
    held = {e.key: e.mod_revision for e in (await store.list(SERVICES)).entries}
    second = await store.commit(Txn().put("services/b", {"v": 2}).delete("services/c").put("services/d", {"v": 1}))

    listing = await store.list(SERVICES, unchanged=held)
    assert listing.revision == second
    assert listing.kept == ("services/a",)  # unchanged since the reader's copy: not decoded again
    assert [(e.key, e.value, e.mod_revision) for e in listing.entries] == [("services/b", {"v": 2}, second), ("services/d", {"v": 1}, second)]
    # A stale or unknown revision in ``unchanged`` gives the entry back in full.
    again = await store.list(SERVICES, unchanged={"services/a": first + 100})
    assert again.kept == () and [e.key for e in again.entries] == ["services/a", "services/b", "services/d"]


async def test_expect_zero_means_must_not_exist(store: SQLiteStore | EtcdStore) -> None:
    r1 = await store.commit(Txn().expect("services/a", 0).put("services/a", {"v": 1}))
    with pytest.raises(RevisionConflict):
        await store.commit(Txn().expect("services/a", 0).put("services/a", {"v": 2}))
    entry = await store.get("services/a")
    assert entry is not None and (entry.value, entry.mod_revision) == ({"v": 1}, r1)
    assert await store.revision() == r1


async def test_matching_mod_revision_commits(store: SQLiteStore | EtcdStore) -> None:
    r1 = await store.commit(Txn().put("services/a", {"v": 1}))
    r2 = await store.commit(Txn().expect("services/a", r1).put("services/a", {"v": 2}))
    assert r2 > r1
    entry = await store.get("services/a")
    assert entry is not None and (entry.value, entry.mod_revision) == ({"v": 2}, r2)


async def test_stale_compare_raises_and_writes_nothing(store: SQLiteStore | EtcdStore) -> None:
    r1 = await store.commit(Txn().put("services/a", {"v": 1}).put("services/b", {"v": 1}))
    r2 = await store.commit(Txn().put("services/a", {"v": 2}))
    before = await snapshot_of(store)
    assert before[0] == r2

    stale = (
        Txn()
        .expect("services/b", r1)  # still current
        .expect("services/a", r1)  # stale: a was rewritten at r2
        .put("services/a", {"v": 3})
        .put("services/b", {"v": 3})
        .put("services/c", {"v": 3})
        .delete("services/b")
    )
    stale.put("services/d", {"v": 3})
    stale.delete("services/a")
    with pytest.raises(RevisionConflict, match="services/a"):
        await store.commit(stale)

    assert await snapshot_of(store) == before
    assert await store.revision() == r2
    assert await store.get("services/c") is None
    assert await store.get("services/d") is None
    # The store still works, and revisions go on increasing.
    assert await store.commit(Txn().put("services/c", {"v": 4})) > r2


async def test_compare_on_a_deleted_key(store: SQLiteStore | EtcdStore) -> None:
    r1 = await store.commit(Txn().put("services/a", {"v": 1}))
    await store.commit(Txn().expect("services/a", r1).delete("services/a"))
    with pytest.raises(RevisionConflict):
        await store.commit(Txn().expect("services/a", r1).put("services/a", {"v": 2}))
    await store.commit(Txn().expect("services/a", 0).put("services/a", {"v": 2}))


async def test_conflict_is_a_blue_green_conflict(store: SQLiteStore | EtcdStore) -> None:
    await store.commit(Txn().put("k", {}))
    with pytest.raises(BlueGreenError):
        await store.commit(Txn().expect("k", 0).put("k", {}))


async def test_empty_transaction_is_refused(store: SQLiteStore | EtcdStore) -> None:
    with pytest.raises(ValueError):
        await store.commit(Txn())
    assert await store.revision() == 0


# =============================================================================================
# Persistence


async def test_reopen_keeps_entries_and_revision(tmp_path: Path) -> None:
    path = tmp_path / "cp.db"
    first = await open_sqlite_store(path)
    await first.commit(Txn().put("services/a", VALUE))
    await first.commit(Txn().put("services/b", {"v": 2}).put("deployments/a/0000000001", {"id": "a-1"}))
    await first.commit(Txn().delete("services/b"))
    saved = await snapshot_of(first)
    await first.close()

    second = await open_sqlite_store(path)
    try:
        assert await snapshot_of(second) == saved
        assert await second.revision() == saved[0] == 3
        # A watch after restart starts from the persisted revision, and revisions continue.
        watcher = second.watch()
        assert await asyncio.wait_for(watcher.__anext__(), WAIT) == 3
        await watcher.aclose()
        assert await second.commit(Txn().put("services/c", {})) == 4
    finally:
        await second.close()


async def test_repository_state_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "cp.db"
    kv = await open_sqlite_store(path)
    repo = Repository(kv, clock=lambda: 1000.0)
    await repo.mutate("shop", lambda s, c, now: Change(apply_service_spec(s, "shop", {"prefix": "/shop"})), create=True)
    state = env("v1", "10.0.0.1:8080")
    await repo.mutate("shop", lambda s, c, now: set_environment(s, GREEN, state, c, now))  # type: ignore[arg-type]
    service = await repo.service("shop")
    records = await repo.deployments("shop")
    await kv.close()

    kv2 = await open_sqlite_store(path)
    try:
        repo2 = Repository(kv2)
        assert await repo2.service("shop") == service
        assert await repo2.deployments("shop") == records
        assert (await repo2.state()).services == (service,)
    finally:
        await kv2.close()


# =============================================================================================
# Watch


async def test_watch_yields_current_then_later_revisions(store: SQLiteStore | EtcdStore) -> None:
    r1 = await store.commit(Txn().put("a", {}))
    watcher = store.watch()
    try:
        assert await asyncio.wait_for(watcher.__anext__(), WAIT) == r1
        pending = asyncio.ensure_future(watcher.__anext__())
        await asyncio.sleep(0)  # let it start waiting (not a timing assumption: a yield to the loop)
        assert not pending.done()
        r2 = await store.commit(Txn().put("b", {}))
        assert await asyncio.wait_for(pending, WAIT) == r2
        r3 = await store.commit(Txn().put("c", {}))
        assert await asyncio.wait_for(watcher.__anext__(), WAIT) == r3
    finally:
        await watcher.aclose()


async def test_slow_watcher_sees_the_latest_revision(store: SQLiteStore | EtcdStore) -> None:
    watcher = store.watch()
    try:
        assert await asyncio.wait_for(watcher.__anext__(), WAIT) == 0
        for i in range(5):
            last = await store.commit(Txn().put(f"k{i}", {"i": i}))
        # Missed five commits: the next value is the latest revision, not r1 (etcd's watch may
        # hand over the intermediate ones first; it never goes past the latest).
        assert await asyncio.wait_for(wait_until(watcher, last), WAIT) == last
        pending = asyncio.ensure_future(watcher.__anext__())
        r6 = await store.commit(Txn().put("k6", {}))
        assert await asyncio.wait_for(pending, WAIT) == r6
    finally:
        await watcher.aclose()


async def test_watcher_never_goes_backwards(store: SQLiteStore | EtcdStore) -> None:
    watcher = store.watch()
    seen: list[int] = []

    async def consume() -> None:
        async for revision in watcher:
            seen.append(revision)

    task = asyncio.ensure_future(consume())
    # The watcher first reports where it starts (the empty store); only then do the writes race.
    await asyncio.wait_for(wait_for_seen(seen, 0), WAIT)
    revisions = await asyncio.gather(*(store.commit(Txn().put(f"k{i}", {"i": i})) for i in range(20)))
    last = max(revisions)
    await asyncio.wait_for(wait_for_seen(seen, last), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await watcher.aclose()
    assert seen[0] == 0 and seen[-1] == last
    assert all(a < b for a, b in zip(seen, seen[1:])), seen


async def test_several_watchers_all_wake(store: SQLiteStore | EtcdStore) -> None:
    watchers = [store.watch() for _ in range(3)]
    try:
        for w in watchers:
            assert await asyncio.wait_for(w.__anext__(), WAIT) == 0
        pending = [asyncio.ensure_future(w.__anext__()) for w in watchers]
        r = await store.commit(Txn().put("a", {}))
        assert await asyncio.wait_for(asyncio.gather(*pending), WAIT) == [r, r, r]
    finally:
        for w in watchers:
            await w.aclose()


async def test_close_ends_a_waiting_watch(tmp_path: Path) -> None:
    s = await open_sqlite_store(tmp_path / "w.db")
    watcher = s.watch()
    assert await asyncio.wait_for(watcher.__anext__(), WAIT) == 0
    pending = asyncio.ensure_future(watcher.__anext__())
    await asyncio.sleep(0)
    await s.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, WAIT)


# =============================================================================================
# StoreError


async def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    s = await open_sqlite_store(tmp_path / "closed.db")
    await s.commit(Txn().put("a", {}))
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreError):
        await s.get("a")
    with pytest.raises(StoreError):
        await s.list("")
    with pytest.raises(StoreError):
        await s.commit(Txn().put("b", {}))
    with pytest.raises(StoreError):
        await Repository(s).service("a")


async def test_unopenable_files_raise_store_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database" * 100)
    broken = SQLiteStore(garbage)
    with pytest.raises(StoreError, match="garbage.db"):
        await broken.open()
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(StoreError):
        await SQLiteStore(directory).open()


# =============================================================================================
# Repository


def env(version: str, *endpoints: str) -> EnvironmentState:
    return EnvironmentState(version, tuple(sorted(Endpoint.parse(e) for e in endpoints)))


def spec(body: dict[str, Any], name: str = "shop") -> Any:
    def mutation(service: Service | None, current: Any, now: float) -> Change:
        return Change(apply_service_spec(service, name, body))

    return mutation


async def test_mutate_creates_only_with_create(store: SQLiteStore | EtcdStore) -> None:
    repo = Repository(store, clock=lambda: 1000.0)
    with pytest.raises(NotFoundError, match="shop"):
        await repo.mutate("shop", spec({"drain_seconds": 5}))
    assert await store.revision() == 0
    with pytest.raises(NotFoundError):
        await repo.service("shop")

    committed = await repo.mutate("shop", spec({"drain_seconds": 5}), create=True)
    assert committed.revision > 0 and committed.accepted_at == 1000.0
    assert committed.revision == await store.revision()
    assert committed.change.service == Service(name="shop", drain_seconds=5)
    assert await repo.service("shop") == committed.change.service
    entry = await store.get(service_key("shop"))
    assert entry is not None and entry.value == service_to_dict(committed.change.service)

    # create=True on an existing service updates it.
    again = await repo.mutate("shop", spec({"prefix": "/x"}), create=True)
    assert again.change.service == Service(name="shop", drain_seconds=5, prefix="/x")


async def test_failing_mutation_writes_nothing(store: SQLiteStore | EtcdStore) -> None:
    repo = Repository(store)
    await repo.mutate("shop", spec({}), create=True)
    before = await snapshot_of(store)

    def boom(service: Service | None, current: Any, now: float) -> Change:
        raise ValidationError("nope")

    with pytest.raises(ValidationError, match="nope"):
        await repo.mutate("shop", boom)
    with pytest.raises(ValidationError):
        await repo.mutate("cart", boom, create=True)
    with pytest.raises(ValidationError):
        await repo.mutate("shop", spec({"drain_seconds": -1}))
    assert await snapshot_of(store) == before


async def test_mutate_writes_deployment_records(store: SQLiteStore | EtcdStore) -> None:
    repo = Repository(store, clock=lambda: 1000.0)
    await repo.mutate("shop", spec({}), create=True)
    await repo.mutate("shop", lambda s, c, now: set_environment(s, GREEN, env("v1", "10.0.0.1:80"), c, now))  # type: ignore[arg-type]
    await repo.mutate("shop", lambda s, c, now: set_environment(s, GREEN, env("v2", "10.0.0.2:80"), c, now))  # type: ignore[arg-type]
    records = await repo.deployments("shop")
    assert [(r.id, r.version, r.status) for r in records] == [
        ("shop-1", "v1", DeploymentStatus.DECOMMISSIONED),
        ("shop-2", "v2", DeploymentStatus.READY),
    ]
    assert (await store.get(deployment_key("shop", 2))) is not None
    current = await repo.current_deployments("shop")
    assert current[BLUE] is None
    assert current[GREEN] is not None and current[GREEN].id == "shop-2"
    switched = await repo.mutate("shop", lambda s, c, now: set_weights(s, full_weights(GREEN), c, now))  # type: ignore[arg-type]
    assert switched.change.service.traffic == Traffic(active=GREEN, previous=BLUE, blue=0, green=100)
    assert (await repo.current_deployments("shop"))[GREEN].status is DeploymentStatus.ACTIVE  # type: ignore[union-attr]


class GatedKV:
    """A replica's view of a shared store: its first commit waits until every replica has
    reached its own first commit, so all of them have read the same state before any writes."""

    def __init__(self, kv: SQLiteStore, barrier: asyncio.Barrier) -> None:
        self.kv = kv
        self.barrier = barrier
        self.gated = False
        self.conflicts = 0
        self.commits = 0

    async def get(self, key: str) -> Any:
        return await self.kv.get(key)

    async def list(self, prefix: str, *, unchanged: Any = None) -> Any:
        return await self.kv.list(prefix, unchanged=unchanged)

    async def revision(self) -> int:
        return await self.kv.revision()

    def watch(self) -> AsyncIterator[int]:
        return self.kv.watch()

    async def close(self) -> None:
        pass

    async def commit(self, txn: Txn) -> int:
        if not self.gated:
            self.gated = True
            await asyncio.wait_for(self.barrier.wait(), WAIT)
        try:
            revision = await self.kv.commit(txn)
        except RevisionConflict:
            self.conflicts += 1
            raise
        self.commits += 1
        return revision


async def test_two_replicas_mutating_concurrently_lose_no_update(store: SQLiteStore | EtcdStore) -> None:
    first = await Repository(store).mutate("shop", spec({}), create=True)
    barrier = asyncio.Barrier(2)
    kv_a, kv_b = GatedKV(store, barrier), GatedKV(store, barrier)
    replica_a, replica_b = Repository(kv_a), Repository(kv_b)  # type: ignore[arg-type]

    results = await asyncio.wait_for(
        asyncio.gather(
            replica_a.mutate("shop", spec({"drain_seconds": 7})),
            replica_b.mutate("shop", spec({"standby_seconds": 9})),
        ),
        WAIT,
    )
    service = await Repository(store).service("shop")
    assert (service.drain_seconds, service.standby_seconds) == (7, 9)
    # Exactly one of them lost the race, and retried on the fresh state.
    assert kv_a.conflicts + kv_b.conflicts == 1
    assert kv_a.commits == kv_b.commits == 1
    assert first.revision < min(r.revision for r in results) and len({r.revision for r in results}) == 2
    assert await store.revision() == max(r.revision for r in results)


async def test_many_concurrent_increments_across_replicas(store: SQLiteStore | EtcdStore) -> None:
    await Repository(store).mutate("shop", spec({"drain_seconds": 0}), create=True)
    replicas = [Repository(store) for _ in range(3)]

    def increment(service: Service | None, current: Any, now: float) -> Change:
        assert service is not None
        return Change(dataclasses.replace(service, drain_seconds=service.drain_seconds + 1))

    async def bump(repo: Repository, times: int) -> None:
        for _ in range(times):
            await repo.mutate("shop", increment)

    await asyncio.wait_for(asyncio.gather(*(bump(r, 5) for r in replicas)), WAIT * 2)
    assert (await replicas[0].service("shop")).drain_seconds == 15


async def test_current_deployments_picks_latest_live_record_per_environment(store: SQLiteStore | EtcdStore) -> None:
    def rec(service: str, seq: int, environment: Environment, status: DeploymentStatus) -> Deployment:
        return Deployment(f"{service}-{seq}", service, f"v{seq}", environment, status, deployed_at=float(seq))

    D = DeploymentStatus
    records = [
        rec("shop", 1, BLUE, D.DECOMMISSIONED),
        rec("shop", 2, GREEN, D.ROLLED_BACK),
        rec("shop", 9, BLUE, D.DECOMMISSIONED),
        rec("shop", 10, GREEN, D.ACTIVE),  # "0000000010" sorts after "0000000009"
        rec("shop", 11, BLUE, D.STANDBY),
        rec("shop", 12, GREEN, D.DECOMMISSIONED),
        rec("shop-x", 99, BLUE, D.ACTIVE),  # another service whose name extends this one
        rec("shopx", 99, GREEN, D.ACTIVE),
    ]
    txn = Txn()
    for r in records:
        txn.put(deployment_key(r.service, int(r.id.rsplit("-", 1)[1])), deployment_to_dict(r))
    await store.commit(txn)

    repo = Repository(store)
    assert [r.id for r in await repo.deployments("shop")] == ["shop-1", "shop-2", "shop-9", "shop-10", "shop-11", "shop-12"]
    current = await repo.current_deployments("shop")
    assert current[BLUE] is not None and current[BLUE].id == "shop-11"
    assert current[GREEN] is not None and current[GREEN].id == "shop-10"
    assert await repo.current_deployments("nobody") == {BLUE: None, GREEN: None}
    assert (await repo.current_deployments("shop-x"))[GREEN] is None

    # mutate hands the same view to the mutation function.
    await repo.mutate("shop", spec({}), create=True)
    seen: dict[Environment, Deployment | None] = {}

    def capture(service: Service | None, cur: Any, now: float) -> Change:
        seen.update(cur)
        assert service is not None
        return Change(service)

    await repo.mutate("shop", capture)
    assert seen == current

    # The commit reports the deployments it left: what current_deployments reads after it.
    def deploy_and_retire(service: Service | None, cur: Any, now: float) -> Change:
        assert service is not None
        retired = dataclasses.replace(cur[GREEN], status=D.DECOMMISSIONED)
        return Change(service, (rec("shop", 13, BLUE, D.READY), retired))

    committed = await repo.mutate("shop", deploy_and_retire)
    assert committed.deployments == await repo.current_deployments("shop")
    assert committed.deployments is not None
    assert committed.deployments[BLUE] is not None and committed.deployments[BLUE].id == "shop-13"
    green = committed.deployments[GREEN]
    assert green is not None and green.id == "shop-2"  # shop-10 retired: the older live record


# =============================================================================================
# Versions derived from state


def make_service(name: str = "shop", **changes: Any) -> Service:
    base = Service(
        name=name,
        domains=(f"{name}.example.com",),
        prefix="/",
        blue=env("v1", "10.0.0.1:8080", "10.0.0.2:8080"),
        green=env("v2", "10.0.1.1:8080"),
        traffic=Traffic(active=BLUE, previous=None, blue=90, green=10),
        deployment_seq=2,
    )
    return dataclasses.replace(base, **changes)


def raw_version(service: Service) -> str:
    """service_version without its cache, so equal inputs are really recomputed."""
    return service_version.__wrapped__(service)  # type: ignore[attr-defined]


async def test_service_version_is_a_function_of_state(store: SQLiteStore | EtcdStore) -> None:
    service = make_service()
    twin = make_service()
    assert twin == service and twin is not service
    assert service_version(service) == service_version(twin) == raw_version(service) == raw_version(twin)

    round_tripped = service_from_dict(json.loads(json.dumps(service_to_dict(service))))
    assert raw_version(round_tripped) == raw_version(service)

    # Through the real store.
    await Repository(store).mutate(
        "shop", lambda s, c, now: Change(service), create=True  # type: ignore[arg-type]
    )
    stored = await Repository(store).service("shop")
    assert stored == service
    assert raw_version(stored) == raw_version(service)


@pytest.mark.parametrize(
    "changes",
    [
        {"traffic": Traffic(active=BLUE, previous=None, blue=80, green=20)},
        {"traffic": Traffic(active=BLUE, previous=None, blue=100, green=0)},
        # Same weights, other stable side: the preview route goes to the other environment.
        {"traffic": Traffic(active=GREEN, previous=BLUE, blue=90, green=10)},
        {"blue": env("v1", "10.0.0.1:8080")},
        {"blue": env("v1", "10.0.0.1:8080", "10.0.0.2:8081")},
        {"green": env("v2", "[::1]:8080")},
        {"domains": ("shop.example.org",)},
        {"domains": ("shop.example.com", "www.example.com")},
        {"prefix": "/shop"},
    ],
    ids=["weights", "full", "active", "fewer-endpoints", "endpoint-port", "green-endpoints", "domain", "more-domains", "prefix"],
)
def test_service_version_changes_with_what_proxies_get(changes: dict[str, Any]) -> None:
    service = make_service()
    changed = dataclasses.replace(service, **changes)
    assert raw_version(changed) != raw_version(service)
    assert service_version(changed) != service_version(service)


def test_service_version_ignores_what_proxies_do_not_get() -> None:
    service = make_service()
    for changes in [
        {"deployment_seq": 7},  # bookkeeping only
        {"traffic": Traffic(active=BLUE, previous=GREEN, blue=90, green=10)},  # rollback target only
    ]:
        assert raw_version(dataclasses.replace(service, **changes)) == raw_version(service), changes


FLEETS = (
    DEFAULT_FLEET,
    Fleet(
        name="edge",
        listeners=(ListenerSpec(name="edge-http", address="0.0.0.0", port=8080, preview_port=None),),
        services=("shop",),
    ),
)
TYPES = typeurls.PUSH_ORDER


def versions(snapshots: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(fleet, t): snap.version(t) for fleet, snap in snapshots.items() for t in TYPES}


def two_services(**shop_changes: Any) -> tuple[Service, ...]:
    return (make_service("shop", **shop_changes), make_service("cart", prefix="/cart"))


def test_two_replicas_build_identical_versions() -> None:
    a = SnapshotBuilder(FLEETS).build(5, two_services(), {})
    b = SnapshotBuilder(FLEETS).build(5, two_services(), {})
    assert set(a) == set(b) == {"default", "edge"}
    assert versions(a) == versions(b)
    for fleet in a:
        a[fleet].check_consistent()
        assert a[fleet].generation == 5
        for t in TYPES:
            assert {n: r.version for n, r in a[fleet].of_type(t).items()} == {n: r.version for n, r in b[fleet].of_type(t).items()}
    assert set(a["edge"].of_type(typeurls.CLUSTER)) == {"shop-blue", "shop-green"}
    assert set(a["default"].of_type(typeurls.CLUSTER)) == {"shop-blue", "shop-green", "cart-blue", "cart-green"}
    # Different generation, same content: same versions.
    assert versions(SnapshotBuilder(FLEETS).build(99, two_services(), {})) == versions(a)


def test_weight_change_changes_only_route_versions() -> None:
    before = versions(SnapshotBuilder(FLEETS).build(1, two_services(), {}))
    after = versions(
        SnapshotBuilder(FLEETS).build(2, two_services(traffic=Traffic(active=BLUE, previous=None, blue=50, green=50)), {})
    )
    for fleet in ("default", "edge"):
        assert after[(fleet, typeurls.ROUTE)] != before[(fleet, typeurls.ROUTE)]
        for t in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER):
            assert after[(fleet, t)] == before[(fleet, t)]


def test_previous_snapshot_pools_are_reused_when_unchanged() -> None:
    builder = SnapshotBuilder(FLEETS)
    old = builder.build(1, two_services(), {})

    same = builder.build(2, two_services(), old)
    for fleet in old:
        assert same[fleet].generation == 2
        for t in TYPES:
            assert same[fleet].resources[t] is old[fleet].resources[t]

    weights = builder.build(3, two_services(traffic=Traffic(active=BLUE, previous=None, blue=0, green=100)), same)
    for fleet in old:
        assert weights[fleet].resources[typeurls.ROUTE] is not same[fleet].resources[typeurls.ROUTE]
        for t in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER):
            assert weights[fleet].resources[t] is same[fleet].resources[t]

    # Scaling green changes only endpoints: clusters, listeners and routes stay the same objects.
    scaled = builder.build(
        4,
        two_services(traffic=Traffic(active=BLUE, previous=None, blue=0, green=100), green=env("v2", "10.0.1.1:8080", "10.0.1.2:8080")),
        weights,
    )
    for fleet in old:
        assert scaled[fleet].resources[typeurls.ENDPOINT] is not weights[fleet].resources[typeurls.ENDPOINT]
        for t in (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE):
            assert scaled[fleet].resources[t] is weights[fleet].resources[t]

    # A change to a service a fleet does not serve leaves that fleet's pools all identical.
    shop = two_services(traffic=Traffic(active=BLUE, previous=None, blue=0, green=100), green=env("v2", "10.0.1.1:8080", "10.0.1.2:8080"))[0]
    cart = make_service("cart", prefix="/cart", traffic=Traffic(active=BLUE, previous=None, blue=50, green=50))
    cart_moved = builder.build(5, (shop, cart), scaled)
    for t in TYPES:
        assert cart_moved["edge"].resources[t] is scaled["edge"].resources[t]
    assert cart_moved["default"].resources[typeurls.ROUTE] is not scaled["default"].resources[typeurls.ROUTE]
