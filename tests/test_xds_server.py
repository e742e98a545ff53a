"""The gRPC ADS driver, with a real grpc.aio client on loopback playing a proxy."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from controlplane.app import ControlPlane
from controlplane.config import Settings, XdsSettings
from controlplane.store.sqlite import open_sqlite_store
from controlplane.typeurls import CLUSTER, LISTENER
from controlplane.xds.server import SERVICE_NAME, server_options
from controlplane.xds.stream import SotwStream
from tests.harness import wait_for


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    async with running(tmp_path, Settings()) as cp:
        yield cp


@contextlib.asynccontextmanager
async def running(tmp_path: Path, settings: Settings) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(settings, await open_sqlite_store(tmp_path / "state.db"))
    await cp.start("127.0.0.1:0")
    try:
        await cp.operations.put_service("shop", {})
        committed = await cp.operations.put_environment("shop", "blue", {"version": "v1", "endpoints": ["127.0.0.1:9"]})
        await cp.publisher.wait_published(committed.revision)
        yield cp
    finally:
        await cp.stop()


class Proxy:
    """A SotW ADS client: send requests, receive decoded responses."""

    def __init__(self, cp: ControlPlane, node_id: str = "n1", fleet: str = "default") -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}")
        self.node = base_pb2.Node(id=node_id, cluster=fleet)
        self.outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(self._requests())
        self.first = True

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (request := await self.outbox.get()) is not None:
            yield request

    def send(self, type_url: str, *, nonce: str = "", version: str = "", error: str | None = None, names: list[str] | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, version_info=version, resource_names=names or [])
        if self.first:
            request.node.CopyFrom(self.node)
            self.first = False
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.outbox.put_nowait(request)

    async def receive(self) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.call.read(), 10)

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()
        await self.channel.close()


async def test_unknown_fleet_is_refused_with_the_known_ones(control_plane: ControlPlane) -> None:
    proxy = Proxy(control_plane, fleet="nosuchfleet")
    proxy.send(CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await proxy.receive()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown fleet 'nosuchfleet'" in info.value.details() and "default" in info.value.details()
    await proxy.close()
    assert control_plane.ads.streams == {}


async def test_responses_decode_and_stale_nacks_are_not_counted(control_plane: ControlPlane) -> None:
    cp = control_plane
    proxy = Proxy(cp)
    try:
        proxy.send(CLUSTER)
        first = await proxy.receive()
        assert first.type_url == CLUSTER and len(first.resources) == 1  # shop-blue; green has nothing deployed
        proxy.send(CLUSTER, nonce=first.nonce, version=first.version_info)  # ACK

        # Adding a service changes the cluster set: a new CDS response.
        committed = await cp.operations.put_service("cart", {"prefix": "/cart"})
        await cp.publisher.wait_published(committed.revision)
        second = await proxy.receive()
        assert second.type_url == CLUSTER and len(second.resources) == 2 and second.nonce != first.nonce  # + cart-blue (100 %)

        proxy.send(CLUSTER, nonce=first.nonce, version=first.version_info, error="late NACK of an old response")
        proxy.send(CLUSTER, nonce=second.nonce, version=first.version_info, error="bad cluster")

        def nack_counted() -> bool:
            [stream] = cp.ads.streams.values()
            return stream.types[CLUSTER].nacks == 1

        await wait_for(nack_counted, timeout=10, message="one NACK recorded")
        registry = cp.metrics.registry
        assert registry.get_sample_value("bluegreen_xds_nacks_total", {"type_url": CLUSTER}) == 1  # not the stale one
        labels = {"node_id": "n1", "fleet": "default", "type_url": CLUSTER}
        assert registry.get_sample_value("bluegreen_xds_proxy_rejected_config", labels) == 1
        assert cp.convergence.status("default")["acked"] == 0
    finally:
        await proxy.close()
    await wait_for(lambda: not cp.ads.streams, timeout=10, message="stream closed")
    assert cp.convergence.status("default")["proxies"] == 0


async def test_streams_share_the_serialized_resources(control_plane: ControlPlane) -> None:
    cp = control_plane
    proxies = [Proxy(cp, node_id=f"n{i}") for i in range(3)]
    try:
        for proxy in proxies:
            proxy.send(LISTENER)
        answers = [await p.receive() for p in proxies]
        # Each answer carries the snapshot's pre-serialized resources, byte for byte (those a
        # wildcard subscriber gets: not the proxyless gRPC API listeners).
        snapshot = cp.cache.get("default")
        pool = snapshot.wildcard_pool(LISTENER)
        expected = [any_pb2.Any.FromString(pool[n].any_bytes) for n in sorted(pool)]
        assert expected and len(pool) < len(snapshot.of_type(LISTENER))
        for answer in answers:
            assert list(answer.resources) == expected
            assert answer.version_info == snapshot.version(LISTENER)
    finally:
        for proxy in proxies:
            await proxy.close()


async def test_a_failure_while_pushing_ends_the_stream_with_internal(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in planning a push must not leave a proxy connected but never updated: the
    stream ends with INTERNAL, so the proxy reconnects, and the stream is forgotten."""
    cp = control_plane
    proxy = Proxy(cp)
    try:
        proxy.send(CLUSTER)
        first = await proxy.receive()
        proxy.send(CLUSTER, nonce=first.nonce, version=first.version_info)

        def broken(self: object, snapshot: object) -> list[object]:
            raise RuntimeError("planning bug")

        monkeypatch.setattr(SotwStream, "on_snapshot", broken)
        committed = await cp.operations.put_service("cart", {"prefix": "/cart"})
        await cp.publisher.wait_published(committed.revision)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await proxy.receive()
        assert info.value.code() == grpc.StatusCode.INTERNAL and "planning bug" in info.value.details()
    finally:
        await proxy.close()
    await wait_for(lambda: not cp.ads.streams, timeout=10, message="stream forgotten")
    assert cp.convergence.status("default")["proxies"] == 0


