"""Fuzzing the ADS server with random and mutated DiscoveryRequests (hypothesis, a bounded number
of examples): it never crashes, every stream ends with a gRPC status, no stream or cap slot
leaks, and a well-behaved proxy on the same server keeps converging."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.app import ControlPlane
from controlplane.config import Settings
from controlplane.store.sqlite import open_sqlite_store
from controlplane.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.harness import wait_for
from tests.test_xds_server import Proxy

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

text = st.text(max_size=24)
nodes = st.builds(base_pb2.Node, id=text, cluster=st.sampled_from(["default", "", "nosuchfleet"]) | text)
requests = st.builds(
    discovery_pb2.DiscoveryRequest,
    version_info=text,
    node=st.none() | nodes,
    resource_names=st.lists(text, max_size=4),
    type_url=st.sampled_from([CLUSTER, ENDPOINT, LISTENER, ROUTE, ""]) | text,
    response_nonce=st.sampled_from(["", "1", "2"]) | text,
    error_detail=st.none() | st.builds(status_pb2.Status, code=st.integers(0, 16), message=text),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A serialized request with bytes flipped, cut or inserted: often not a valid message."""
    data = bytearray(draw(requests).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data)))
        if action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


messages = st.one_of(requests.map(lambda r: r.SerializeToString()), mutated(), st.binary(max_size=64))
streams = st.tuples(st.sampled_from([ADS, DELTA]), st.lists(messages, min_size=1, max_size=5))


async def run_stream(channel: grpc.aio.Channel, method: str, payloads: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send ``payloads`` raw one by one (stopping once the server has ended the stream), half-close,
    read until the server ends the stream; its status. Writing on into a call the server already
    ended makes the *client* library report INTERNAL ("Internal error from Core"), which would
    hide the status the server sent."""
    call = channel.stream_stream(method, request_serializer=bytes, response_deserializer=bytes)()

    async def drain() -> None:
        async for _ in call:
            pass

    reader = asyncio.ensure_future(drain())
    try:
        for payload in payloads:
            if call.done():
                break
            try:
                await call.write(payload)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break  # the server ended the stream meanwhile: its status tells why
        if not call.done():
            try:
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
        await asyncio.wait_for(reader, 20)
    except grpc.aio.AioRpcError:
        pass
    finally:
        reader.cancel()
    return await call.code(), await call.details() or ""


def test_fuzzed_streams_get_a_status_and_good_proxies_keep_converging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="controlplane"):
            loop.run_until_complete(_fuzz(tmp_path))
    finally:
        loop.close()
    # The server handled every bad stream as bad input (WARNING), never as a failure of its own.
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]


async def _fuzz(tmp_path: Path) -> None:
    cp = ControlPlane(Settings(), await open_sqlite_store(tmp_path / "state.db"))
    await cp.start("127.0.0.1:0")
    good = Proxy(cp, "good")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}")
    try:
        committed = await cp.operations.put_service("shop", {})
        await cp.publisher.wait_published(committed.revision)
        good.send(CLUSTER)
        first = await good.receive()
        good.send(CLUSTER, nonce=first.nonce, version=first.version_info)
        statuses: list[tuple[grpc.StatusCode, str]] = []
        loop = asyncio.get_running_loop()

        # Hypothesis drives a synchronous function: run each example's stream on this loop
        # from a worker thread (the loop keeps serving the good proxy meanwhile).
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(streams)
        def example(stream: tuple[str, list[bytes]]) -> None:
            method, payloads = stream
            statuses.append(asyncio.run_coroutine_threadsafe(run_stream(channel, method, payloads), loop).result(60))

        await asyncio.to_thread(example)
        assert len(statuses) >= 60 and all(isinstance(code, grpc.StatusCode) for code, _ in statuses)
        # A bad request is the client's fault and the status says so: never UNKNOWN, and INTERNAL
        # only as the client library's own "Internal error from Core", which grpcio reports when
        # a write of ours races the server ending the stream (its status is then lost).
        crashes = [(code, details) for code, details in statuses if code is grpc.StatusCode.UNKNOWN
                   or (code is grpc.StatusCode.INTERNAL and details != "Internal error from Core")]
        assert not crashes, f"{len(crashes)} of {len(statuses)} fuzzed streams ended {crashes}"

        # The server is alive, leaked nothing, and the good proxy converges on a new version.
        await wait_for(lambda: set(cp.ads.streams) and [s.node_id for s in cp.ads.streams.values()] == ["good"],
                       timeout=20, message="only the good proxy's stream is left")
        await wait_for(lambda: cp.limiter.total == 1, timeout=20, message="cap slots released")
        committed = await cp.operations.put_service("cart", {"prefix": "/cart"})
        await cp.publisher.wait_published(committed.revision)
        second = await good.receive()
        assert second.type_url == CLUSTER and len(second.resources) == len(first.resources) + 1
        good.send(CLUSTER, nonce=second.nonce, version=second.version_info)
        await wait_for(lambda: next(iter(cp.ads.streams.values())).types[CLUSTER].acked_version == second.version_info,
                       timeout=20, message="the good proxy ACKed the new version")
    finally:
        await good.close()
        await channel.close()
        await cp.stop()
