"""Stateful property test of the ADS stream state machines (SotW and Delta), without gRPC.

A model Envoy plays the proxy. It applies responses the way Envoy does (valid resources of a
response are applied, invalid ones rejected with a NACK that names them, or, to test the
conservative path, a NACK that names nothing or rejects the whole response), follows its
subscriptions (EDS for the clusters it holds, RDS for the route table its listener names),
and reconnects reporting what it holds. Hypothesis drives it with random snapshots, deliveries,
NACKs and reconnects, and after every step checks the make-before-break invariant on what the
model Envoy really holds: every route table it holds names only clusters, with endpoints, that it
holds. A ``converge`` step publishes a fresh valid snapshot, lets the proxy ACK everything,
and checks that the stream reports convergence and the proxy holds exactly the snapshot
(so removals happened).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controlplane.typeurls import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE
from controlplane.xds.snapshot import Resource, Snapshot
from controlplane.xds.stream import DeltaStream, Outgoing, SotwStream, StreamState

NOW = 0.0
CLUSTERS = ("c0", "c1")
BAD = 9  # a cluster or listener "version" the proxy rejects
REGISTRY: dict[bytes, Resource] = {}  # Any bytes -> resource, to read SotW responses back
BAD_RESOURCES: set[tuple[str, str, str]] = set()  # (type_url, name, version) the proxy rejects
_fresh = itertools.count(100)


def _register(resource: Resource, bad: bool = False) -> Resource:
    REGISTRY[resource.any_bytes] = resource
    if bad:
        BAD_RESOURCES.add((resource.type_url, resource.name, resource.version))
    return resource


def make_cluster(name: str, v: int) -> Resource:
    msg = cluster_pb2.Cluster(name=name, connect_timeout=duration_pb2.Duration(seconds=v))
    return _register(Resource.from_message(name, msg, warms_with=[(ENDPOINT, name)]), bad=v == BAD)


def make_cla(name: str, v: int) -> Resource:
    msg = endpoint_pb2.ClusterLoadAssignment(cluster_name=name, policy=endpoint_pb2.ClusterLoadAssignment.Policy(
        overprovisioning_factor=wrappers_pb2.UInt32Value(value=v + 100)))
    return _register(Resource.from_message(name, msg))


def make_listener(v: int) -> Resource:
    msg = listener_pb2.Listener(name="http", per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=v))
    return _register(Resource.from_message("http", msg, warms_with=[(ROUTE, "rt")]), bad=v == BAD)


def make_routes(clusters: tuple[str, ...], v: int) -> Resource:
    msg = route_pb2.RouteConfiguration(name="rt", max_direct_response_body_size_bytes=wrappers_pb2.UInt32Value(value=v),
                                       virtual_hosts=[route_components_pb2.VirtualHost(name=c, domains=[c]) for c in clusters])
    requires = [(t, c) for c in clusters for t in (CLUSTER, ENDPOINT)]
    return _register(Resource.from_message("rt", msg, requires=requires), bad=v == BAD)


@st.composite
def snapshot_specs(draw: Any) -> dict[str, Any]:
    present = draw(st.sets(st.sampled_from(CLUSTERS)))
    return {
        "clusters": {c: draw(st.sampled_from([1, 2, BAD])) for c in sorted(present)},
        "clas": {c: draw(st.sampled_from([1, 2])) for c in sorted(present)},
        "routed": tuple(sorted(draw(st.sets(st.sampled_from(sorted(present))) if present else st.just(set())))),
        "listener": draw(st.sampled_from([1, 2, BAD])),
        "route": draw(st.sampled_from([1, 2, BAD])),
    }


def build(generation: int, spec: dict[str, Any]) -> Snapshot:
    resources = [make_cluster(c, v) for c, v in spec["clusters"].items()]
    resources += [make_cla(c, v) for c, v in spec["clas"].items()]
    resources += [make_listener(spec["listener"]), make_routes(spec["routed"], spec["route"])]
    snapshot = Snapshot.build(generation, resources)
    snapshot.check_consistent()
    return snapshot


def is_bad(resource: Resource) -> bool:
    return (resource.type_url, resource.name, resource.version) in BAD_RESOURCES


class ModelEnvoy:
    """What one Envoy holds, and the requests it sends."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.held: dict[str, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        self.accepted: dict[str, str] = {}  # SotW: version_info of the last ACKed response per type
        self.last_nonce: dict[str, str] = {}  # nonce of the last response processed per type
        self.subscribed: dict[str, set[str]] = {}  # type -> names (CDS/LDS: wildcard, empty set)

    # -- what Envoy subscribes to -------------------------------------------------------------

    def wanted(self, type_url: str) -> set[str] | None:
        """Names Envoy subscribes to for ``type_url`` now; None if it does not subscribe."""
        if type_url in (CLUSTER, LISTENER):
            return set()
        if type_url == ENDPOINT:
            return set(self.held[CLUSTER]) if self.held[CLUSTER] else None
        return {"rt"} if self.held[LISTENER] else None

    def request(self, type_url: str, *, nonce: str = "", error: str | None = None, first: bool = False,
                old_nonce: str = "") -> Any:
        names = self.wanted(type_url) or set()
        if self.delta:
            previous = self.subscribed.get(type_url, set())
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce or old_nonce)
            if first:
                req.resource_names_subscribe.extend(sorted(names))
                req.initial_resource_versions.update({n: r.version for n, r in self.held[type_url].items()})
            else:
                req.resource_names_subscribe.extend(sorted(names - previous))
                req.resource_names_unsubscribe.extend(sorted(previous - names))
        else:
            req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=sorted(names),
                                                 version_info=self.accepted.get(type_url, ""),
                                                 response_nonce=nonce or old_nonce)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        self.subscribed[type_url] = names
        return req

    # -- applying a response --------------------------------------------------------------------

    def apply(self, out: Outgoing, mode: str) -> tuple[list[Any], str | None]:
        """Apply ``out`` as Envoy would in ``mode`` (ack, whole, named, unnamed); return the
        requests Envoy sends next (the ACK/NACK first) and the NACK message, if any."""
        type_url = out.type_url
        before_clusters = dict(self.held[CLUSTER])
        before_listener = dict(self.held[LISTENER])
        if self.delta:
            response = discovery_pb2.DeltaDiscoveryResponse.FromString(out.payload)
            resources = [REGISTRY[r.resource.SerializeToString()] for r in response.resources]
            removed = list(response.removed_resources)
        else:
            response = discovery_pb2.DiscoveryResponse.FromString(out.payload)
            resources = [REGISTRY[a.SerializeToString()] for a in response.resources]
            removed = [n for n in self.held[type_url] if n not in {r.name for r in resources}] \
                if type_url in (CLUSTER, LISTENER) else []
        bad = [r for r in resources if is_bad(r)]
        if bad and mode == "ack":
            mode = "named"
        held = self.held[type_url]
        if mode != "whole":
            for name in removed:
                held.pop(name, None)
            for resource in resources:
                if not is_bad(resource):
                    held[resource.name] = resource
        # What goes away with a cluster or listener.
        for name in list(self.held[ENDPOINT]):
            if name not in self.held[CLUSTER]:
                del self.held[ENDPOINT][name]
        if not self.held[LISTENER]:
            self.held[ROUTE].clear()
        self.last_nonce[type_url] = response.nonce
        error = None
        if mode == "ack":
            if not self.delta:
                self.accepted[type_url] = response.version_info
        elif mode == "named" and bad:
            error = "Error adding/updating resource(s) " + ", ".join(f"{r.name}: invalid" for r in bad)
        else:
            error = "update rejected"
        requests = [self.request(type_url, nonce=response.nonce, error=error)]
        # Follow-up subscriptions, as Envoy sends them: EDS for the clusters held (SotW Envoy
        # also asks again after a cluster changed, to warm it), RDS for the listener's routes.
        if type_url == CLUSTER and ENDPOINT in self.subscribed or type_url == CLUSTER and self.held[CLUSTER]:
            if self.held[CLUSTER] != before_clusters or self.wanted(ENDPOINT) != self.subscribed.get(ENDPOINT):
                requests.append(self.request(ENDPOINT, nonce=self.last_nonce.get(ENDPOINT, "")))
        if type_url == LISTENER and (self.held[LISTENER] != before_listener or self.wanted(ROUTE) != self.subscribed.get(ROUTE)):
            if self.wanted(ROUTE) is not None or ROUTE in self.subscribed:
                requests.append(self.request(ROUTE, nonce=self.last_nonce.get(ROUTE, "")))
        return requests, error