async def test_readyz_reports_a_failing_publisher(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    """If building snapshots fails, proxies keep the last config and /readyz says why."""
    from aiohttp.test_utils import TestClient, TestServer

    from controlplane.admin.api import build_admin_app

    cp = control_plane
    before = cp.cache.get("default")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(cp.builder, "build", broken)
    async with TestClient(TestServer(build_admin_app(cp, None))) as client:
        await cp.operations.put_service("cart", {"prefix": "/cart"})
        await wait_for(lambda: cp.publisher.last_error is not None, timeout=10, message="publisher error recorded")
        response = await client.get("/readyz")
        body = await response.json()
        assert response.status == 503 and "simulated build failure" in body["error"]
        assert cp.cache.get("default") is before  # nothing half-built was served
        monkeypatch.undo()
        await cp.operations.put_service("cart", {"prefix": "/cart2"})
        await wait_for(lambda: cp.publisher.last_error is None, timeout=60, message="publisher recovered")
        assert (await client.get("/readyz")).status == 200


# ---------------------------------------------------------------------------------------------
# Bad conditions


async def expect_status(call: object, code: grpc.StatusCode, *texts: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 10)  # type: ignore[attr-defined]
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for text in texts:
        assert text in (info.value.details() or ""), info.value.details()


@pytest.mark.parametrize("type_url, problem", [
    ("", "request has no type_url"),
    ("nonsense", "type_url 'nonsense' is not served"),
    ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "is not served"),
])
async def test_bad_type_url_ends_the_stream_with_invalid_argument(control_plane: ControlPlane, type_url: str, problem: str) -> None:
    proxy = Proxy(control_plane)
    try:
        proxy.send(type_url)
        await expect_status(proxy.call, grpc.StatusCode.INVALID_ARGUMENT, problem)
    finally:
        await proxy.close()
    await wait_for(lambda: not control_plane.ads.streams, timeout=10, message="stream forgotten")


async def test_unknown_type_after_a_good_request_ends_the_stream(control_plane: ControlPlane) -> None:
    proxy = Proxy(control_plane)
    try:
        proxy.send(CLUSTER)
        await proxy.receive()
        proxy.send("type.googleapis.com/some.Other")
        await expect_status(proxy.call, grpc.StatusCode.INVALID_ARGUMENT, "'type.googleapis.com/some.Other' is not served")
    finally:
        await proxy.close()


@pytest.mark.parametrize("method", ["StreamAggregatedResources", "DeltaAggregatedResources"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
async def test_malformed_message_ends_the_stream_with_invalid_argument(control_plane: ControlPlane, method: str, first: bool) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control_plane.xds_port}") as channel:
        call = channel.stream_stream(f"/{SERVICE_NAME}/{method}", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)()
        if not first:
            message = (discovery_pb2.DiscoveryRequest if method.startswith("Stream") else discovery_pb2.DeltaDiscoveryRequest)(
                type_url=CLUSTER, node=base_pb2.Node(id="n1", cluster="default"))
            await call.write(message.SerializeToString())
            await asyncio.wait_for(call.read(), 10)
        await call.write(b"\x0a\xff\xff\xff\xff")  # field 1, length far beyond the message
        kind = "DiscoveryRequest" if method.startswith("Stream") else "DeltaDiscoveryRequest"
        await expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, f"malformed {kind}")
    await wait_for(lambda: not control_plane.ads.streams, timeout=10, message="stream forgotten")


