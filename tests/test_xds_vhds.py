"""Virtual hosts over VHDS in the pure layers: the snapshot's Delta variant, namespaced names,
and the Delta state machine's rules for the VirtualHost type (make-before-break, all changes
of a snapshot in one response). Real-Envoy behaviour is in test_route_split_envoy.py."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_components_pb2, route_pb2

from controlplane.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST, namespace_of
from controlplane.xds.snapshot import Resource, Snapshot
from controlplane.xds.stream import DeltaStream, SotwStream
from tests.test_xds_protocol import NOW, cla, cluster, ddecode, delta_req, dnames, listener, sotw_req

DOMAINS = ("a.example", "b.example")


def vhost(config: str, domain: str, cluster_name: str, tag: str = "") -> Resource:
    name = f"{config}/{domain}"
    route = route_components_pb2.Route(name=cluster_name + tag, match=route_components_pb2.RouteMatch(prefix="/"),
                                       route=route_components_pb2.RouteAction(cluster=cluster_name))
    msg = route_components_pb2.VirtualHost(name=name, domains=[domain], routes=[route])
    return Resource.from_message(name, msg, requires=[(CLUSTER, cluster_name), (ENDPOINT, cluster_name)])


def vhds_snapshot(gen: int, hosts: dict[str, tuple[str, str]], clusters: list[str] | None = None) -> Snapshot:
    """Clusters (default: those the hosts route to), a listener, a whole route table ``rt``
    for SotW, and for Delta the VHDS route table ``rt`` plus one virtual host per domain.
    ``hosts``: domain -> (cluster, tag)."""
    clusters = clusters if clusters is not None else sorted({c for c, _ in hosts.values()})
    shared = [cluster(c) for c in clusters] + [cla(c) for c in clusters] + [listener()]
    whole = route_pb2.RouteConfiguration(name="rt", virtual_hosts=[
        route_components_pb2.VirtualHost(name=d, domains=[d]) for d in hosts])
    requires = [(t, c) for c, _ in hosts.values() for t in (CLUSTER, ENDPOINT)]
    sotw = Snapshot.build(gen, shared + [Resource.from_message("rt", whole, requires=requires)])
    vhds = Resource.from_message("rt", route_pb2.RouteConfiguration(name="rt", vhds=route_pb2.Vhds()),
                                 warms_with=[(VIRTUAL_HOST, "rt")])
    delta = Snapshot.build(gen, shared + [vhds] + [vhost("rt", d, c, tag) for d, (c, tag) in hosts.items()])
    return sotw.with_delta(delta)


BASE = {"a.example": ("a", ""), "b.example": ("b", "")}


def vhds_connected(snap: Snapshot) -> DeltaStream:
    """A Delta proxy that subscribed the way Envoy 1.40 does (VHDS: a first request naming
    nothing) and ACKed everything."""
    stream = DeltaStream(1, "node", "fleet", snap, NOW)
    view = snap.for_delta()
    for type_url, subscribe in ((CLUSTER, []), (ENDPOINT, sorted(view.of_type(ENDPOINT))), (LISTENER, []), (ROUTE, ["rt"]),
                                (VIRTUAL_HOST, [])):
        [resp] = ddecode(stream.on_request(delta_req(type_url, subscribe=subscribe), NOW))
        assert ddecode(stream.on_request(delta_req(type_url, nonce=resp.nonce), NOW)) == []
    assert stream.converged()
    return stream


def test_delta_streams_serve_the_delta_variant_and_sotw_streams_the_whole_table() -> None:
    snap = vhds_snapshot(1, BASE)
    delta = DeltaStream(1, "node", "fleet", snap, NOW)
    [rds] = ddecode(delta.on_request(delta_req(ROUTE, subscribe=["rt"]), NOW))
    config = route_pb2.RouteConfiguration()
    rds.resources[0].resource.Unpack(config)
    assert config.HasField("vhds") and not config.virtual_hosts
    sotw = SotwStream(2, "node", "fleet", snap, NOW)
    assert sotw.snapshot is snap and delta.snapshot is snap.for_delta()
    sotw.on_request(sotw_req(ROUTE, names=["rt"]), NOW)
    assert sotw.on_snapshot(snap) == []  # the whole table waits for its clusters; no VHDS
    assert sotw._desired(sotw.types[ROUTE])["rt"].version == snap.of_type(ROUTE)["rt"].version
    assert snap.of_type(ROUTE)["rt"].version != snap.for_delta().of_type(ROUTE)["rt"].version


def test_first_vhds_request_naming_nothing_gets_every_virtual_host_once_their_clusters_are_acked() -> None:
    stream = vhds_connected(vhds_snapshot(1, BASE))
    held = stream.types[VIRTUAL_HOST].acked
    assert sorted(held) == ["rt/a.example", "rt/b.example"]


def test_a_weight_change_sends_only_its_virtual_host() -> None:
    stream = vhds_connected(vhds_snapshot(1, BASE))
    out = ddecode(stream.on_snapshot(vhds_snapshot(2, {**BASE, "a.example": ("a", "new")})))
    assert [(r.type_url, dnames(r), list(r.removed_resources)) for r in out] == [(VIRTUAL_HOST, ["rt/a.example"], [])]
    stream.on_request(delta_req(VIRTUAL_HOST, nonce=out[0].nonce), NOW)
    assert stream.converged()


def test_two_virtual_hosts_changed_in_one_snapshot_go_in_one_response() -> None:
    stream = vhds_connected(vhds_snapshot(1, BASE))
    out = ddecode(stream.on_snapshot(vhds_snapshot(2, {"a.example": ("a", "x"), "b.example": ("b", "x")})))
    assert [(r.type_url, dnames(r)) for r in out] == [(VIRTUAL_HOST, ["rt/a.example", "rt/b.example"])]


def test_when_one_changed_virtual_host_waits_for_its_cluster_the_others_wait_too() -> None:
    """A release group: a.example moves to a cluster the proxy does not have yet, b.example only
    changes. Sending b's change first would let the proxy route b new and a old."""
    stream = vhds_connected(vhds_snapshot(1, BASE))
    out = ddecode(stream.on_snapshot(vhds_snapshot(2, {"a.example": ("c", ""), "b.example": ("b", "x")}, clusters=["a", "b", "c"])))
    assert [r.type_url for r in out] == [CLUSTER]  # no VirtualHost response yet, not even b's
    assert ddecode(stream.on_request(delta_req(CLUSTER, nonce=out[0].nonce), NOW)) == []
    [eds] = ddecode(stream.on_request(delta_req(ENDPOINT, subscribe=["c"]), NOW))
    [vhds] = ddecode(stream.on_request(delta_req(ENDPOINT, nonce=eds.nonce), NOW))
    assert (vhds.type_url, dnames(vhds)) == (VIRTUAL_HOST, ["rt/a.example", "rt/b.example"])


