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
from collections import deque
from typing import AsyncIterator, Callable, Protocol as TypingProtocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from .peer import PeerIdentity, StreamLimiter
from .snapshot import EMPTY, Snapshot
from .stream import DeltaStream, Nack, Outgoing, ProtocolError, SotwStream, StreamState

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def server_options(*, keepalive_seconds: float | None = 30.0, keepalive_timeout_seconds: float = 10.0,
                   max_connection_age_seconds: float | None = None, max_connection_age_grace_seconds: float = 60.0,
                   ) -> list[tuple[str, int]]:
    """grpc channel options for the ADS server's connection liveness.

    ``keepalive_seconds``: the server pings a connection idle that long, and closes it if the
    ping is not answered within ``keepalive_timeout_seconds``: a proxy whose host vanished
    (half-open TCP) stops counting as connected. None: no server pings.
    ``max_connection_age_seconds``: the server asks each client to reconnect (GOAWAY) after
    about that long; grpc core spreads it by +-10 % so reconnects do not come in lock step, and
    a replica added later gets its share. Streams still open get ``max_connection_age_grace_seconds``
    to finish before the connection is closed. None: connections live as long as they are healthy.

    Client pings are allowed every 5 s even without calls (Envoy's default keepalive is off;
    a gRPC client set to ping often is refused with GOAWAY after repeated strikes).
    """
    options: list[tuple[str, int]] = [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if keepalive_seconds is not None:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_seconds * 1000)),
        ]
    else:
        options.append(("grpc.keepalive_time_ms", 2**31 - 1))  # grpc's "never"
    if max_connection_age_seconds is not None:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_seconds * 1000)),
        ]
    return options


class _Malformed:
    """A request that did not parse; handed to the handler, which ends the stream with it."""

    __slots__ = ("kind", "error")

    def __init__(self, kind: str, error: Exception) -> None:
        self.kind = kind
        self.error = error


def _parser(message_type: type, *, skip_node: int | None = None) -> Callable[[bytes], object]:
    """A request parser. With ``skip_node`` (the node's field number), a node among the first
    two fields of a request is cut out before parsing: the server reads the node of a stream's
    first request only, Envoy repeats it in every request (unless set_node_on_first_message_only),
    and a node lists Envoy's extensions: ~17 KB, 12 µs to parse, against 0.4 µs for the rest of
    an ACK. Requests below ``_SKIP_NODE_ABOVE`` bytes carry no such node and are parsed whole."""

    def parse(data: bytes) -> object:
        if skip_node is not None and len(data) > _SKIP_NODE_ABOVE:
            data = _without_leading_field(data, skip_node)
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as exc:
            return _Malformed(message_type.__name__, exc)

    return parse


_SKIP_NODE_ABOVE = 512


def _without_leading_field(data: bytes, field_number: int) -> bytes:
    """``data`` without length-delimited field ``field_number`` if it is one of the message's
    first two fields (where protobuf encoders put a DiscoveryRequest's node: field 2 after
    version_info, a DeltaDiscoveryRequest's: field 1); ``data`` unchanged otherwise, or if the
    framing is not what it should be (the full parse then reports the problem)."""
    position = 0
    for _ in range(2):
        start = position
        tag, position = _read_varint(data, position)
        if tag is None or tag & 7 != 2:
            return data
        length, position = _read_varint(data, position)
        if length is None or position + length > len(data):
            return data
        position += length
        if tag >> 3 == field_number:
            return data[:start] + data[position:]
    return data


