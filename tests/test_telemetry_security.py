"""Telemetry that the deployment analysis may believe: plausibility checks (pure sink), and
authentication with mTLS (a real Envoy, real certificates, and a forging second client)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.app import ControlPlane
from controlplane.bootstrap import render_bootstrap
from controlplane.config import load_settings
from controlplane.deploy.driver import judge
from controlplane.deploy.spec import Analysis
from controlplane.store.sqlite import open_sqlite_store
from controlplane.telemetry import MetricsSink, StreamMetricsMessage, StreamMetricsResponse
from controlplane.typeurls import CLUSTER
from controlplane.xds.peer import PeerIdentity
from tests.certs import CertFiles
from tests.harness import free_port, run_envoy, run_upstream, sample_environments, wait_for
from tests.test_telemetry import FakeClock, message
from tests.test_xds_tls import Pki, make_pki

# --------------------------------------------------------------------------------------------
# Plausibility (pure)
# --------------------------------------------------------------------------------------------


def test_negative_and_non_finite_values_are_dropped_and_counted() -> None:
    dropped: list[tuple[str, int]] = []
    sink = MetricsSink(clock=FakeClock(), on_dropped=lambda reason, n: dropped.append((reason, n)))
    start = sink.snapshot()
    stream = sink.open_stream()
    sink.receive(stream, message("edge-1", {"x": {"completed": -500, "xx": {"5": float("nan")}}, "y": {"completed": 3}}))
    w = sink.since(start, "x")
    assert (w.requests, w.errors) == (0, 0)
    assert sink.since(start, "y").requests == 3
    assert sorted(dropped) == [("malformed", 1), ("negative_value", 1)]


def test_metrics_from_the_future_are_dropped() -> None:
    wall = 1_000_000.0
    sink = MetricsSink(clock=FakeClock(), wall_clock=lambda: wall)
    start = sink.snapshot()
    stream = sink.open_stream()
    msg = message("edge-1", {"x": {"completed": 5, "xx": {"5": 5}}})
    for family in msg.envoy_metrics:
        for metric in family.metric:
            metric.timestamp_ms = int((wall + 3600) * 1000)  # an hour ahead
    sink.receive(stream, msg)
    msg = message(None, {"x": {"completed": 2}})
    msg.envoy_metrics[0].metric[0].timestamp_ms = int((wall + 30) * 1000)  # within the allowed skew
    sink.receive(stream, msg)
    assert sink.since(start, "x").requests == 2 and sink.since(start, "x").errors == 0
    assert sink.dropped == {"future_timestamp": 2}


def test_absurd_rates_are_dropped_and_cumulative_resets_restart_the_baseline() -> None:
    clock = FakeClock()
    sink = MetricsSink(clock=clock)
    start = sink.snapshot()
    stream = sink.open_stream()
    sink.receive(stream, message("edge-1", {"x": {"completed": 10}}))
    clock.now += 1.0
    sink.receive(stream, message(None, {"x": {"completed": 10**9, "xx": {"5": 10**9}}}))  # 10^9 in 1 s
    assert sink.since(start, "x").requests == 10 and sink.dropped == {"absurd_rate": 1}

    cumulative = MetricsSink(clock=clock, counters_as_deltas=False)
    s = cumulative.open_stream()
    cumulative.receive(s, message("edge-1", {"x": {"completed": 100}}))  # baseline
    begin = cumulative.snapshot()
    clock.now += 1.0
    cumulative.receive(s, message(None, {"x": {"completed": 130}}))
    clock.now += 1.0
    cumulative.receive(s, message(None, {"x": {"completed": 5}}))  # went down: Envoy restarted
    assert cumulative.since(begin, "x").requests == 35  # 30, then 5 since the restart; never negative


def test_authorizer_drops_reports_for_other_nodes_and_foreign_clusters() -> None:
    edge = PeerIdentity("ipv4:127.0.0.1:1", ("spiffe://example.org/edge/envoy-1",))
    other = PeerIdentity("ipv4:127.0.0.1:2", ("spiffe://example.org/internal/envoy-1",))

    def authorize(node_id: str, peer: PeerIdentity | None) -> tuple[str | None, Any]:
        if peer is None or not peer.authenticated:
            return "unauthenticated", None
        return (None, {"edge-cluster"}) if node_id == "edge-1" and peer == edge else ("node_mismatch", None)

    sink = MetricsSink(clock=FakeClock(), authorize=authorize)
    start = sink.snapshot()
    good, forged, anonymous = sink.open_stream("a", edge), sink.open_stream("b", other), sink.open_stream("c")
    sink.receive(good, message("edge-1", {"edge-cluster": {"completed": 4}, "internal-cluster": {"completed": 9}}))
    sink.receive(forged, message("edge-1", {"edge-cluster": {"completed": 1000, "xx": {"5": 1000}}}))
    sink.receive(anonymous, message("edge-1", {"edge-cluster": {"completed": 1000}}))
    w = sink.since(start, "edge-cluster")
    assert (w.requests, w.errors, w.proxies) == (4, 0, ("edge-1",))
    assert sink.since(start, "internal-cluster").requests == 0
    assert sink.dropped == {"foreign_cluster": 1, "node_mismatch": 1, "unauthenticated": 1}
    assert sink.connected() == {"edge-1": 1}  # the forged stream does not count as edge-1's


# --------------------------------------------------------------------------------------------
# A real Envoy over mTLS, and a second client forging its figures
# --------------------------------------------------------------------------------------------


def credentials(pki: Pki, cert: CertFiles) -> grpc.ChannelCredentials:
    chain, key = cert.pair()
    return grpc.ssl_channel_credentials(pki.ca.cert_path.read_bytes(), key, chain)


async def report(channel: grpc.aio.Channel, node_id: str, clusters: dict[str, dict[str, Any]]) -> None:
    call = channel.stream_unary("/envoy.service.metrics.v3.MetricsService/StreamMetrics",
                                request_serializer=StreamMetricsMessage.SerializeToString,
                                response_deserializer=StreamMetricsResponse.FromString)

    async def messages() -> AsyncIterator[Any]:
        yield message(node_id, clusters)

    await call(messages())


async def test_forged_telemetry_from_another_client_does_not_change_the_verdict(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    listener_port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"""
xds:
  tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", client_ca: "{pki.ca.cert_path}"}}
