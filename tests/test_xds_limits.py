"""Stream caps and the message size limit of the xDS port, with real grpc.aio clients on loopback
(without TLS a client's identity is its IP address, so every client here is one identity)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.app import ControlPlane
from controlplane.config import Settings, XdsSettings
from controlplane.store.sqlite import open_sqlite_store
from controlplane.typeurls import CLUSTER
from controlplane.xds.peer import PeerIdentity, StreamLimiter, StreamLimits
from tests.harness import wait_for
from tests.test_xds_server import Proxy


@contextlib.asynccontextmanager
async def control_plane(tmp_path: Path, xds: XdsSettings) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(Settings(xds=xds), await open_sqlite_store(tmp_path / "state.db"))
    await cp.start("127.0.0.1:0")
    try:
        yield cp
    finally:
        await cp.stop()


def refused(cp: ControlPlane, reason: str) -> float:
    value = cp.metrics.registry.get_sample_value("bluegreen_xds_streams_refused_total", {"reason": reason})
    return value or 0.0


async def served(proxy: Proxy) -> None:
    proxy.send(CLUSTER)
    assert (await proxy.receive()).type_url == CLUSTER


async def refused_with(proxy: Proxy) -> grpc.aio.AioRpcError:
    proxy.send(CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await proxy.receive()
    return info.value


@pytest.mark.parametrize(("xds", "reason", "cap"), [
    (XdsSettings(max_streams=None, max_streams_per_identity=2), "streams_per_identity", "xds.max_streams_per_identity = 2"),
    (XdsSettings(max_streams=2), "streams_total", "xds.max_streams = 2"),
], ids=["per-identity", "total"])
async def test_stream_caps_refuse_with_resource_exhausted_and_free_slots_on_close(
        tmp_path: Path, xds: XdsSettings, reason: str, cap: str) -> None:
    async with control_plane(tmp_path, xds) as cp:
        first, second = Proxy(cp, "n1"), Proxy(cp, "n2")
        await served(first)
        await served(second)
        third = Proxy(cp, "n3")
        error = await refused_with(third)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and cap in error.details(), error.details()
        assert refused(cp, reason) == 1
        await third.close()
        await first.close()
        await second.close()
        await wait_for(lambda: cp.limiter.total == 0, timeout=10, message="closed streams released")
        again = Proxy(cp, "n4")
        await served(again)  # closing streams frees their slots
        await again.close()


async def test_oversized_request_is_refused_and_the_others_are_served(tmp_path: Path) -> None:
    async with control_plane(tmp_path, XdsSettings(max_request_bytes=64 * 1024)) as cp:
        big, small = Proxy(cp, "big"), Proxy(cp, "small")
        await served(big)
        big.outbox.put_nowait(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, resource_names=["x" * 100_000]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await big.receive()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()
        await served(small)
        await big.close()
        await small.close()


def test_limiter_counts_per_certificate_identity_and_reports_refusals() -> None:
    reasons: list[str] = []
    limiter = StreamLimiter(StreamLimits(max_streams=3, max_streams_per_identity=1), reasons.append)
    a1 = PeerIdentity("ipv4:10.0.0.1:5000", ("spiffe://example.org/edge/a",))
    a2 = PeerIdentity("ipv4:10.0.0.2:6000", ("spiffe://example.org/edge/a",))  # same certificate, other host
    b = PeerIdentity("ipv4:10.0.0.1:5001", ("spiffe://example.org/edge/b",))
    anonymous = PeerIdentity("ipv6:[::1]:7000")
    assert limiter.acquire(a1) is None and limiter.acquire(b) is None
    assert "spiffe://example.org/edge/a holds 1 streams" in (limiter.acquire(a2) or "")
    assert anonymous.key == "::1" and limiter.acquire(anonymous) is None
    assert "xds.max_streams = 3" in (limiter.acquire(PeerIdentity("ipv4:10.9.9.9:1")) or "")
    assert reasons == ["streams_per_identity", "streams_total"]
    limiter.release(a1)
    assert limiter.acquire(a2) is None and limiter.total == 3