def _read_varint(data: bytes, position: int) -> tuple[int | None, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, position


class UnknownGroup(Exception):
    """Raised by a group resolver for a node the cache has no snapshot group for."""


class PermissionDenied(Exception):
    """Raised by a group resolver when the stream's peer identity may not join the group the
    node claims; the stream ends with PERMISSION_DENIED and this message."""


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


# Streams woken per event-loop turn after a new snapshot. Waking all N at once queued N pusher
# steps ahead of everything else on the loop: an admin call that had stored a change waited
# behind the whole fan-out (533 ms p50 at 5000 streams, bench/RESULTS.md section 4b). In bounded
# batches, other work waits for at most one batch between two of them. 32, not 128: with 128,
# the admin call's wake-up waited ~40 ms behind the first batch at 5000 streams (API p50 41 ms
# against 17 ms with 32, in one session on this machine; bench/RESULTS.md section 6).
WAKE_BATCH = 32


class SnapshotCache:
    """The current snapshot of each group, and the streams watching each group.

    ``set`` is synchronous: it stores the snapshot and marks the group's streams dirty, at
    most ``wake_batch`` of them at once and the rest in later turns of the running event loop
    (all at once when no loop runs); a stream that is busy sees only the newest snapshot when
    it gets to it (coalescing). ``set`` returns in O(wake_batch), not O(streams).
    """

    def __init__(self, resolve_group: Callable[[base_pb2.Node, PeerIdentity | None], str], *,
                 wake_batch: int = WAKE_BATCH) -> None:
        if wake_batch < 1:
            raise ValueError(f"wake_batch must be at least 1, got {wake_batch}")
        self._resolve = resolve_group
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, dict[int, _StreamSlot]] = {}
        self._wake_batch = wake_batch
        self._to_wake: dict[str, deque[_StreamSlot]] = {}  # groups with a wake in progress

    def resolve(self, node: base_pb2.Node, peer: PeerIdentity | None = None) -> str:
        """The group of ``node``; raises UnknownGroup, or PermissionDenied if ``peer`` (the
        transport identity; None when unknown) may not join it."""
        return self._resolve(node, peer)

    def get(self, group: str) -> Snapshot:
        return self._snapshots.get(group, EMPTY)

    def set(self, group: str, snapshot: Snapshot) -> None:
        current = self._snapshots.get(group)
        if current is not None and snapshot.generation < current.generation:
            raise ValueError(f"snapshot generation went backwards for {group}: {snapshot.generation} < {current.generation}")
        self._snapshots[group] = snapshot
        watchers = self._watchers.get(group)
        if not watchers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or len(watchers) <= self._wake_batch:
            self._to_wake.pop(group, None)  # every stream is marked now; a wake in progress has nothing left
            for slot in watchers.values():
                slot.notify()
            return
        in_progress = group in self._to_wake
        # Every watcher again, in order: the ones a wake in progress already marked are still
        # dirty (their pusher has not run) or will read this snapshot when it does.
        self._to_wake[group] = deque(watchers.values())
        if not in_progress:
            self._wake_some(group, loop)

    def _wake_some(self, group: str, loop: asyncio.AbstractEventLoop) -> None:
        queue = self._to_wake.get(group)
        if queue is None:
            return
        for _ in range(min(self._wake_batch, len(queue))):
            queue.popleft().notify()  # a slot whose stream has ended meanwhile ignores it
        if queue:
            loop.call_soon(self._wake_some, group, loop)
        else:
            del self._to_wake[group]

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def _watch(self, group: str, slot: _StreamSlot) -> None:
        self._watchers.setdefault(group, {})[slot.stream_id] = slot

    def _unwatch(self, group: str, slot: _StreamSlot) -> None:
        self._watchers.get(group, {}).pop(slot.stream_id, None)


class _StreamSlot:
    """One stream's snapshot-change mark and its write lane.

    The stream's handler reads the proxy's requests and handles each inline; a second task
    (the pusher) waits for snapshot changes. Both produce responses, and gRPC allows one write
    in flight per call, so responses go through a FIFO lane: whoever finds it idle drains it,
    and the other only appends. The order of the lane is the order in which the (synchronous)
    state machine produced the responses.
    """

    __slots__ = ("stream_id", "dirty", "_waiter", "pending", "writing", "failure")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.dirty = False
        self._waiter: asyncio.Future[None] | None = None
        self.pending: deque[Outgoing] = deque()
        self.writing = False
        self.failure: Exception | None = None

    def notify(self) -> None:
        if not self.dirty:
            self.dirty = True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        """Return once the group's snapshot changed since the last return."""
        if not self.dirty:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.dirty = False