async def test_named_sotw_cds_subscription_gets_only_those_clusters(control_plane: ControlPlane) -> None:
    """A gRPC xDS client subscribes to clusters by name; Envoy by wildcard."""
    cp = control_plane
    committed = await cp.operations.put_service("cart", {"prefix": "/cart"})
    await cp.publisher.wait_published(committed.revision)
    assert set(cp.cache.get("default").of_type(CLUSTER)) >= {"shop-blue", "cart-blue"}
    named, wildcard = Proxy(cp, node_id="grpc-client"), Proxy(cp, node_id="envoy")
    try:
        named.send(CLUSTER, names=["cart-blue"])
        response = await named.receive()
        assert [cluster_name(r) for r in response.resources] == ["cart-blue"]
        wildcard.send(CLUSTER)
        response = await wildcard.receive()
        assert {cluster_name(r) for r in response.resources} >= {"shop-blue", "cart-blue"}
    finally:
        await named.close()
        await wildcard.close()


def cluster_name(resource: any_pb2.Any) -> str:
    from envoy.config.cluster.v3 import cluster_pb2

    message = cluster_pb2.Cluster()
    resource.Unpack(message)
    return message.name


async def test_first_request_with_a_nonce_from_an_earlier_connection_is_answered(control_plane: ControlPlane) -> None:
    proxy = Proxy(control_plane)
    try:
        proxy.send(CLUSTER, nonce="42", version="from-another-connection")
        response = await proxy.receive()
        assert response.type_url == CLUSTER and response.resources
    finally:
        await proxy.close()


async def test_a_stream_that_sends_nothing_is_ended_after_the_first_request_limit(tmp_path: Path) -> None:
    settings = Settings(xds=XdsSettings(first_request_timeout_seconds=0.3))
    async with running(tmp_path, settings) as cp:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
            await expect_status(call, grpc.StatusCode.DEADLINE_EXCEEDED, "first-request limit of 0.3 s")


async def test_max_connection_age_makes_clients_reconnect(tmp_path: Path) -> None:
    """With a maximum connection age the server ends each connection after about that long
    (GOAWAY, then the grace period): the stream ends UNAVAILABLE, and the client reconnects
    (to this replica or another)."""
    settings = Settings(xds=XdsSettings(max_connection_age_seconds=0.5, max_connection_age_grace_seconds=0.5))
    async with running(tmp_path, settings) as cp:
        proxy = Proxy(cp)
        try:
            proxy.send(CLUSTER)
            await proxy.receive()
            await expect_status(proxy.call, grpc.StatusCode.UNAVAILABLE)
        finally:
            await proxy.close()


def test_server_options_follow_the_xds_settings() -> None:
    options = dict(server_options(keepalive_seconds=30, keepalive_timeout_seconds=10, max_connection_age_seconds=600,
                                  max_connection_age_grace_seconds=60))
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.max_connection_age_ms"] == 600_000 and options["grpc.max_connection_age_grace_ms"] == 60_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    options = dict(server_options(keepalive_seconds=None, max_connection_age_seconds=None))
    assert "grpc.max_connection_age_ms" not in options and "grpc.keepalive_timeout_ms" not in options


def test_xds_config_section_is_parsed_and_checked() -> None:
    from controlplane.config import parse_settings
    from controlplane.errors import ConfigError

    assert parse_settings({}).xds == XdsSettings()
    xds = parse_settings({"xds": {"keepalive_seconds": 20, "keepalive_timeout_seconds": 5, "first_request_timeout_seconds": None,
                                  "max_connection_age_seconds": 1800, "max_connection_age_grace_seconds": 30}}).xds
    assert xds == XdsSettings(20.0, 5.0, None, 1800.0, 30.0)
    for bad, problem in [
        ({"keepalive": 1}, "xds: unknown key(s) keepalive; allowed: first_request_timeout_seconds"),
        ({"keepalive_seconds": 0}, "xds.keepalive_seconds: expected a number of seconds > 0 or null, got 0"),
        ({"keepalive_timeout_seconds": None}, "xds.keepalive_timeout_seconds: expected a number of seconds > 0, got None"),
        ({"max_connection_age_seconds": "1h"}, "xds.max_connection_age_seconds: expected a number of seconds > 0 or null, got '1h'"),
        ({"first_request_timeout_seconds": True}, "xds.first_request_timeout_seconds"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_settings({"xds": bad})
        assert problem in str(info.value)
    with pytest.raises(ConfigError, match="xds: expected a mapping"):
        parse_settings({"xds": [1]})
