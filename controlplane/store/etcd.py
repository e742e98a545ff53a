"""etcd backend of the store: several control-plane replicas share one state.

The client is etcd's own gRPC API (v3.4), compiled from ``protos/etcd/`` into
``controlplane._protos.etcd`` and called over ``grpc.aio`` (the runtime the xDS server already
uses). Why not ``aetcd``: it talks to one endpoint only (a replica must survive the loss of an
etcd member, which a gRPC channel over every member's address gives us for free), and it
registers generic file names (``rpc.proto``, ``kv.proto``) in the process-wide descriptor pool.

Key layout under the configured prefix (``/bluegreen/`` by default)::

    <prefix>services/<name>, <prefix>deployments/...    config: what proxies are served
    <prefix>cluster/...                                  coordination: leader, replicas, proxy
                                                         summaries, telemetry (leased keys)
    <prefix>cluster/config-revision                      the config marker (below)

**Config revision.** etcd has one global revision; coordination writes (lease refreshes, proxy
summaries) bump it too, and must neither trigger a publication nor change a snapshot's
generation. So every transaction that writes a config key also rewrites the marker key, and:

* :meth:`EtcdStore.list` of a config prefix reports the marker's ``mod_revision`` read in the
  same transaction (a consistent snapshot), not etcd's header revision;
* :meth:`EtcdStore.revision` is the marker's ``mod_revision``;
* :meth:`EtcdStore.watch` follows only the marker key.

Every replica therefore derives the same generation from the same config state, and a deletion
moves the generation too (which a "max mod_revision of the listed keys" would miss).

**Failures.** Every call has a deadline (``timeout``) and waits for a connection meanwhile
(``wait_for_ready``): the channel fails over between the members by itself. A failed call
raises :class:`StoreError` naming the store (``etcd at 127.0.0.1:2379,...: ...``). A commit that
timed out *after* it was sent may have been applied (etcd cannot tell us); the watch will show
it if it was, and the callers' writes are compare-and-set, so a retry never applies a change on
top of a state it did not read. Watches reconnect with backoff from the last revision seen; if
that revision was compacted, they re-read the current one (readers re-list everything anyway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

import grpc

from .._protos.etcd.etcdserverpb import rpc_pb2
from .._protos.etcd.mvccpb import kv_pb2
from ..errors import RevisionConflict, StoreError
from .base import Entry, Listing, Txn

log = logging.getLogger(__name__)

COORDINATION = "cluster/"  # keys under this sub-prefix are not config: no publish, no generation
CONFIG_MARKER = COORDINATION + "config-revision"
DEFAULT_PREFIX = "/bluegreen/"
# etcd answers a watch on a member that lost its raft leader only with this metadata (clientv3's
# WithRequireLeader): otherwise a partitioned member's watch would stay silent forever.
_REQUIRE_LEADER = (("hasleader", "true"),)


class LeaseLost(StoreError):
    """A lease expired or was revoked: the keys attached to it are gone."""


def is_config_key(key: str) -> bool:
    return not key.startswith(COORDINATION)


@dataclass
class _Follower:
    """One watched key range, followed by a background task; subscribers wait on ``changed``."""

    key: bytes
    range_end: bytes
    revision: int = 0
    task: asyncio.Task[None] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class EtcdStore:
    """A :class:`~controlplane.store.base.KVStore` in etcd (v3 API), plus leases and prefix
    watches for the coordination of replicas (:mod:`controlplane.cluster`)."""

    def __init__(self, endpoints: list[str], prefix: str = DEFAULT_PREFIX, *, timeout: float = 3.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint")
        self.endpoints = list(endpoints)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.timeout = timeout
        self.name = f"etcd at {','.join(self.endpoints)}"
        # One channel over every member: pick_first tries them in order and moves on when the
        # connected member goes away. Reconnect backoff is capped low so that a replica notices
        # etcd's return within a second, not after gRPC's default two minutes.
        self._channel = grpc.aio.insecure_channel(
            "ipv4:" + ",".join(self.endpoints),
            options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
                     ("grpc.min_reconnect_backoff_ms", 100), ("grpc.enable_retries", 1),
                     ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1)],
        )
        self._range = self._unary("/etcdserverpb.KV/Range", rpc_pb2.RangeRequest, rpc_pb2.RangeResponse)
        self._txn = self._unary("/etcdserverpb.KV/Txn", rpc_pb2.TxnRequest, rpc_pb2.TxnResponse)
        self._grant = self._unary("/etcdserverpb.Lease/LeaseGrant", rpc_pb2.LeaseGrantRequest, rpc_pb2.LeaseGrantResponse)
        self._revoke = self._unary("/etcdserverpb.Lease/LeaseRevoke", rpc_pb2.LeaseRevokeRequest, rpc_pb2.LeaseRevokeResponse)
        self._watch_rpc = self._channel.stream_stream(
            "/etcdserverpb.Watch/Watch", request_serializer=rpc_pb2.WatchRequest.SerializeToString,
            response_deserializer=rpc_pb2.WatchResponse.FromString)
        self._keepalive_rpc = self._channel.stream_stream(
            "/etcdserverpb.Lease/LeaseKeepAlive", request_serializer=rpc_pb2.LeaseKeepAliveRequest.SerializeToString,
            response_deserializer=rpc_pb2.LeaseKeepAliveResponse.FromString)
        self._followers: dict[tuple[bytes, bytes], _Follower] = {}
        self._closed = False

    def _unary(self, method: str, request: Any, response: Any) -> grpc.aio.UnaryUnaryMultiCallable:
        return self._channel.unary_unary(method, request_serializer=request.SerializeToString,
                                         response_deserializer=response.FromString)

    async def open(self) -> EtcdStore:
        """Check that etcd answers (raises StoreError naming the endpoints otherwise)."""
        await self.revision()
        return self

    # -- helpers -------------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _unkey(self, raw: bytes) -> str:
        return raw.decode()[len(self.prefix):]

    async def _call(self, rpc: grpc.aio.UnaryUnaryMultiCallable, request: Any, what: str) -> Any:
        if self._closed:
            raise StoreError(f"{self.name}: store is closed")
        try:
            return await rpc(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise StoreError(self._describe(exc, what)) from exc

    def _describe(self, exc: grpc.aio.AioRpcError, what: str) -> str:
        code = exc.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            cause = f"no answer within {self.timeout:g}s (no member reachable, or no raft leader)"
            if what == "commit":
                cause += "; the write may or may not have been applied"
        else:
            cause = f"{code.name}: {exc.details()}"
        return f"{self.name}: {what} failed: {cause}"

    @staticmethod
    def _encode(value: Mapping[str, Any]) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    def _entry(self, kv: kv_pb2.KeyValue) -> Entry:
        return Entry(self._unkey(kv.key), json.loads(kv.value), kv.mod_revision)

    # -- KVStore -------------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        response = await self._call(self._range, rpc_pb2.RangeRequest(key=self._key(key)), "read")
        return self._entry(response.kvs[0]) if response.kvs else None

    async def list(self, prefix: str, *, unchanged: Mapping[str, int] | None = None) -> Listing:
        known = unchanged or {}
        start = self._key(prefix)
        scan = rpc_pb2.RangeRequest(key=start, range_end=_prefix_end(start))
        if is_config_key(prefix):
            # Both reads in one transaction: the marker's revision is that of the listed state.
            marker = rpc_pb2.RangeRequest(key=self._key(CONFIG_MARKER))
            response = await self._call(self._txn, rpc_pb2.TxnRequest(success=[
                rpc_pb2.RequestOp(request_range=marker), rpc_pb2.RequestOp(request_range=scan)]), "read")
            marker_kvs = response.responses[0].response_range.kvs
            revision = marker_kvs[0].mod_revision if marker_kvs else 0
            kvs = response.responses[1].response_range.kvs
        else:
            range_response = await self._call(self._range, scan, "read")
            revision, kvs = range_response.header.revision, range_response.kvs
        kept: list[str] = []
        entries: list[Entry] = []
        config = is_config_key(prefix)
        for kv in kvs:
            key = self._unkey(kv.key)
            if config and not is_config_key(key):
                continue  # list("") of the config: the coordination keys are not part of it
            if known.get(key) == kv.mod_revision:
                kept.append(key)
            else:
                entries.append(Entry(key, json.loads(kv.value), kv.mod_revision))
        return Listing(revision, tuple(entries), tuple(kept))

    async def commit(self, txn: Txn) -> int:
        if not txn.puts and not txn.deletes:
            raise ValueError("empty transaction")
        compares = [rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.MOD,
                                    key=self._key(key), mod_revision=revision)
                    for key, revision in txn.compares.items()]
        ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
            key=self._key(key), value=self._encode(value), lease=txn.leases.get(key, 0)))
            for key, value in txn.puts.items()]
        ops += [rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=self._key(key)))
                for key in txn.deletes]
        if any(is_config_key(k) for k in (*txn.puts, *txn.deletes)):
            ops.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=self._key(CONFIG_MARKER), value=b"{}")))
        # On a failed compare, read the compared keys back so the error names what differed.
        failure = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=self._key(key), keys_only=True))
                   for key in txn.compares]
        response = await self._call(self._txn, rpc_pb2.TxnRequest(compare=compares, success=ops, failure=failure), "commit")
        if not response.succeeded:
            found = {self._unkey(kv.key): kv.mod_revision for r in response.responses for kv in r.response_range.kvs}
            differ = [f"{key}: expected revision {want}, found {found.get(key, 0)}"
                      for key, want in txn.compares.items() if found.get(key, 0) != want]
            raise RevisionConflict("; ".join(differ) or "a compared key changed")
        return int(response.header.revision)

    async def revision(self) -> int:
        response = await self._call(self._range, rpc_pb2.RangeRequest(key=self._key(CONFIG_MARKER)), "read")
        return int(response.kvs[0].mod_revision) if response.kvs else 0

    async def watch(self) -> AsyncIterator[int]:
        """The config revision now, then after every config change (coalesced)."""
        marker = self._key(CONFIG_MARKER)
        async for revision in self._follow(marker, b""):
            yield revision

    async def watch_prefix(self, prefix: str) -> AsyncIterator[int]:
        """Like :meth:`watch`, for any prefix (coordination keys): yields etcd's revision of the
        latest change seen under it, coalesced. Readers re-list the prefix after each."""
        start = self._key(prefix)
        async for revision in self._follow(start, _prefix_end(start)):
            yield revision

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for follower in self._followers.values():
            if follower.task is not None:
                follower.task.cancel()
            async with follower.changed:
                follower.changed.notify_all()
        for follower in self._followers.values():
            if follower.task is not None:
                try:
                    await follower.task
                except (asyncio.CancelledError, Exception):
                    pass
        await self._channel.close()

    # -- leases (coordination) ---------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        response = await self._call(self._grant, rpc_pb2.LeaseGrantRequest(TTL=ttl), "lease grant")
        if response.error:
            raise StoreError(f"{self.name}: lease grant failed: {response.error}")
        return int(response.ID)

    async def revoke_lease(self, lease: int) -> None:
        try:
            await self._call(self._revoke, rpc_pb2.LeaseRevokeRequest(ID=lease), "lease revoke")
        except StoreError as exc:
            if "not found" not in str(exc):
                raise

    async def keep_alive(self, lease: int, ttl: float, *, clock: Any = time.monotonic) -> None:
        """Refresh ``lease`` every ttl/3 until cancelled. Raises :class:`LeaseLost` once the
        lease is gone (etcd answered TTL 0) or could not be refreshed for ``ttl`` seconds."""
        refreshed = clock()
        while True:
            call = self._keepalive_rpc(wait_for_ready=True, metadata=_REQUIRE_LEADER)
            try:
                while True:
                    await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease))
                    response = await asyncio.wait_for(call.read(), timeout=max(0.1, ttl - (clock() - refreshed)))
                    if response is grpc.aio.EOF:
                        break
                    if response.TTL <= 0:
                        raise LeaseLost(f"{self.name}: lease {lease:x} expired")
                    refreshed = clock()
                    await asyncio.sleep(ttl / 3)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, grpc.aio.UsageError) as exc:
                log.warning("%s: refreshing lease %x failed: %r", self.name, lease, exc)
            finally:
                call.cancel()  # a stream per attempt: never leave the old one open
            if clock() - refreshed >= ttl:
                raise LeaseLost(f"{self.name}: lease {lease:x} could not be refreshed for {ttl:g}s")
            await asyncio.sleep(min(0.2, ttl / 10))

    # -- watches --------------------------------------------------------------------------------

    async def _follow(self, key: bytes, range_end: bytes) -> AsyncIterator[int]:
        follower = self._followers.get((key, range_end))
        if follower is None:
            follower = _Follower(key, range_end)
            follower.revision = await self._current(follower)
            self._followers[(key, range_end)] = follower
            follower.task = asyncio.create_task(self._run_follower(follower), name=f"etcd-watch {key!r}")
        seen = follower.revision
        yield seen
        while not self._closed:
            async with follower.changed:
                await follower.changed.wait_for(lambda: follower.revision > seen or self._closed)
            if self._closed:
                return
            seen = follower.revision
            yield seen

    async def _current(self, follower: _Follower) -> int:
        """The revision a follower reports for the current state (after a compaction too)."""
        if follower.range_end == b"":  # the config marker
            return await self.revision()
        response = await self._call(self._range, rpc_pb2.RangeRequest(
            key=follower.key, range_end=follower.range_end, count_only=True), "read")
        return int(response.header.revision)

    async def _advance(self, follower: _Follower, revision: int) -> None:
        if revision > follower.revision:
            async with follower.changed:
                follower.revision = revision
                follower.changed.notify_all()

    async def _run_follower(self, follower: _Follower) -> None:
        failures = 0
        start = follower.revision + 1
        while not self._closed:
            call = self._watch_rpc(wait_for_ready=True, metadata=_REQUIRE_LEADER)
            try:
                await call.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                    key=follower.key, range_end=follower.range_end, start_revision=start)))
                async for response in call:
                    failures = 0
                    if response.compact_revision:
                        # History gone: re-read the present (readers re-list everything).
                        log.warning("%s: watch from revision %d was compacted (now %d); re-reading",
                                    self.name, start, response.compact_revision)
                        current = await self._current(follower)
                        await self._advance(follower, max(current, follower.revision + 1))
                        start = current + 1
                        break
                    if response.canceled:
                        raise StoreError(f"{self.name}: watch canceled: {response.cancel_reason}")
                    for event in response.events:
                        await self._advance(follower, int(event.kv.mod_revision))
                        start = max(start, int(event.kv.mod_revision) + 1)
                else:
                    raise StoreError(f"{self.name}: watch stream ended")
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, StoreError) as exc:
                failures += 1
                delay = random.random() * min(2.0, 0.1 * 2 ** min(failures, 10))
                log.warning("%s: watch interrupted (%s); resuming from revision %d in %.2fs",
                            self.name, _brief(exc), start, delay)
                await asyncio.sleep(delay)
            finally:
                call.cancel()


def _brief(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix": the prefix with its last byte + 1."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


async def open_etcd_store(endpoints: list[str], prefix: str = DEFAULT_PREFIX, *, timeout: float = 3.0) -> EtcdStore:
    store = EtcdStore(endpoints, prefix, timeout=timeout)
    try:
        return await store.open()
    except BaseException:
        await store.close()
        raise