def test_a_rejected_virtual_host_does_not_hold_the_others_back_for_good() -> None:
    stream = vhds_connected(vhds_snapshot(1, BASE))
    [first] = ddecode(stream.on_snapshot(vhds_snapshot(2, {**BASE, "a.example": ("a", "bad")})))
    stream.on_request(delta_req(VIRTUAL_HOST, nonce=first.nonce, error="rt/a.example: invalid"), NOW)
    out = ddecode(stream.on_snapshot(vhds_snapshot(3, {"a.example": ("a", "bad"), "b.example": ("b", "x")})))
    assert [(r.type_url, dnames(r)) for r in out] == [(VIRTUAL_HOST, ["rt/b.example"])]


def test_a_cluster_stays_until_no_virtual_host_the_proxy_holds_routes_to_it() -> None:
    stream = vhds_connected(vhds_snapshot(1, {"a.example": ("a", ""), "b.example": ("c", "")}))
    out = ddecode(stream.on_snapshot(vhds_snapshot(2, {"a.example": ("a", ""), "b.example": ("a", "")})))
    assert [(r.type_url, dnames(r), list(r.removed_resources)) for r in out] == [(VIRTUAL_HOST, ["rt/b.example"], [])]
    after = ddecode(stream.on_request(delta_req(VIRTUAL_HOST, nonce=out[0].nonce), NOW))
    assert [(r.type_url, list(r.removed_resources)) for r in after] == [(CLUSTER, ["c"]), (ENDPOINT, ["c"])]


def test_a_removed_domain_is_removed_by_its_resource_name() -> None:
    stream = vhds_connected(vhds_snapshot(1, BASE))
    [out] = ddecode(stream.on_snapshot(vhds_snapshot(2, {"a.example": ("a", "")}, clusters=["a", "b"])))
    assert (out.type_url, dnames(out), list(out.removed_resources)) == (VIRTUAL_HOST, [], ["rt/b.example"])


