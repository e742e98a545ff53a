"""Protocol rules of the ADS stream state machines, without Envoy.

Each test plays the proxy: it sends DiscoveryRequests / DeltaDiscoveryRequests and decodes the
bytes the stream returns. Real-Envoy behaviour is covered in test_envoy.py.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import duration_pb2
from google.rpc import status_pb2

from controlplane.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.xds.snapshot import Resource, Snapshot, content_version
from controlplane.xds.stream import DeltaStream, Outgoing, SotwStream

NOW = 1_000_000.0


# ---------------------------------------------------------------------------------------------
# Building snapshots: clusters with endpoints, one listener, one route table naming clusters.


def cluster(name: str, timeout: int = 1) -> Resource:
    msg = cluster_pb2.Cluster(name=name, connect_timeout=duration_pb2.Duration(seconds=timeout))
    return Resource.from_message(name, msg, warms_with=[(ENDPOINT, name)])


def cla(name: str, tag: str = "") -> Resource:
    return Resource.from_message(name, endpoint_pb2.ClusterLoadAssignment(cluster_name=name + tag))


def routes(name: str, clusters: list[str], tag: str = "") -> Resource:
    # Like a real route table, the content names the clusters it routes to.
    msg = route_pb2.RouteConfiguration(name=name + tag, virtual_hosts=[
        route_components_pb2.VirtualHost(name=c, domains=[c]) for c in clusters])
    requires = [(t, c) for c in clusters for t in (CLUSTER, ENDPOINT)]
    return Resource.from_message(name, msg, requires=requires)


def listener(name: str = "http", route_name: str = "rt") -> Resource:
    return Resource.from_message(name, listener_pb2.Listener(name=name), warms_with=[(ROUTE, route_name)])


def snapshot(gen: int, clusters: list[str], *, route_tag: str = "", cluster_timeouts: dict[str, int] | None = None,
             cla_tags: dict[str, str] | None = None, routed: list[str] | None = None) -> Snapshot:
    timeouts = cluster_timeouts or {}
    tags = cla_tags or {}
    res = [cluster(c, timeouts.get(c, 1)) for c in clusters] + [cla(c, tags.get(c, "")) for c in clusters]
    res += [listener(), routes("rt", routed if routed is not None else clusters, route_tag)]
    return Snapshot.build(gen, res)


# ---------------------------------------------------------------------------------------------
# Playing the proxy


def sotw_req(type_url: str, *, names: list[str] = (), version: str = "", nonce: str = "", error: str | None = None) -> discovery_pb2.DiscoveryRequest:  # type: ignore[assignment]
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce)
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def decode(out: Outgoing) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(out.payload)


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    classes = {CLUSTER: cluster_pb2.Cluster, ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
               LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration}
    out = []
    for any_msg in response.resources:
        msg = classes[response.type_url]()
        any_msg.Unpack(msg)
        out.append(msg.cluster_name if response.type_url == ENDPOINT else msg.name)  # type: ignore[attr-defined]
    return sorted(out)


class SotwProxy:
    """Tracks the latest response per type like Envoy does, and ACKs or NACKs it."""

    def __init__(self, stream: SotwStream) -> None:
        self.stream = stream
        self.latest: dict[str, discovery_pb2.DiscoveryResponse] = {}
        self.accepted: dict[str, str] = {}
        self.names: dict[str, list[str]] = {}

    def feed(self, outs: list[Outgoing]) -> list[discovery_pb2.DiscoveryResponse]:
        decoded = [decode(o) for o in outs]
        for r in decoded:
            self.latest[r.type_url] = r
        return decoded

    def subscribe(self, type_url: str, names: list[str] = ()) -> list[discovery_pb2.DiscoveryResponse]:  # type: ignore[assignment]
        self.names[type_url] = list(names)
        nonce = self.latest[type_url].nonce if type_url in self.latest else ""
        return self.feed(self.stream.on_request(
            sotw_req(type_url, names=self.names[type_url], version=self.accepted.get(type_url, ""), nonce=nonce), NOW))

    def ack(self, type_url: str) -> list[discovery_pb2.DiscoveryResponse]:
        r = self.latest[type_url]
        self.accepted[type_url] = r.version_info
        return self.feed(self.stream.on_request(
            sotw_req(type_url, names=self.names.get(type_url, []), version=r.version_info, nonce=r.nonce), NOW))

    def nack(self, type_url: str, message: str = "rejected") -> list[discovery_pb2.DiscoveryResponse]:
        r = self.latest[type_url]
        return self.feed(self.stream.on_request(
            sotw_req(type_url, names=self.names.get(type_url, []), version=self.accepted.get(type_url, ""), nonce=r.nonce, error=message), NOW))

    def push(self, snap: Snapshot) -> list[discovery_pb2.DiscoveryResponse]:
        return self.feed(self.stream.on_snapshot(snap))

    def settle(self, max_rounds: int = 20) -> None:
        """ACK everything in flight and follow subscriptions, as Envoy would, until quiet."""
        for _ in range(max_rounds):
            progressed = False
            for type_url in list(self.latest):
                state = self.stream.types[type_url]
                if state.pending_nonce == self.latest[type_url].nonce:
                    self.ack(type_url)
                    progressed = True
            if not progressed:
                return
        raise AssertionError("did not settle")


def connected_proxy(snap: Snapshot) -> SotwProxy:
    """A proxy that subscribed to everything and ACKed it."""
    proxy = SotwProxy(SotwStream(1, "node", "fleet", snap, NOW))
    proxy.subscribe(CLUSTER)
    proxy.ack(CLUSTER)
    proxy.subscribe(ENDPOINT, sorted(snap.of_type(ENDPOINT)))
    proxy.ack(ENDPOINT)
    proxy.subscribe(LISTENER)
    proxy.ack(LISTENER)
    proxy.subscribe(ROUTE, ["rt"])
    proxy.ack(ROUTE)
    assert proxy.stream.converged()
    return proxy


# ---------------------------------------------------------------------------------------------
# SotW


def test_first_request_is_answered_with_the_full_set_and_a_plain_ack_is_not() -> None:
    snap = snapshot(1, ["a", "b"])
    proxy = SotwProxy(SotwStream(1, "node", "fleet", snap, NOW))
    [response] = proxy.subscribe(CLUSTER)
    assert names_of(response) == ["a", "b"]
    assert response.version_info == snap.version(CLUSTER)
    assert response.nonce
    assert proxy.ack(CLUSTER) == []
    assert proxy.stream.types[CLUSTER].acked_version == snap.version(CLUSTER)


def test_version_is_the_content_hash_and_reconnecting_proxy_with_current_content_gets_nothing() -> None:
    snap = snapshot(7, ["a"])
    first = connected_proxy(snap)
    versions = {t: first.accepted[t] for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
    # A new stream (control plane restarted, same stored state -> same versions).
    again = SotwProxy(SotwStream(2, "node", "fleet", snapshot(7, ["a"]), NOW))
    again.accepted = dict(versions)
    assert again.subscribe(CLUSTER) == []
    assert again.subscribe(ENDPOINT, ["a"]) == []
    assert again.subscribe(LISTENER) == []
    assert again.subscribe(ROUTE, ["rt"]) == []
    assert again.stream.converged()


def test_reconnecting_proxy_with_other_content_is_answered() -> None:
    again = SotwProxy(SotwStream(2, "node", "fleet", snapshot(7, ["a"]), NOW))
    again.accepted = {CLUSTER: "some-old-version"}
    [response] = again.subscribe(CLUSTER)
    assert names_of(response) == ["a"]


def test_stale_nonce_is_ignored() -> None:
    proxy = connected_proxy(snapshot(1, ["a"]))
    old_nonce = proxy.latest[CLUSTER].nonce
    [cds] = proxy.push(snapshot(2, ["a"], cluster_timeouts={"a": 5}))
    assert cds.type_url == CLUSTER and cds.nonce != old_nonce
    before = (proxy.stream.types[CLUSTER].pending_nonce, proxy.stream.types[CLUSTER].acked_version)
    stale = sotw_req(CLUSTER, version=proxy.accepted[CLUSTER], nonce=old_nonce, error="late NACK of an old response")
    assert proxy.stream.on_request(stale, NOW) == []
    state = proxy.stream.types[CLUSTER]
    assert (state.pending_nonce, state.acked_version) == before
    assert state.nacks == 0


def test_nack_is_recorded_and_the_rejected_version_is_not_resent() -> None:
    proxy = connected_proxy(snapshot(1, ["a"]))
    good = proxy.accepted[CLUSTER]
    bad = snapshot(2, ["a"], cluster_timeouts={"a": 9})
    [cds] = proxy.push(bad)
    rejected = cds.version_info
    assert proxy.nack(CLUSTER, "invalid cluster") == []
    state = proxy.stream.types[CLUSTER]
    assert state.nacks == 1 and state.last_nack is not None
    assert state.last_nack.message == "invalid cluster" and state.last_nack.version == rejected
    assert state.acked_version == good  # the proxy keeps its last good config
    assert not proxy.stream.converged()
    # The same content again (e.g. an unrelated change elsewhere) is not re-sent...
    assert [r.type_url for r in proxy.push(snapshot(3, ["a"], cluster_timeouts={"a": 9}, route_tag="x"))] == [ROUTE]
    # ...nor is it answered when the proxy asks again with the NACK's nonce.
    assert proxy.nack(CLUSTER, "invalid cluster") == []
    # New content is sent.
    [fixed] = [r for r in proxy.push(snapshot(4, ["a"], cluster_timeouts={"a": 2})) if r.type_url == CLUSTER]
    assert fixed.version_info not in (rejected, good)


def test_subscription_change_is_answered_even_at_an_unchanged_version() -> None:
    snap = snapshot(1, ["a", "b"])
    proxy = SotwProxy(SotwStream(1, "node", "fleet", snap, NOW))
    [first] = proxy.subscribe(ENDPOINT, ["a"])
    assert names_of(first) == ["a"]
    proxy.ack(ENDPOINT)
    [second] = proxy.subscribe(ENDPOINT, ["a", "b"])
    assert names_of(second) == ["a", "b"]
    proxy.ack(ENDPOINT)
    assert proxy.subscribe(ENDPOINT, ["a", "b"]) == []  # same names, plain re-request


def test_new_cluster_reaches_routes_only_after_its_cluster_and_endpoints_are_acked() -> None:
    proxy = connected_proxy(snapshot(1, ["a"]))
    out = proxy.push(snapshot(2, ["a", "b"]))
    # Clusters go first; the route naming b is held back until b is warm.
    assert [r.type_url for r in out] == [CLUSTER]
    assert names_of(out[0]) == ["a", "b"]
    assert proxy.ack(CLUSTER) == []
    [eds] = proxy.subscribe(ENDPOINT, ["a", "b"])  # Envoy asks for the new cluster's endpoints
    assert names_of(eds) == ["a", "b"]
    [rds] = proxy.ack(ENDPOINT)
    assert rds.type_url == ROUTE
    proxy.ack(ROUTE)
    assert proxy.stream.converged()


def test_cluster_is_removed_only_after_routes_stop_naming_it() -> None:
    proxy = connected_proxy(snapshot(1, ["a", "b"]))
    out = proxy.push(snapshot(2, ["a"]))
    # The route drops b first; the clusters stay while the proxy's routes may still name b.
    assert [r.type_url for r in out] == [ROUTE]
    cds, eds = proxy.ack(ROUTE)
    assert cds.type_url == CLUSTER and names_of(cds) == ["a"]
    assert eds.type_url == ENDPOINT and names_of(eds) == ["a"]
    proxy.ack(CLUSTER)
    proxy.ack(ENDPOINT)
    # Envoy then drops b from its EDS subscription: fewer names, same content: no answer.
    assert proxy.subscribe(ENDPOINT, ["a"]) == []
    assert proxy.stream.converged()


def test_route_referencing_cluster_being_removed_keeps_it_until_acked() -> None:
    proxy = connected_proxy(snapshot(1, ["a", "b"]))
    proxy.push(snapshot(2, ["a"]))  # RDS without b in flight
    # Before the proxy ACKs the route, another change arrives: b must still not be removed.
    out = proxy.push(snapshot(3, ["a"], cluster_timeouts={"a": 3}))
    assert all(r.type_url != CLUSTER or "b" in names_of(r) for r in out)


def test_changed_cluster_gets_an_eds_answer_even_if_endpoints_did_not_change() -> None:
    proxy = connected_proxy(snapshot(1, ["a"]))
    [cds] = proxy.push(snapshot(2, ["a"], cluster_timeouts={"a": 4}))
    assert cds.type_url == CLUSTER
    proxy.ack(CLUSTER)
    # The changed cluster warms and Envoy re-requests its endpoints with the same names and the
    # latest EDS nonce: a plain-looking request that must be answered or the cluster never warms.
    [eds] = proxy.subscribe(ENDPOINT, ["a"])
    assert eds.type_url == ENDPOINT and names_of(eds) == ["a"]
    proxy.ack(ENDPOINT)
    assert proxy.subscribe(ENDPOINT, ["a"]) == []  # and only once


def test_push_order_is_cds_eds_lds_rds() -> None:
    proxy = connected_proxy(snapshot(1, ["a"]))
    out = proxy.push(snapshot(2, ["a"], cluster_timeouts={"a": 2}, cla_tags={"a": "x"}, route_tag="y"))
    assert [r.type_url for r in out] == [CLUSTER, ENDPOINT, ROUTE]


def test_one_response_per_type_in_flight_and_bursts_coalesce() -> None:
    proxy = connected_proxy(snapshot(1, ["a"]))
    [first] = proxy.push(snapshot(2, ["a"], route_tag="1"))
    assert proxy.push(snapshot(3, ["a"], route_tag="2")) == []
    assert proxy.push(snapshot(4, ["a"], route_tag="3")) == []
    [latest] = proxy.ack(ROUTE)  # the ACK releases one response with the newest content
    assert latest.version_info == snapshot(4, ["a"], route_tag="3").version(ROUTE, frozenset({"rt"}))
    proxy.ack(ROUTE)
    assert proxy.stream.converged()
    assert proxy.stream.types[ROUTE].responses == 3  # initial + 2, not 4


def test_converged_needs_every_type_and_the_warmed_subscriptions() -> None:
    snap = snapshot(1, ["a"])
    proxy = SotwProxy(SotwStream(1, "node", "fleet", snap, NOW))
    proxy.subscribe(CLUSTER)
    assert not proxy.stream.converged()  # in flight
    proxy.ack(CLUSTER)
    proxy.subscribe(LISTENER)
    proxy.ack(LISTENER)
    assert not proxy.stream.converged()  # has not subscribed to EDS or RDS yet
    proxy.subscribe(ENDPOINT, ["a"])
    proxy.ack(ENDPOINT)
    proxy.subscribe(ROUTE, ["rt"])
    assert not proxy.stream.converged()
    proxy.ack(ROUTE)
    assert proxy.stream.converged()
    proxy.push(snapshot(2, ["a"], route_tag="z"))
    assert not proxy.stream.converged()
    proxy.ack(ROUTE)
    assert proxy.stream.converged()


def test_unchanged_types_do_not_resend_when_an_unrelated_type_changes() -> None:
    base = snapshot(1, ["a"])
    proxy = connected_proxy(base)
    nxt = snapshot(2, ["a"], route_tag="q").with_generation(2, base)
    assert nxt.resources[CLUSTER] is base.resources[CLUSTER]
    out = proxy.push(nxt)
    assert [r.type_url for r in out] == [ROUTE]
    assert proxy.stream.types[CLUSTER].synced_generation == 2


# ---------------------------------------------------------------------------------------------
# Delta


def delta_req(type_url: str, *, subscribe: list[str] = (), unsubscribe: list[str] = (), nonce: str = "",  # type: ignore[assignment]
              error: str | None = None, initial: dict[str, str] | None = None) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=list(subscribe), resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce, initial_resource_versions=initial or {},
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def ddecode(outs: list[Outgoing]) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    return [discovery_pb2.DeltaDiscoveryResponse.FromString(o.payload) for o in outs]


def dnames(response: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in response.resources)


def delta_connected(snap: Snapshot) -> DeltaStream:
    stream = DeltaStream(1, "node", "fleet", snap, NOW)
    for type_url, subscribe in ((CLUSTER, []), (ENDPOINT, sorted(snap.of_type(ENDPOINT))), (LISTENER, []), (ROUTE, ["rt"])):
        [resp] = ddecode(stream.on_request(delta_req(type_url, subscribe=subscribe), NOW))
        assert ddecode(stream.on_request(delta_req(type_url, nonce=resp.nonce), NOW)) == []
    assert stream.converged()
    return stream


def test_delta_sends_only_changes_and_removals() -> None:
    stream = delta_connected(snapshot(1, ["a", "b"]))
    out = ddecode(stream.on_snapshot(snapshot(2, ["a", "b"], cla_tags={"b": "new"})))
    assert [(r.type_url, dnames(r), list(r.removed_resources)) for r in out] == [(ENDPOINT, ["b"], [])]
    stream.on_request(delta_req(ENDPOINT, nonce=out[0].nonce), NOW)
    # Removing c-less: drop b entirely: routes first, then clusters, then endpoints.
    [rds] = ddecode(stream.on_snapshot(snapshot(3, ["a"])))
    assert rds.type_url == ROUTE
    out = ddecode(stream.on_request(delta_req(ROUTE, nonce=rds.nonce), NOW))
    assert [(r.type_url, list(r.removed_resources)) for r in out] == [(CLUSTER, ["b"]), (ENDPOINT, ["b"])]


def test_delta_nack_is_not_resent_until_content_changes() -> None:
    stream = delta_connected(snapshot(1, ["a"]))
    cds, eds = ddecode(stream.on_snapshot(snapshot(2, ["a"], cluster_timeouts={"a": 7})))
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)  # a changed cluster gets its endpoints again
    stream.on_request(delta_req(ENDPOINT, nonce=eds.nonce), NOW)
    # The NACK does not say which cluster it rejected, so the proxy holds `a` at the old version
    # or the new one: `a` goes again at its last good version (never the rejected one), so
    # that what the proxy holds is known again.
    again = ddecode(stream.on_request(delta_req(CLUSTER, nonce=cds.nonce, error="bad cluster"), NOW))
    assert [(r.type_url, [x.version for x in r.resources]) for r in again][0] == (CLUSTER, [snapshot(1, ["a"]).of_type(CLUSTER)["a"].version])
    for r in again:
        stream.on_request(delta_req(r.type_url, nonce=r.nonce), NOW)
    state = stream.types[CLUSTER]
    assert state.nacks == 1 and state.last_nack is not None and state.last_nack.message == "bad cluster"
    assert not stream.converged()
    assert [r.type_url for r in ddecode(stream.on_snapshot(snapshot(3, ["a"], cluster_timeouts={"a": 7}, route_tag="r")))] == [ROUTE]
    fixed = ddecode(stream.on_snapshot(snapshot(4, ["a"], cluster_timeouts={"a": 8})))
    assert [(r.type_url, dnames(r)) for r in fixed] == [(CLUSTER, ["a"]), (ENDPOINT, ["a"])]


def test_delta_initial_versions_that_match_need_no_response() -> None:
    snap = snapshot(1, ["a"])
    stream = DeltaStream(2, "node", "fleet", snap, NOW)
    held = {n: r.version for n, r in snap.of_type(CLUSTER).items()}
    assert stream.on_request(delta_req(CLUSTER, initial=held), NOW) == []
    stale = {"a": "0000"}
    other = DeltaStream(3, "node", "fleet", snap, NOW)
    [resp] = ddecode(other.on_request(delta_req(CLUSTER, initial=stale), NOW))
    assert dnames(resp) == ["a"]


def test_delta_resubscribe_resends_and_subscription_changes_are_never_ignored() -> None:
    stream = delta_connected(snapshot(1, ["a", "b"]))
    # A subscribe with no nonce (Envoy sends subscription changes without one) is honoured.
    [resp] = ddecode(stream.on_request(delta_req(ENDPOINT, subscribe=["a"]), NOW))
    assert dnames(resp) == ["a"]
    stream.on_request(delta_req(ENDPOINT, nonce=resp.nonce), NOW)
    assert ddecode(stream.on_request(delta_req(ENDPOINT, unsubscribe=["b"]), NOW)) == []
    assert "b" not in stream.types[ENDPOINT].names


def test_delta_changed_cluster_resends_its_endpoints() -> None:
    stream = delta_connected(snapshot(1, ["a"]))
    out = ddecode(stream.on_snapshot(snapshot(2, ["a"], cluster_timeouts={"a": 3})))
    # Endpoints unchanged, but the changed cluster warms and needs them: sent right after it.
    assert [(r.type_url, dnames(r)) for r in out] == [(CLUSTER, ["a"]), (ENDPOINT, ["a"])]


def test_delta_new_cluster_gates_routes() -> None:
    stream = delta_connected(snapshot(1, ["a"]))
    out = ddecode(stream.on_snapshot(snapshot(2, ["a", "b"])))
    assert [r.type_url for r in out] == [CLUSTER]
    out = ddecode(stream.on_request(delta_req(CLUSTER, nonce=out[0].nonce), NOW))
    assert out == []  # b's endpoints are not subscribed yet, so nothing else may move
    [eds] = ddecode(stream.on_request(delta_req(ENDPOINT, subscribe=["b"]), NOW))
    assert dnames(eds) == ["b"]
    [rds] = ddecode(stream.on_request(delta_req(ENDPOINT, nonce=eds.nonce), NOW))
    assert rds.type_url == ROUTE


def test_routes_requested_before_their_clusters_are_acked_get_no_empty_answer() -> None:
    """An RDS response without the subscribed route table could let Envoy finish warming a
    listener with no routes (404s). The answer waits until the clusters are warm."""
    snap = snapshot(1, ["a"])
    proxy = SotwProxy(SotwStream(1, "node", "fleet", snap, NOW))
    proxy.subscribe(CLUSTER)
    assert proxy.subscribe(ROUTE, ["rt"]) == []  # clusters sent but not ACKed yet
    proxy.ack(CLUSTER)
    [eds] = proxy.subscribe(ENDPOINT, ["a"])
    out = proxy.ack(ENDPOINT)
    assert [r.type_url for r in out] == [ROUTE] and names_of(out[0]) == ["rt"]


# ---------------------------------------------------------------------------------------------
# Bad conditions: reconnects with foreign state, partial NACKs, named subscriptions, bad input

import pytest  # noqa: E402

from controlplane.xds.stream import ProtocolError  # noqa: E402


def test_delta_reconnect_naming_resources_the_snapshot_lacks_removes_them() -> None:
    """An Envoy reconnecting to a control plane with other state reports clusters and a route
    table this one does not know (or knows at another version). The unknown route may name
    the unknown cluster, so the route goes first; then the cluster is removed, and the stream
    converges."""
    old = snapshot(1, ["a", "old"])
    new = snapshot(1, ["a"])
    stream = DeltaStream(1, "node", "fleet", new, NOW)
    held = {t: {n: r.version for n, r in old.of_type(t).items()} for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
    # The route table (other content: it names `old`) is reported first here; it cannot be
    # replaced before the clusters it names are known to be held.
    assert ddecode(stream.on_request(delta_req(ROUTE, subscribe=["rt"], initial=held[ROUTE]), NOW)) == []
    out = ddecode(stream.on_request(delta_req(CLUSTER, initial=held[CLUSTER]), NOW))
    assert out == []  # `old` waits: the proxy's route table (unknown content) may still name it
    out = ddecode(stream.on_request(delta_req(ENDPOINT, subscribe=["a", "old"], initial=held[ENDPOINT]), NOW))
    [rds] = out  # `a` and its endpoints are held: the route can go, `old` still waits
    assert rds.type_url == ROUTE and dnames(rds) == ["rt"]
    assert ddecode(stream.on_request(delta_req(LISTENER, initial=held[LISTENER]), NOW)) == []
    assert not stream.converged()
    # The route no longer names `old`. The endpoints named `old` (unknown content too) go
    # first, as they come after clusters in push order; then the cluster.
    [eds] = ddecode(stream.on_request(delta_req(ROUTE, nonce=rds.nonce), NOW))
    assert (eds.type_url, list(eds.removed_resources)) == (ENDPOINT, ["old"])
    [cds] = ddecode(stream.on_request(delta_req(ENDPOINT, nonce=eds.nonce), NOW))
    assert (cds.type_url, list(cds.removed_resources)) == (CLUSTER, ["old"])
    assert ddecode(stream.on_request(delta_req(CLUSTER, nonce=cds.nonce), NOW)) == []
    stream.on_request(delta_req(ENDPOINT, unsubscribe=["old"]), NOW)
    assert stream.converged()


def test_delta_unknown_route_is_removed_and_other_removals_go_on() -> None:
    """A renamed route table and a deleted cluster: the reconnecting proxy holds `rt-old` and
    `gone`, which the snapshot lacks. Cluster removals wait until the proxy has said which
    routes it holds; `rt-old` is removed (nothing may require a route), then `gone`."""
    snap = snapshot(1, ["a"])
    stream = DeltaStream(1, "node", "fleet", snap, NOW)
    held = {t: {n: r.version for n, r in snap.of_type(t).items()} for t in (CLUSTER, ENDPOINT, LISTENER)}
    assert ddecode(stream.on_request(delta_req(CLUSTER, initial=held[CLUSTER] | {"gone": "v0"}), NOW)) == []
    assert ddecode(stream.on_request(delta_req(ENDPOINT, subscribe=["a"], initial=held[ENDPOINT]), NOW)) == []
    assert ddecode(stream.on_request(delta_req(LISTENER, initial=held[LISTENER]), NOW)) == []
    [rds] = ddecode(stream.on_request(delta_req(ROUTE, subscribe=["rt", "rt-old"], initial={"rt-old": "v9"}), NOW))
    assert dnames(rds) == ["rt"] and list(rds.removed_resources) == ["rt-old"]
    [cds] = ddecode(stream.on_request(delta_req(ROUTE, nonce=rds.nonce), NOW))
    assert list(cds.removed_resources) == ["gone"]
    stream.on_request(delta_req(CLUSTER, nonce=cds.nonce), NOW)
    stream.on_request(delta_req(ROUTE, unsubscribe=["rt-old"]), NOW)
    assert stream.converged()


def test_delta_subscribed_names_that_do_not_exist_are_answered_as_removed() -> None:
    stream = delta_connected(snapshot(1, ["a"]))
    [resp] = ddecode(stream.on_request(delta_req(ENDPOINT, subscribe=["nope"]), NOW))
    assert list(resp.removed_resources) == ["nope"] and dnames(resp) == []
    assert ddecode(stream.on_request(delta_req(ENDPOINT, nonce=resp.nonce), NOW)) == []
    # Only once: a later change of something else does not repeat it.
    out = ddecode(stream.on_snapshot(snapshot(2, ["a"], cla_tags={"a": "x"})))
    assert [list(r.removed_resources) for r in out] == [[]]


def test_sotw_first_request_with_a_nonce_from_an_earlier_connection_is_answered() -> None:
    snap = snapshot(1, ["a"])
    stream = SotwStream(2, "node", "fleet", snap, NOW)
    [resp] = [decode(o) for o in stream.on_request(sotw_req(CLUSTER, version="old", nonce="17"), NOW)]
    assert names_of(resp) == ["a"]
    [eds] = [decode(o) for o in stream.on_request(sotw_req(ENDPOINT, names=["a"], nonce="5"), NOW)]
    assert names_of(eds) == ["a"]


def test_delta_first_request_with_a_nonce_from_an_earlier_connection_is_answered() -> None:
    stream = DeltaStream(2, "node", "fleet", snapshot(1, ["a"]), NOW)
    [resp] = ddecode(stream.on_request(delta_req(CLUSTER, nonce="17"), NOW))
    assert dnames(resp) == ["a"]


@pytest.mark.parametrize("kind", [SotwStream, DeltaStream])
@pytest.mark.parametrize("type_url, problem", [
    ("", "no type_url"),
    ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "is not served"),
    ("nonsense", "'nonsense' is not served"),
])
def test_bad_type_url_is_a_protocol_error_and_creates_no_state(kind: type, type_url: str, problem: str) -> None:
    stream = kind(1, "node", "fleet", snapshot(1, ["a"]), NOW)
    request = sotw_req(type_url) if kind is SotwStream else delta_req(type_url)
    with pytest.raises(ProtocolError, match=problem):
        stream.on_request(request, NOW)
    assert stream.types == {}


def test_too_many_names_is_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import controlplane.xds.stream as stream_module

    monkeypatch.setattr(stream_module, "MAX_NAMES", 3)
    sotw = SotwStream(1, "node", "fleet", snapshot(1, ["a"]), NOW)
    with pytest.raises(ProtocolError, match="at most 3"):
        sotw.on_request(sotw_req(ENDPOINT, names=["a", "b", "c", "d"]), NOW)
    delta = DeltaStream(1, "node", "fleet", snapshot(1, ["a"]), NOW)
    delta.on_request(delta_req(ENDPOINT, subscribe=["a", "b"]), NOW)
    with pytest.raises(ProtocolError, match="more than 3"):
        delta.on_request(delta_req(ENDPOINT, subscribe=["c", "d"]), NOW)


def test_delta_rejected_set_stays_bounded_by_the_snapshot() -> None:
    stream = delta_connected(snapshot(1, ["a"]))
    for i in range(2, 30):
        out = ddecode(stream.on_snapshot(snapshot(i, ["a"], cluster_timeouts={"a": i})))
        for r in out:
            error = "a: invalid" if r.type_url == CLUSTER else None
            stream.on_request(delta_req(r.type_url, nonce=r.nonce, error=error), NOW)
    assert len(stream.types[CLUSTER].rejected) <= 1


def test_sotw_partial_cds_nack_holds_back_only_the_rejected_cluster() -> None:
    """Envoy applies the valid clusters of a CDS response and names the ones it rejects. The
    valid new cluster is then used (routes may name it); only the rejected one waits."""
    proxy = connected_proxy(snapshot(1, ["a"]))
    [cds] = proxy.push(snapshot(2, ["a", "b", "c"]))
    assert names_of(cds) == ["a", "b", "c"]
    assert proxy.nack(CLUSTER, "Error adding/updating cluster(s) c: invalid thing") == []
    state = proxy.stream.types[CLUSTER]
    assert set(state.acked) == {"a", "b"}
    [eds] = proxy.subscribe(ENDPOINT, ["a", "b"])  # Envoy warms b
    assert names_of(eds) == ["a", "b"]
    out = proxy.ack(ENDPOINT)
    # The route naming c cannot go yet, but nothing else is held back by c: a route naming
    # only a and b would. Here the snapshot's route names all three, so it waits.
    assert [r.type_url for r in out] == []
    [rds] = [r for r in proxy.push(snapshot(3, ["a", "b", "c"], routed=["a", "b"])) if r.type_url == ROUTE]
    assert rds.type_url == ROUTE
    proxy.ack(ROUTE)
    assert not proxy.stream.converged()  # c is still rejected
    # c fixed: it goes, then the full route.
    [cds] = proxy.push(snapshot(4, ["a", "b", "c"], cluster_timeouts={"c": 5}, routed=["a", "b"]))
    assert names_of(cds) == ["a", "b", "c"]


def test_sotw_nack_that_names_nothing_keeps_the_response_possibly_applied() -> None:
    """An unexplained NACK: the proxy may have applied the response's new route table, whose
    clusters must then not be removed until the proxy ACKs something again."""
    proxy = connected_proxy(snapshot(1, ["a"]))
    proxy.push(snapshot(2, ["a", "b"]))
    proxy.ack(CLUSTER)
    proxy.subscribe(ENDPOINT, ["a", "b"])
    [rds] = proxy.ack(ENDPOINT)
    assert rds.type_url == ROUTE  # names a and b
    assert proxy.nack(ROUTE, "something went wrong") == []
    # b leaves the snapshot; the proxy may hold the route naming b: b stays.
    out = proxy.push(snapshot(3, ["a"]))
    assert all(r.type_url != CLUSTER or "b" in names_of(r) for r in out)
    [rds] = [r for r in out if r.type_url == ROUTE]
    cds, eds = proxy.ack(ROUTE)  # now the proxy holds a route without b: b may go
    assert names_of(cds) == ["a"] and names_of(eds) == ["a"]


def test_delta_partial_nack_holds_back_only_the_rejected_cluster() -> None:
    stream = delta_connected(snapshot(1, ["a"]))
    [cds] = ddecode(stream.on_snapshot(snapshot(2, ["a", "b", "c"])))
    assert dnames(cds) == ["b", "c"]
    assert ddecode(stream.on_request(delta_req(CLUSTER, nonce=cds.nonce, error="Error adding/updating cluster(s) c: bad"), NOW)) == []
    assert set(stream.types[CLUSTER].acked) == {"a", "b"}


def test_gating_waits_for_a_cluster_removal_in_flight() -> None:
    """A cluster being removed (response in flight) does not count as held: a route naming it
    again must wait, or the removal lands after the route and the route answers 503."""
    proxy = connected_proxy(snapshot(1, ["a", "b"]))
    [rds] = proxy.push(snapshot(2, ["a"]))
    cds, eds = proxy.ack(ROUTE)  # CDS and EDS without b in flight
    assert names_of(cds) == ["a"]
    out = proxy.push(snapshot(3, ["a", "b"]))  # b is back, and the route names it again
    assert [r.type_url for r in out] == []
    out = proxy.ack(CLUSTER)
    assert [(r.type_url, names_of(r)) for r in out] == [(CLUSTER, ["a", "b"])]


@pytest.mark.parametrize("type_url", [CLUSTER, LISTENER])
def test_sotw_cds_and_lds_honour_named_subscriptions(type_url: str) -> None:
    snap = Snapshot.build(1, [cluster("a"), cluster("b"), cla("a"), cla("b"), listener("http"), listener("admin")])
    name = "a" if type_url == CLUSTER else "http"
    # Explicit names without "*": those names only.
    stream = SotwStream(1, "node", "fleet", snap, NOW)
    [resp] = [decode(o) for o in stream.on_request(sotw_req(type_url, names=[name]), NOW)]
    assert names_of(resp) == [name]
    # A later request with both names adds the other one.
    state = stream.types[type_url]
    assert not state.wildcard
    # Explicit "*": everything.
    stream = SotwStream(2, "node", "fleet", snap, NOW)
    [resp] = [decode(o) for o in stream.on_request(sotw_req(type_url, names=["*", name]), NOW)]
    assert len(names_of(resp)) == 2
    # Empty on the first request: legacy wildcard, which later empty requests keep.
    stream = SotwStream(3, "node", "fleet", snap, NOW)
    [resp] = [decode(o) for o in stream.on_request(sotw_req(type_url), NOW)]
    assert len(names_of(resp)) == 2
    assert stream.on_request(sotw_req(type_url, nonce=resp.nonce, version=resp.version_info), NOW) == []
    assert stream.types[type_url].wildcard


# ---------------------------------------------------------------------------------------------
# Named-only resources (Resource(wildcard=False)): a proxyless gRPC client's API listener in the
# same LDS as Envoy's wildcard listeners.


def named_only_snapshot(gen: int = 1, route_tag: str = "") -> Snapshot:
    api = Resource.from_message("shop", listener_pb2.Listener(name="shop"), warms_with=[(ROUTE, "grpc-shop")], wildcard=False)
    grpc_routes = routes("grpc-shop", ["a"], route_tag)
    grpc_routes = Resource.from_serialized("grpc-shop", grpc_routes.type_url, route_pb2.RouteConfiguration(
        name="grpc-shop" + route_tag).SerializeToString(), requires=grpc_routes.requires, wildcard=False)
    return Snapshot.build(gen, [cluster("a"), cla("a"), listener(), routes("rt", ["a"]), api, grpc_routes])


def test_named_only_resources_are_not_sent_to_wildcard_subscribers_nor_needed_for_their_convergence() -> None:
    snap = named_only_snapshot()
    proxy = connected_proxy(snap)  # asserts converged: the API listener's route is not needed
    assert names_of(proxy.latest[LISTENER]) == ["http"]
    assert proxy.latest[LISTENER].version_info == content_version([snap.of_type(LISTENER)["http"]])
    # Delta wildcard: the same.
    stream = DeltaStream(2, "node", "fleet", snap, NOW)
    [resp] = ddecode(stream.on_request(delta_req(LISTENER), NOW))
    assert dnames(resp) == ["http"]


def test_named_only_resource_is_sent_to_a_client_naming_it_which_converges_on_what_it_named() -> None:
    snap = named_only_snapshot()
    client = SotwProxy(SotwStream(1, "grpc-client", "fleet", snap, NOW))
    [lds] = client.subscribe(LISTENER, ["shop"])
    assert names_of(lds) == ["shop"]
    client.ack(LISTENER)
    assert not client.stream.converged()  # the listener warms with its routes: not subscribed yet
    client.subscribe(CLUSTER, ["a"])
    client.ack(CLUSTER)
    client.subscribe(ENDPOINT, ["a"])
    client.ack(ENDPOINT)
    [rds] = client.subscribe(ROUTE, ["grpc-shop"])
    assert names_of(rds) == ["grpc-shop"]
    assert not client.stream.converged()  # in flight
    client.ack(ROUTE)
    # Converged without the wildcard listener "http" or its route "rt": it did not ask for them.
    assert client.stream.converged()
    client.push(named_only_snapshot(2, route_tag="x"))
    assert not client.stream.converged()
    client.settle()
    assert client.stream.converged()


def test_wildcard_subscriber_naming_a_named_only_resource_gets_it_too() -> None:
    snap = named_only_snapshot()
    stream = SotwStream(1, "node", "fleet", snap, NOW)
    [resp] = [decode(o) for o in stream.on_request(sotw_req(LISTENER, names=["*", "shop"]), NOW)]
    assert names_of(resp) == ["http", "shop"]
    assert resp.version_info == content_version(snap.of_type(LISTENER).values())


def test_a_client_naming_its_resources_gets_a_route_before_it_asks_for_the_route_clusters() -> None:
    """A proxyless gRPC client asks for a route's clusters only once it has the route (and uses
    the route only once it has them, gRFC A74): holding the route back for them would deadlock
    it. An Envoy's requirements still gate (see the reconnect tests above)."""
    snap = named_only_snapshot()
    client = SotwProxy(SotwStream(1, "grpc-client", "fleet", snap, NOW))
    client.subscribe(LISTENER, ["shop"])
    client.ack(LISTENER)
    [rds] = client.subscribe(ROUTE, ["grpc-shop"])  # no cluster subscribed yet: sent anyway
    assert names_of(rds) == ["grpc-shop"]
    client.ack(ROUTE)
    client.subscribe(CLUSTER, ["a"])
    client.ack(CLUSTER)
    client.subscribe(ENDPOINT, ["a"])
    client.ack(ENDPOINT)
    assert client.stream.converged()
    # A route naming a new cluster "b" goes out before the client subscribed to "b"...
    grown = Snapshot.build(2, [*(r for p in snap.resources.values() for r in p.values() if r.name != "grpc-shop"),
                               cluster("b"), cla("b"),
                               Resource.from_serialized("grpc-shop", ROUTE, route_pb2.RouteConfiguration(name="grpc-shop-b").SerializeToString(),
                                                        requires=[(t, c) for c in ("a", "b") for t in (CLUSTER, ENDPOINT)], wildcard=False)])
    out = client.push(grown)
    assert [r.type_url for r in out] == [ROUTE]
    # ...but once the client holds "b" unapplied in flight, it gates like any subscribed name.
    client.ack(ROUTE)
    [cds] = client.subscribe(CLUSTER, ["a", "b"])
    assert names_of(cds) == ["a", "b"]


def test_streams_sent_the_same_content_share_one_body_and_differ_only_in_their_nonce() -> None:
    snap1 = snapshot(1, ["a"])
    streams = [connected_proxy(snap1).stream, connected_proxy(snap1).stream]
    streams[1]._nonce = 41  # another stream's own nonce sequence
    snap2 = snapshot(2, ["a"], route_tag="new")
    [first], [second] = (stream.on_snapshot(snap2) for stream in streams)
    body = snap2.sotw_body(ROUTE, first.version, [snap2.of_type(ROUTE)["rt"]])
    for out in (first, second):
        assert out.payload.startswith(body)
        response = decode(out)
        assert (response.version_info, response.nonce, len(response.resources)) == (out.version, out.nonce, 1)
    assert decode(first).resources == decode(second).resources
    assert first.nonce != second.nonce
    assert snap2.sotw_body(ROUTE, first.version, []) is body  # built once per (type, version)
