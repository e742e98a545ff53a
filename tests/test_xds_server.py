"""The gRPC ADS driver, with a real grpc.aio client on loopback playing a proxy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from controlplane.app import ControlPlane
from controlplane.config import Settings
from controlplane.store.sqlite import open_sqlite_store
from controlplane.typeurls import CLUSTER, LISTENER
from controlplane.xds.stream import SotwStream
from tests.harness import wait_for


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(Settings(), await open_sqlite_store(tmp_path / "state.db"))
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

    def send(self, type_url: str, *, nonce: str = "", version: str = "", error: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, version_info=version)
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
        # Each answer carries the snapshot's pre-serialized resources, byte for byte.
        snapshot = cp.cache.get("default")
        expected = [any_pb2.Any.FromString(snapshot.of_type(LISTENER)[n].any_bytes) for n in sorted(snapshot.of_type(LISTENER))]
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