def test_a_subscription_naming_a_namespace_covers_its_virtual_hosts() -> None:
    snap = vhds_snapshot(1, BASE)
    stream = vhds_connected(snap)
    other = DeltaStream(2, "node", "fleet", snap, NOW)
    for type_url, subscribe in ((CLUSTER, []), (ENDPOINT, ["a", "b"])):
        [resp] = ddecode(other.on_request(delta_req(type_url, subscribe=subscribe), NOW))
        other.on_request(delta_req(type_url, nonce=resp.nonce), NOW)
    [resp] = ddecode(other.on_request(delta_req(VIRTUAL_HOST, subscribe=["rt"]), NOW))
    assert dnames(resp) == ["rt/a.example", "rt/b.example"] and not resp.removed_resources
    other.on_request(delta_req(VIRTUAL_HOST, nonce=resp.nonce), NOW)
    assert ddecode(other.on_request(delta_req(VIRTUAL_HOST, unsubscribe=["rt"]), NOW)) == []
    assert other.types[VIRTUAL_HOST].acked == {}
    assert stream.types[VIRTUAL_HOST].wildcard


def test_an_empty_namespace_is_answered_so_envoy_can_finish_warming() -> None:
    snap = vhds_snapshot(1, {})
    stream = DeltaStream(1, "node", "fleet", snap, NOW)
    [resp] = ddecode(stream.on_request(delta_req(VIRTUAL_HOST, subscribe=["rt"]), NOW))
    assert list(resp.removed_resources) == ["rt"] and not resp.resources


def test_a_reconnecting_proxy_holding_current_virtual_hosts_gets_none_again() -> None:
    snap = vhds_snapshot(1, BASE)
    view = snap.for_delta()
    stream = DeltaStream(2, "node", "fleet", snap, NOW)
    for type_url, subscribe in ((CLUSTER, []), (ENDPOINT, ["a", "b"]), (LISTENER, []), (ROUTE, ["rt"]), (VIRTUAL_HOST, [])):
        held = {n: r.version for n, r in view.of_type(type_url).items()}
        assert stream.on_request(delta_req(type_url, subscribe=subscribe, initial=held), NOW) == []
    assert stream.converged()


def test_convergence_waits_for_the_vhds_subscription() -> None:
    snap = vhds_snapshot(1, BASE)
    stream = DeltaStream(1, "node", "fleet", snap, NOW)
    for type_url, subscribe in ((CLUSTER, []), (ENDPOINT, ["a", "b"]), (LISTENER, []), (ROUTE, ["rt"])):
        [resp] = ddecode(stream.on_request(delta_req(type_url, subscribe=subscribe), NOW))
        stream.on_request(delta_req(type_url, nonce=resp.nonce), NOW)
    assert not stream.converged()  # the route table has no virtual hosts yet


def test_snapshot_generation_change_keeps_unchanged_delta_pools_identical() -> None:
    one = vhds_snapshot(1, BASE)
    two = vhds_snapshot(2, {**BASE, "a.example": ("a", "x")}).with_generation(2, one)
    assert two.for_delta().of_type(CLUSTER) is one.for_delta().of_type(CLUSTER)
    assert two.for_delta().of_type(VIRTUAL_HOST) is not one.for_delta().of_type(VIRTUAL_HOST)
    assert two.for_delta().generation == 2
    assert two.of_type(CLUSTER) is two.for_delta().of_type(CLUSTER)  # shared, not held twice


def test_select_and_covers_understand_namespaces() -> None:
    view = vhds_snapshot(1, BASE).for_delta()
    assert sorted(view.select(VIRTUAL_HOST, frozenset({"rt"}))) == ["rt/a.example", "rt/b.example"]
    assert sorted(view.select(VIRTUAL_HOST, frozenset({"rt/b.example"}))) == ["rt/b.example"]
    assert view.select(CLUSTER, frozenset({"rt"})) == {}
    assert view.covers(VIRTUAL_HOST, "rt") and not view.covers(VIRTUAL_HOST, "other")
    assert not view.covers(CLUSTER, "rt")
    assert namespace_of("default-routes/*") == "default-routes"