class AdsServer:
    """Serves ``StreamAggregatedResources`` and ``DeltaAggregatedResources`` from a cache."""

    def __init__(self, cache: SnapshotCache, callbacks: Callbacks | None = None, clock: Callable[[], float] = time.time,
                 first_request_timeout: float | None = None, limiter: StreamLimiter | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        """``first_request_timeout``: seconds a new stream may take to send its first request
        before it is ended with DEADLINE_EXCEEDED (None: no limit). A peer that opens streams
        and says nothing would otherwise hold a handler each forever. ``limiter`` caps
        concurrent streams (shared with other services of the same server); ``on_refused(reason)``
        is told of each stream refused by the resolver (``fleet_not_allowed``); refusals by caps
        are reported by the limiter itself."""
        self.cache = cache
        self.first_request_timeout = first_request_timeout
        self.callbacks: Callbacks = callbacks or NoCallbacks()
        self.limiter = limiter or StreamLimiter()
        self._on_refused = on_refused
        self._peers: dict[int, PeerIdentity] = {}  # stream id -> transport identity
        self._by_node: dict[str, set[int]] = {}  # node id -> open stream ids
        self._clock = clock
        self._ids = itertools.count(1)
        self.streams: dict[int, StreamState] = {}
        # Certificate names holding a node id in other processes serving the same fleet (xDS
        # workers, see workers/): the node-id ownership check covers them too.
        self.other_holders: Callable[[str], set[tuple[str, ...]]] = lambda node_id: set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw,
                request_deserializer=_identity,  # parsed by the handler: see _parser
                response_serializer=_identity,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta,
                request_deserializer=_identity,  # parsed by the handler: see _parser
                response_serializer=_identity,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    async def _sotw(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext) -> None:
        await self._serve(SotwStream, requests, context)

    async def _delta(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext) -> None:
        await self._serve(DeltaStream, requests, context)

    async def _serve(self, kind: type[SotwStream] | type[DeltaStream], requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        peer = PeerIdentity.from_context(context)
        refusal = self.limiter.acquire(peer)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            return
        try:
            await self._serve_admitted(kind, requests, context, peer)
        finally:
            self.limiter.release(peer)

    async def _serve_admitted(self, kind: type[SotwStream] | type[DeltaStream], requests: AsyncIterator,  # type: ignore[type-arg]
                              context: grpc.aio.ServicerContext, peer: PeerIdentity) -> None:
        iterator = requests.__aiter__()
        parse_first, parse_next = _PARSERS[kind]
        try:
            async with asyncio.timeout(self.first_request_timeout):
                first = parse_first(await iterator.__anext__())
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no request within the first-request limit of {self.first_request_timeout:g} s")
            return
        if isinstance(first, _Malformed):
            log.warning("refused a stream from %s: %s", context.peer(), _describe(first))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _describe(first))
            return
        node = first.node
        try:
            group = self.cache.resolve(node, peer)
        except UnknownGroup as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return
        except PermissionDenied as exc:
            self._notify(self._on_refused or _ignore, "fleet_not_allowed")
            log.warning("refused xDS stream of node %r from %s: %s", node.id, peer.describe(), exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return
        holders = {self._peers[i].names for i in self._by_node.get(node.id, ()) if i in self._peers}
        holders |= self.other_holders(node.id)
        if peer.authenticated and holders and peer.names not in holders:
            # Under mTLS a node id belongs to the certificate whose stream holds it: another
            # certificate could otherwise pose as that node (its telemetry is believed by node).
            self._notify(self._on_refused or _ignore, "node_id_in_use")
            message = (f"node id {node.id!r} is in use by a stream with another certificate; "
                       f"{peer.describe()} may not take it over while that stream is open")
            log.warning("refused xDS stream from %s: %s", peer.describe(), message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
            return
        stream_id = next(self._ids)
        stream = kind(stream_id, node.id, group, self.cache.get(group), self._clock())
        slot = _StreamSlot(stream_id)
        self.streams[stream_id] = stream
        self._peers[stream_id] = peer
        self._by_node.setdefault(node.id, set()).add(stream_id)
        self.cache._watch(group, slot)
        self._notify(self.callbacks.stream_opened, stream)
        handler = asyncio.current_task()
        assert handler is not None
        pusher = asyncio.create_task(self._push_changes(stream, slot, context, handler))
        try:
            await self._handle(stream, slot, first, context)
            async for data in iterator:
                await self._handle(stream, slot, parse_next(data), context)
        except grpc.aio.AioRpcError:
            pass
        except ProtocolError as exc:
            log.warning("ended stream %s of %s: %s", stream_id, node.id, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            if slot.failure is None:
                raise
            # The pusher failed (a bug): end the stream with an error; the proxy reconnects.
            await context.abort(grpc.StatusCode.INTERNAL, f"control plane error: {slot.failure!r}")
        except Exception:  # a malformed message or a broken transport ends the stream
            log.exception("serving stream %s of %s", stream_id, node.id)
            raise
        finally:
            pusher.cancel()
            self.cache._unwatch(group, slot)
            self.streams.pop(stream_id, None)
            self._peers.pop(stream_id, None)
            node_streams = self._by_node.get(node.id)
            if node_streams is not None:
                node_streams.discard(stream_id)
                if not node_streams:
                    del self._by_node[node.id]
            self._notify(self.callbacks.stream_closed, stream)

    def streams_of(self, node_id: str) -> list[tuple[StreamState, PeerIdentity]]:
        """The open streams of ``node_id`` with the transport identity of each (O(its streams))."""
        return [(self.streams[i], self._peers[i]) for i in self._by_node.get(node_id, ()) if i in self.streams]

    async def _push_changes(self, stream: StreamState, slot: _StreamSlot, context: grpc.aio.ServicerContext,
                            handler: asyncio.Task[object]) -> None:
        """The pusher: plan and send what each new snapshot of the stream's group changes."""
        try:
            while True:
                await slot.changed()
                out = stream.on_snapshot(self.cache.get(stream.fleet))
                await self._send(stream, slot, out, context)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass  # the stream is ending; its handler cleans up
        except Exception as exc:
            log.exception("pushing to stream %s of %s", stream.stream_id, stream.node_id)
            slot.failure = exc
            handler.cancel()

    async def _handle(self, stream: StreamState, slot: _StreamSlot, request: object, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, _Malformed):
            raise ProtocolError(_describe(request))
        type_url = request.type_url  # type: ignore[attr-defined]
        state = stream.types.get(type_url)
        nacks_before = state.nacks if state is not None else 0
        out = stream.on_request(request, self._clock())  # type: ignore[attr-defined]
        state = stream.types.get(type_url)
        if state is not None and state.nacks > nacks_before and state.last_nack is not None:
            self._notify(self.callbacks.nack_received, stream, type_url, state.last_nack)
        await self._send(stream, slot, out, context)

    async def _send(self, stream: StreamState, slot: _StreamSlot, out: list[Outgoing], context: grpc.aio.ServicerContext) -> None:
        """Queue ``out`` on the stream's lane and, unless a write is already in flight, drain it."""
        slot.pending.extend(out)
        if not slot.writing:
            slot.writing = True
            try:
                while slot.pending:
                    response = slot.pending.popleft()
                    await context.write(response.payload)
                    self._notify(self.callbacks.response_sent, stream, response)
            finally:
                slot.writing = False
        self._notify(self.callbacks.stream_changed, stream)

    def _notify(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("xDS callback %s failed", getattr(callback, "__name__", callback))


# By stream kind: the parser of a stream's first request (whole: its node says who the proxy
# is) and of the later ones (their node, if repeated, is not read).
_PARSERS: dict[type[StreamState], tuple[Callable[[bytes], object], Callable[[bytes], object]]] = {
    SotwStream: (_parser(discovery_pb2.DiscoveryRequest), _parser(discovery_pb2.DiscoveryRequest, skip_node=2)),
    DeltaStream: (_parser(discovery_pb2.DeltaDiscoveryRequest), _parser(discovery_pb2.DeltaDiscoveryRequest, skip_node=1)),
}


def _describe(malformed: _Malformed) -> str:
    return f"malformed {malformed.kind}: {malformed.error}"


def _identity(payload: bytes) -> bytes:
    return payload


def _ignore(*args: object) -> None:
    pass