fleets:
  edge:
    listeners: [{{name: http, address: 127.0.0.1, port: {listener_port}}}]
    identities: ["spiffe://example.org/edge/*"]
  internal:
    listeners: [{{name: http, address: 127.0.0.1, port: {free_port()}}}]
    services: ["search"]
    identities: ["spiffe://example.org/internal/*"]
""")
    cp = ControlPlane(load_settings(config), await open_sqlite_store(tmp_path / "state.db"))
    await cp.start("127.0.0.1:0")
    sink = cp.telemetry
    try:
        async with run_upstream("blue", "v1", log_dir=tmp_path) as blue:
            await cp.operations.put_service("shop", {})
            committed = await cp.operations.put_environment("shop", "blue", {"version": "v1", "endpoints": [blue.address]})
            await cp.publisher.wait_published(committed.revision)
            admin_port = free_port()
            bootstrap = render_bootstrap(node_id="edge-1", fleet="edge", xds=f"127.0.0.1:{cp.xds_port}", admin_port=admin_port,
                                         stats_flush_seconds=0.2, ca=str(pki.ca.cert_path),
                                         tls_cert=str(pki.edge.cert), tls_key=str(pki.edge.key))
            async with run_envoy(bootstrap, admin_port=admin_port, log_dir=tmp_path) as envoy:
                await envoy.wait_ready(timeout=60)
                await wait_for(lambda: "edge-1" in sink.connected(), timeout=30, message="edge-1's metrics stream")
                start = sink.snapshot()
                counts = await sample_environments(f"http://127.0.0.1:{listener_port}/", 40)
                assert counts == {"blue": 40}, counts
                await wait_for(lambda: sink.since(start, "shop-blue").requests >= 40, timeout=30, message="40 requests reported")

                before = dict(sink.dropped)  # e.g. edge-1's first flush may beat its ADS stream: node_mismatch
                async with grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", credentials(pki, pki.internal)) as channel:
                    # A client with a valid certificate for fleet internal poses as edge-1 ...
                    await report(channel, "edge-1", {"shop-blue": {"completed": 1000, "xx": {"5": 1000}}})
                    # ... and, connected over ADS as internal-1, reports a cluster of fleet edge.
                    done = asyncio.Event()

                    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                        yield discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="internal-1", cluster="internal"))
                        await done.wait()  # keep the stream open (a half-close ends it)

                    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
                    await asyncio.wait_for(ads.read(), 30)
                    await report(channel, "internal-1", {"shop-blue": {"completed": 500, "xx": {"5": 500}}})
                    done.set()
                    ads.cancel()

                mark = sink.snapshot()
                assert await sink.wait_reports(mark, timeout=30) == set(), "edge-1 reports after the forgeries"
                w = sink.since(start, "shop-blue")
                assert (w.requests, w.errors, w.proxies) == (40, 0, ("edge-1",)), w.as_dict()
                added = {reason: n - before.get(reason, 0) for reason, n in sink.dropped.items() if n != before.get(reason, 0)}
                assert added == {"node_mismatch": 1, "foreign_cluster": 1}, (before, sink.dropped)
                sample = cp.metrics.registry.get_sample_value
                assert sample("bluegreen_telemetry_dropped_total", {"reason": "node_mismatch"}) == sink.dropped["node_mismatch"]
                analysis = Analysis()
                assert judge(analysis, w) == ("ok", None)
                forged = {"requests": 1540, "errors": 1500, "error_rate": 1500 / 1540, "p99_ms": w.p99_ms}
                assert judge(analysis, forged)[0] == "breach"  # what believing the forgery would have decided
    finally:
        await cp.stop()


async def test_a_node_id_belongs_to_the_certificate_whose_stream_holds_it(tmp_path: Path) -> None:
    """Telemetry is believed by node id for the certificate of that node's ADS stream, so under
    mTLS a second certificate of the same fleet may not open a stream claiming a node id that
    another certificate's stream holds."""
    from tests.test_xds_tls import tls_config

    pki = make_pki(tmp_path / "pki")
    other_edge = pki.ca.client("edge-2", "spiffe://example.org/edge/envoy-2")
    cp = ControlPlane(load_settings(tls_config(tmp_path / "config.yaml", pki)), await open_sqlite_store(tmp_path / "state.db"))
    await cp.start("127.0.0.1:0")
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", credentials(pki, pki.edge)) as owner_channel, \
                grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", credentials(pki, other_edge)) as other_channel:
            held = asyncio.Event()

            async def owner_requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                yield discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="edge-1", cluster="edge"))
                await held.wait()

            owner = ads_pb2_grpc.AggregatedDiscoveryServiceStub(owner_channel).StreamAggregatedResources(owner_requests())
            await asyncio.wait_for(owner.read(), 30)
            impostor = ads_pb2_grpc.AggregatedDiscoveryServiceStub(other_channel).StreamAggregatedResources(
                iter([discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="edge-1", cluster="edge"))]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(impostor.read(), 30)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "node id 'edge-1' is in use by a stream with another certificate" in (refused.value.details() or "")
            assert cp.metrics.registry.get_sample_value("bluegreen_xds_streams_refused_total", {"reason": "node_id_in_use"}) == 1
            # The same certificate may reconnect under its node id (a second stream of one proxy).
            again = ads_pb2_grpc.AggregatedDiscoveryServiceStub(owner_channel).StreamAggregatedResources(
                iter([discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="edge-1", cluster="edge"))]))
            assert (await asyncio.wait_for(again.read(), 30)).type_url == CLUSTER
            again.cancel()
            held.set()
            owner.cancel()
    finally:
        await cp.stop()