def test_a_weight_change_is_planned_from_the_snapshots_shared_diff_not_per_stream_over_every_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """With thousands of virtual hosts, planning the whole pool per stream cost ~2 ms per stream
    per change at 1,000 services; a held-in-sync wildcard subscriber needs only what changed."""
    hosts = {f"d{i}.example": ("a", "") for i in range(50)}
    one = vhds_snapshot(1, hosts, clusters=["a"])
    streams = [vhds_connected(one) for _ in range(3)]
    two = vhds_snapshot(2, {**hosts, "d7.example": ("a", "x")}, clusters=["a"]).with_generation(2, one)

    def no_full_plan(*args: object) -> None:
        raise AssertionError("planned the whole pool")

    monkeypatch.setattr(DeltaStream, "_plan", no_full_plan)
    for stream in streams:
        [out] = ddecode(stream.on_snapshot(two))
        assert (out.type_url, dnames(out), list(out.removed_resources)) == (VIRTUAL_HOST, ["rt/d7.example"], [])
        stream.on_request(delta_req(VIRTUAL_HOST, nonce=out.nonce), NOW)
        assert stream.converged()
    view = two.for_delta()
    assert len(view._diffs) == 1  # one diff, shared by the three streams


def test_a_first_delta_request_holding_nothing_is_answered_even_with_nothing_to_send() -> None:
    """Envoy finishes warming a subscription only on a first response (else after its initial
    fetch timeout, 15 s): an empty CDS is answered with an empty response."""
    stream = DeltaStream(1, "node", "fleet", Snapshot.build(1, []), NOW)
    [resp] = ddecode(stream.on_request(delta_req(CLUSTER), NOW))
    assert (list(resp.resources), list(resp.removed_resources)) == ([], [])
    assert ddecode(stream.on_request(delta_req(CLUSTER, nonce=resp.nonce), NOW)) == []
    assert stream.converged()


# ---------------------------------------------------------------------------------------------
# Property: any sequence of snapshots, a Delta proxy that ACKs everything.

from hypothesis import given, settings, strategies as st  # noqa: E402

CLUSTERS = ("a", "b", "c")
host_maps = st.dictionaries(st.sampled_from([f"d{i}.example" for i in range(6)]),
                            st.tuples(st.sampled_from(CLUSTERS), st.sampled_from(["", "x", "y"])), max_size=6)


def follow(stream: DeltaStream, snap: Snapshot, *, fast: bool) -> list[tuple[str, list[str], list[str]]]:
    """Deliver ``snap`` and ACK every response as Envoy would (subscribing to the endpoints of
    new clusters); return what was sent, and check make-before-break after each response."""
    if not fast:
        stream._changed_only = lambda state, pool: None  # type: ignore[method-assign]
    sent: list[tuple[str, list[str], list[str]]] = []
    queue = list(stream.on_snapshot(snap))
    for _ in range(100):
        if not queue:
            return sent
        out = queue.pop(0)
        [resp] = ddecode([out])
        sent.append((resp.type_url, dnames(resp), sorted(resp.removed_resources)))
        queue += stream.on_request(delta_req(out.type_url, nonce=out.nonce), NOW)
        if out.type_url == CLUSTER:
            missing = sorted(set(stream.types[CLUSTER].acked) - stream.types[ENDPOINT].names)
            if missing:
                queue += stream.on_request(delta_req(ENDPOINT, subscribe=missing), NOW)
        for host in stream.types[VIRTUAL_HOST].acked.values():
            assert host is not None
            for type_url, name in host.requires:
                assert name in stream.types[type_url].acked, f"{host.name} held before its {name}"
    raise AssertionError("did not settle")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(host_maps, st.sets(st.sampled_from(CLUSTERS))), min_size=1, max_size=6))
def test_any_sequence_of_snapshots_keeps_make_before_break_and_one_vhds_response_per_snapshot(
        sequence: list[tuple[dict, set]]) -> None:
    first = vhds_snapshot(1, BASE)
    fast, full = vhds_connected(first), vhds_connected(first)
    previous = first
    for generation, (hosts, extra) in enumerate(sequence, start=2):
        clusters = sorted({c for c, _ in hosts.values()} | extra)  # clusters come and go
        snap = vhds_snapshot(generation, hosts, clusters=clusters).with_generation(generation, previous)
        sent = follow(fast, snap, fast=True)
        assert sent == follow(full, snap, fast=False)  # the diff-based plan is the full plan
        assert len([s for s in sent if s[0] == VIRTUAL_HOST]) <= 1
        assert fast.converged()
        assert dict(fast.types[VIRTUAL_HOST].acked) == dict(snap.for_delta().of_type(VIRTUAL_HOST))
        previous = snap
