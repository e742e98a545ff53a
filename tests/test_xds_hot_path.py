"""The per-stream hot path of the ADS server, outside gRPC: SnapshotCache.set wakes a group's
streams in bounded batches, so that whatever else is ready on the event loop (an admin call that
stored the change) is not queued behind the fan-out; requests after a stream's first are parsed
without the node Envoy repeats in each of them."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane import typeurls
from controlplane.xds.server import SnapshotCache, _Malformed, _parser, _StreamSlot
from controlplane.xds.snapshot import Snapshot


def _cache_with_streams(count: int, wake_batch: int) -> tuple[SnapshotCache, list[_StreamSlot]]:
    cache = SnapshotCache(lambda node, peer=None: "default", wake_batch=wake_batch)
    slots = [_StreamSlot(i) for i in range(count)]
    for slot in slots:
        cache._watch("default", slot)
    return cache, slots


def _dirty(slots: list[_StreamSlot]) -> int:
    return sum(slot.dirty for slot in slots)


async def test_set_marks_at_most_one_batch_at_once_and_the_rest_in_later_loop_turns() -> None:
    cache, slots = _cache_with_streams(1000, wake_batch=100)
    cache.set("default", Snapshot.build(1, ()))
    assert _dirty(slots) == 100
    assert cache.get("default").generation == 1  # stored at once: new streams start from it
    turns = 0
    while _dirty(slots) < len(slots):
        await asyncio.sleep(0)
        turns += 1
    assert turns >= 9


async def test_other_ready_work_runs_before_the_fan_out_ends() -> None:
    cache, slots = _cache_with_streams(1000, wake_batch=100)
    published = asyncio.get_running_loop().create_future()
    dirty_when_resumed: list[int] = []

    async def admin_call() -> None:
        await published
        dirty_when_resumed.append(_dirty(slots))

    task = asyncio.create_task(admin_call())
    await asyncio.sleep(0)  # the call now waits for the publication
    cache.set("default", Snapshot.build(1, ()))
    published.set_result(None)  # what the publisher does right after set()
    await task
    assert dirty_when_resumed[0] < len(slots)
    while _dirty(slots) < len(slots):  # and the rest of the fan-out still happens
        await asyncio.sleep(0)


async def test_a_newer_snapshot_during_a_wake_wakes_every_stream_again() -> None:
    cache, slots = _cache_with_streams(300, wake_batch=100)
    cache.set("default", Snapshot.build(1, ()))
    await asyncio.sleep(0)
    woken_first = [slot for slot in slots if slot.dirty]
    for slot in woken_first:
        slot.dirty = False  # their pushers ran and read generation 1
    cache.set("default", Snapshot.build(2, ()))
    while _dirty(slots) < len(slots):
        await asyncio.sleep(0)
    assert all(slot.dirty for slot in woken_first)


async def test_a_waiting_stream_is_woken() -> None:
    cache, slots = _cache_with_streams(250, wake_batch=100)
    waiting = asyncio.create_task(slots[-1].changed())
    await asyncio.sleep(0)
    cache.set("default", Snapshot.build(1, ()))
    await asyncio.wait_for(waiting, 10)


def test_without_a_running_loop_every_stream_is_marked_at_once() -> None:
    cache, slots = _cache_with_streams(1000, wake_batch=100)
    cache.set("default", Snapshot.build(1, ()))
    assert _dirty(slots) == len(slots)


def test_wake_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="wake_batch must be at least 1, got 0"):
        SnapshotCache(lambda node, peer=None: "default", wake_batch=0)


# -- request parsing: a repeated node is not parsed again ------------------------------------

def _envoy_node(node_id: str = "envoy-1") -> base_pb2.Node:
    node = base_pb2.Node(id=node_id, cluster="default", user_agent_name="envoy")
    for i in range(150):  # Envoy lists its extensions: a node is ~17 KB
        extension = node.extensions.add()
        extension.name, extension.category = f"envoy.filters.http.x{i}", "envoy.filters.http"
    return node


def test_a_later_sotw_request_is_parsed_without_its_repeated_node() -> None:
    request = discovery_pb2.DiscoveryRequest(
        version_info="v1", node=_envoy_node(), resource_names=["default-routes"], type_url=typeurls.ROUTE,
        response_nonce="7", error_detail=status_pb2.Status(code=3, message="bad"))
    parsed = _parser(discovery_pb2.DiscoveryRequest, skip_node=2)(request.SerializeToString())
    assert isinstance(parsed, discovery_pb2.DiscoveryRequest) and not parsed.HasField("node")
    expected = discovery_pb2.DiscoveryRequest()
    expected.CopyFrom(request)
    expected.ClearField("node")
    assert parsed == expected


def test_a_later_delta_request_is_parsed_without_its_repeated_node() -> None:
    request = discovery_pb2.DeltaDiscoveryRequest(node=_envoy_node(), type_url=typeurls.CLUSTER, response_nonce="3",
                                                  resource_names_subscribe=["a"])
    parsed = _parser(discovery_pb2.DeltaDiscoveryRequest, skip_node=1)(request.SerializeToString())
    assert isinstance(parsed, discovery_pb2.DeltaDiscoveryRequest) and not parsed.HasField("node")
    assert (parsed.type_url, parsed.response_nonce, list(parsed.resource_names_subscribe)) == (typeurls.CLUSTER, "3", ["a"])


def test_a_first_request_keeps_its_node_and_a_broken_request_is_still_refused() -> None:
    data = discovery_pb2.DiscoveryRequest(node=_envoy_node(), type_url=typeurls.CLUSTER).SerializeToString()
    assert _parser(discovery_pb2.DiscoveryRequest)(data).node.id == "envoy-1"  # type: ignore[attr-defined]
    truncated = data[:-5]
    assert isinstance(_parser(discovery_pb2.DiscoveryRequest, skip_node=2)(truncated), _Malformed)
    garbage_after_node = data + b"\xff\xff\xff"
    assert isinstance(_parser(discovery_pb2.DiscoveryRequest, skip_node=2)(garbage_after_node), _Malformed)
