"""xDS workers without processes: snapshot shipping (ipc.diff / ipc.apply), the caps each worker
enforces, the xds.workers key and the --xds-workers option."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from controlplane import typeurls
from controlplane.config import Settings, XdsSettings, parse_settings
from controlplane.errors import ConfigError
from controlplane.serve import ServeOptions, check_options
from controlplane.workers import ipc
from controlplane.workers.serving import default_workers, worker_limits
from controlplane.xds.snapshot import Resource, Snapshot


def cluster(name: str, timeout: int = 1) -> Resource:
    message = cluster_pb2.Cluster(name=name)
    message.connect_timeout.seconds = timeout
    return Resource.from_message(name, message)


def route(name: str, prefix: str) -> Resource:
    return Resource.from_message(name, route_pb2.RouteConfiguration(name=name, virtual_hosts=[{"name": prefix, "domains": [prefix]}]),
                                 requires=[(typeurls.CLUSTER, "a")])


def shipped(previous: Snapshot | None, current: Snapshot) -> Snapshot:
    """What a worker holding ``previous`` builds from the frame the main process sends."""
    frame = ipc.encode(("snapshots", {"f": ipc.FleetShipment(current.generation, 1.0, True, ipc.diff(previous, current),
                                                                    ipc.diff_delta(previous, current))}))
    kind, shipments = pickle.loads(frame[4:])
    return ipc.apply(previous, shipments["f"])


def same(a: Snapshot, b: Snapshot) -> None:
    assert a.generation == b.generation
    assert list(a.resources) == list(b.resources)
    for type_url in a.resources:
        assert list(a.resources[type_url]) == list(b.resources[type_url]), type_url  # same names, same order
        assert list(a.resources[type_url].values()) == list(b.resources[type_url].values()), type_url


def test_a_full_shipment_rebuilds_the_snapshot() -> None:
    current = Snapshot.build(3, [cluster("b"), cluster("a"), route("r", "x")])
    same(shipped(None, current), current)


def test_a_change_ships_only_what_changed_and_keeps_unchanged_pools() -> None:
    before = Snapshot.build(3, [cluster("a"), cluster("b"), cluster("c"), route("r", "x")])
    after = Snapshot.build(4, [cluster("a"), cluster("b", timeout=2), cluster("d"), route("r", "x")]).with_generation(4, before)
    changes = ipc.diff(before, after)
    upserts, removed = changes[typeurls.CLUSTER]  # type: ignore[misc]
    assert [ipc.unpack(p).name for p in upserts] == ["b", "d"] and removed == ("c",)
    assert changes[typeurls.ROUTE] is None  # unchanged: nothing shipped
    worker = shipped(before, after)
    same(worker, after)
    # The worker keeps its unchanged pool as the same object: streams skip an unchanged type by identity.
    assert worker.resources[typeurls.ROUTE] is before.resources[typeurls.ROUTE]


def test_a_generation_only_change_ships_no_resource() -> None:
    before = Snapshot.build(3, [cluster("a"), route("r", "x")])
    after = Snapshot.build(5, [cluster("a"), route("r", "x")]).with_generation(5, before)
    assert all(change is None for change in ipc.diff(before, after).values())
    worker = shipped(before, after)
    assert worker.generation == 5 and all(worker.resources[t] is before.resources[t] for t in before.resources)


def test_the_delta_variant_is_shipped_and_shares_the_sotw_pools() -> None:
    """With the route split (docs/route-tables.md) a snapshot carries a Delta variant: workers
    must serve it to Delta streams, and a pool both variants share is shipped once."""
    def variant(generation: int, host: str, timeout: int = 1) -> Snapshot:
        sotw = Snapshot.build(generation, [cluster("a", timeout), route("r", "x")])
        return sotw.with_delta(Snapshot.build(generation, [cluster("a", timeout), route("r", host)]))

    before = variant(3, "one")
    worker = shipped(None, before)
    assert worker.delta is not None
    same(worker, before)
    same(worker.delta, before.delta)  # type: ignore[arg-type]
    assert worker.delta.resources[typeurls.CLUSTER] is worker.resources[typeurls.CLUSTER]
    after = variant(4, "two", timeout=2).with_generation(4, before)
    changes = ipc.diff_delta(before, after)
    assert changes is not None and changes[typeurls.CLUSTER] == ipc.SAME_AS_SOTW  # shipped once, with the SotW pools
    updated = shipped(worker, after)
    same(updated.delta, after.delta)  # type: ignore[arg-type]
    assert ipc.diff_delta(before, Snapshot.build(5, [cluster("a")])) is None  # no Delta variant: nothing shipped


def test_each_worker_gets_a_share_of_max_streams_and_the_whole_per_identity_cap() -> None:
    settings = Settings(xds=XdsSettings(max_streams=100, max_streams_per_identity=8))
    assert worker_limits(settings, 3).max_streams == 34 and worker_limits(settings, 3).max_streams_per_identity == 8
    assert worker_limits(Settings(xds=XdsSettings(max_streams=None)), 4).max_streams is None


def test_xds_workers_key_and_option(tmp_path: Path) -> None:
    assert parse_settings({"xds": {"workers": 3}}).xds.workers == 3
    assert parse_settings({"xds": {"workers": None}}).xds.workers is None
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ConfigError, match=r"xds\.workers: expected an integer of at least 1"):
            parse_settings({"xds": {"workers": bad}})
    assert ServeOptions(Settings(), tmp_path / "s.db").workers == default_workers() >= 1
    assert ServeOptions(parse_settings({"xds": {"workers": 3}}), tmp_path / "s.db").workers == 3
    assert ServeOptions(parse_settings({"xds": {"workers": 3}}), tmp_path / "s.db", xds_workers=1).workers == 1  # the flag wins
    with pytest.raises(ConfigError, match="--xds-workers must be at least 1, got 0"):
        check_options(ServeOptions(Settings(), tmp_path / "s.db", xds_workers=0))
