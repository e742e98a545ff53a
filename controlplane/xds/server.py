"""The ADS gRPC service (SotW and Delta) on grpc.aio, and the snapshot cache it serves from.

This module knows the xDS protocol and nothing of blue-green deployments: it serves whatever
snapshot the cache holds for a proxy's group ("fleet"). Observers attach through
:class:`Callbacks`; metrics and convergence tracking live outside this package.

Responses are assembled from pre-serialized bytes (see ``snapshot.py``), so the handlers are
registered with an identity response serializer: a push to N streams costs N byte joins and
N writes, no protobuf work per stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator, Callable, Protocol as TypingProtocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .snapshot import EMPTY, Snapshot
from .stream import DeltaStream, Nack, Outgoing, SotwStream, StreamState

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class UnknownGroup(Exception):
    """Raised by a group resolver for a node the cache has no snapshot group for."""


class Callbacks(TypingProtocol):
    """Observers of the ADS server. Called on the event loop, synchronously: they must not
    block. An exception in a callback is logged and does not affect the stream."""

    def stream_opened(self, stream: StreamState) -> None: ...

    def stream_closed(self, stream: StreamState) -> None: ...

    def response_sent(self, stream: StreamState, response: Outgoing) -> None: ...

    def nack_received(self, stream: StreamState, type_url: str, nack: Nack) -> None:
        """The proxy rejected our latest response of ``type_url`` (stale NACKs are not reported)."""
        ...

    def stream_changed(self, stream: StreamState) -> None:
        """After every event that may have changed what the proxy holds (ACK, NACK, push)."""
        ...


class NoCallbacks:
    def stream_opened(self, stream: StreamState) -> None:
        pass

    def stream_closed(self, stream: StreamState) -> None:
        pass

    def response_sent(self, stream: StreamState, response: Outgoing) -> None:
        pass

    def nack_received(self, stream: StreamState, type_url: str, nack: Nack) -> None:
        pass

    def stream_changed(self, stream: StreamState) -> None:
        pass


_SNAPSHOT_CHANGED = object()
_END = object()


class SnapshotCache:
    """The current snapshot of each group, and the streams watching each group.

    ``set`` is synchronous and O(streams of the group): it marks each stream dirty once; a
    stream that is busy sees only the newest snapshot when it gets to it (coalescing).
    """

    def __init__(self, resolve_group: Callable[[base_pb2.Node], str]) -> None:
        self._resolve = resolve_group
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, dict[int, _StreamSlot]] = {}

    def resolve(self, node: base_pb2.Node) -> str:
        return self._resolve(node)

    def get(self, group: str) -> Snapshot:
        return self._snapshots.get(group, EMPTY)

    def set(self, group: str, snapshot: Snapshot) -> None:
        current = self._snapshots.get(group)
        if current is not None and snapshot.generation < current.generation:
            raise ValueError(f"snapshot generation went backwards for {group}: {snapshot.generation} < {current.generation}")
        self._snapshots[group] = snapshot
        for slot in self._watchers.get(group, {}).values():
            slot.notify()

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def _watch(self, group: str, slot: _StreamSlot) -> None:
        self._watchers.setdefault(group, {})[slot.stream_id] = slot

    def _unwatch(self, group: str, slot: _StreamSlot) -> None:
        self._watchers.get(group, {}).pop(slot.stream_id, None)


class _StreamSlot:
    """The inbox of one stream: requests from the proxy and snapshot-change marks."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.dirty = False

    def notify(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.queue.put_nowait(_SNAPSHOT_CHANGED)


class AdsServer:
    """Serves ``StreamAggregatedResources`` and ``DeltaAggregatedResources`` from a cache."""

    def __init__(self, cache: SnapshotCache, callbacks: Callbacks | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.callbacks: Callbacks = callbacks or NoCallbacks()
        self._clock = clock
        self._ids = itertools.count(1)
        self.streams: dict[int, StreamState] = {}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    async def _sotw(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext) -> None:
        await self._serve(SotwStream, requests, context)

    async def _delta(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext) -> None:
        await self._serve(DeltaStream, requests, context)

    async def _serve(self, kind: type[SotwStream] | type[DeltaStream], requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        iterator = requests.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            return
        node = first.node
        try:
            group = self.cache.resolve(node)
        except UnknownGroup as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return
        stream_id = next(self._ids)
        stream = kind(stream_id, node.id, group, self.cache.get(group), self._clock())
        slot = _StreamSlot(stream_id)
        self.streams[stream_id] = stream
        self.cache._watch(group, slot)

        async def read() -> None:
            try:
                async for request in iterator:
                    slot.queue.put_nowait(request)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            except Exception:  # a malformed message or a broken transport ends the stream
                log.exception("reading stream %s of %s", stream_id, node.id)
            finally:
                slot.queue.put_nowait(_END)

        reader = asyncio.create_task(read())
        self._notify(self.callbacks.stream_opened, stream)
        try:
            await self._handle(stream, first, context)
            while True:
                item = await slot.queue.get()
                if item is _END:
                    break
                if item is _SNAPSHOT_CHANGED:
                    slot.dirty = False
                    out = stream.on_snapshot(self.cache.get(group))
                    await self._write(stream, out, context)
                else:
                    await self._handle(stream, item, context)
        finally:
            reader.cancel()
            self.cache._unwatch(group, slot)
            self.streams.pop(stream_id, None)
            self._notify(self.callbacks.stream_closed, stream)

    async def _handle(self, stream: StreamState, request: object, context: grpc.aio.ServicerContext) -> None:
        type_url = request.type_url  # type: ignore[attr-defined]
        state = stream.types.get(type_url)
        nacks_before = state.nacks if state is not None else 0
        out = stream.on_request(request, self._clock())  # type: ignore[attr-defined]
        state = stream.types.get(type_url)
        if state is not None and state.nacks > nacks_before and state.last_nack is not None:
            self._notify(self.callbacks.nack_received, stream, type_url, state.last_nack)
        await self._write(stream, out, context)

    async def _write(self, stream: StreamState, out: list[Outgoing], context: grpc.aio.ServicerContext) -> None:
        for response in out:
            await context.write(response.payload)
            self._notify(self.callbacks.response_sent, stream, response)
        self._notify(self.callbacks.stream_changed, stream)

    def _notify(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("xDS callback %s failed", getattr(callback, "__name__", callback))


def _identity(payload: bytes) -> bytes:
    return payload