class StreamMachine(RuleBasedStateMachine):
    delta = False

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0
        self.proxy = ModelEnvoy(self.delta)
        self.inbox: list[Outgoing] = []
        self.stream: StreamState
        self.stream_ids = itertools.count(1)

    def new_stream(self, snapshot: Snapshot) -> StreamState:
        kind = DeltaStream if self.delta else SotwStream
        return kind(next(self.stream_ids), "node", "fleet", snapshot, NOW)

    def feed(self, request: Any) -> None:
        self.inbox.extend(self.stream.on_request(request, NOW))

    @initialize(spec=snapshot_specs())
    def connect(self, spec: dict[str, Any]) -> None:
        self.generation += 1
        self.stream = self.new_stream(build(self.generation, spec))
        self.feed(self.proxy.request(CLUSTER, first=True))
        self.feed(self.proxy.request(LISTENER, first=True))

    @rule(spec=snapshot_specs())
    def change_snapshot(self, spec: dict[str, Any]) -> None:
        self.generation += 1
        self.inbox.extend(self.stream.on_snapshot(build(self.generation, spec)))

    @precondition(lambda self: bool(self.inbox))
    @rule(mode=st.sampled_from(["ack", "ack", "ack", "whole", "named", "unnamed"]))
    def deliver(self, mode: str) -> None:
        out = self.inbox.pop(0)  # one gRPC stream: in order
        requests, _ = self.proxy.apply(out, mode)
        for request in requests:
            self.feed(request)

    @precondition(lambda self: self.delta or (not self.inbox and self.stream.converged()))
    @rule(order=st.permutations(PUSH_ORDER), stale_nonce=st.booleans())
    def reconnect(self, order: list[str], stale_nonce: bool) -> None:
        # SotW reconnects only from a converged proxy: a SotW proxy reports a version per type,
        # not what it holds (see the stream module's "Known limit").
        self.inbox.clear()
        self.stream = self.new_stream(self.stream.snapshot)
        if not stale_nonce:  # Envoy forgets nonces on a new stream; other clients may not
            self.proxy.last_nonce.clear()
        for type_url in order:
            if type_url in self.proxy.subscribed and (type_url in (CLUSTER, LISTENER) or self.proxy.wanted(type_url) is not None):
                old = self.proxy.last_nonce.get(type_url, "") if stale_nonce else ""
                self.feed(self.proxy.request(type_url, first=True, old_nonce=old))

    @rule(spec=snapshot_specs())
    def converge(self, spec: dict[str, Any]) -> None:
        # Fresh, valid content: versions never sent before, so nothing is held back by an
        # earlier rejection.
        fresh = {
            "clusters": {c: next(_fresh) for c in spec["clusters"]},
            "clas": {c: next(_fresh) for c in spec["clas"]},
            "routed": spec["routed"],
            "listener": next(_fresh),
            "route": next(_fresh),
        }
        self.generation += 1
        snapshot = build(self.generation, fresh)
        self.inbox.extend(self.stream.on_snapshot(snapshot))
        for _ in range(200):
            if not self.inbox:
                break
            self.deliver("ack")
            self.check_make_before_break()
        assert not self.inbox, "the stream did not go quiet"
        assert self.stream.converged(), {t: (s.synced_generation, s.pending_nonce) for t, s in self.stream.types.items()}
        for type_url in PUSH_ORDER:
            expected = {n: r.version for n, r in snapshot.of_type(type_url).items()}
            held = {n: r.version for n, r in self.proxy.held[type_url].items()}
            assert held == expected, (type_url, held, expected)

    @invariant()
    def check_make_before_break(self) -> None:
        held = self.proxy.held
        for route in held[ROUTE].values():
            for type_url, name in route.requires:
                assert name in held[type_url], f"the proxy's route table names {name}, which it does not hold ({type_url})"

    @invariant()
    def state_stays_bounded(self) -> None:
        for state in self.stream.types.values():
            assert len(state.rejected) <= len(CLUSTERS) + 2
            assert len(state.names) <= len(CLUSTERS) + 1


class SotwMachine(StreamMachine):
    delta = False


class DeltaMachine(StreamMachine):
    delta = True


_settings = settings(max_examples=int(os.environ.get('XDS_STATEFUL_EXAMPLES', '100')), stateful_step_count=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestSotwStream = SotwMachine.TestCase
TestSotwStream.settings = _settings
TestDeltaStream = DeltaMachine.TestCase
TestDeltaStream.settings = _settings
