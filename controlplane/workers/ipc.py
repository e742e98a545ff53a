"""The pipe between the main process and an xDS worker: framing, and snapshot shipping.

Frames are a 4-byte big-endian length and a pickle. Both ends are our own code started from
the same installation (the main process spawns the workers over a socketpair nobody else
holds), so pickle's trust model holds: nothing on the pipe comes from a proxy or the network.

Snapshots travel as *changes*: per fleet, the generation and, per type, either nothing (the
pool is the same as the one shipped before) or the resources added or changed and the names
removed. Resources are already serialized (``xds.snapshot.Resource``), so shipping costs a
pickle of their bytes, built once per publication and written to every worker. A worker that
starts (or restarts) is sent the full snapshots first.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from ..xds.snapshot import Resource, Snapshot

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 31  # a 5,000-service snapshot is tens of MB; anything near this is a bug


def encode(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) >= MAX_FRAME:
        raise ValueError(f"IPC message of {len(payload)} bytes is too large")
    return _LENGTH.pack(len(payload)) + payload


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message; raises asyncio.IncompleteReadError at end of stream (the peer is gone)."""
    header = await reader.readexactly(_LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(await reader.readexactly(length))


# A resource on the pipe: its serialized Any and what it depends on, not the two wire fragments
# derived from it (a third of the bytes; rebuilt by concatenation, the version is not rehashed).
Packed = tuple[str, str, str, bytes, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], bool]
# Per type: None (unchanged since the previous shipment) or (upserted resources, removed names).
TypeChange = tuple[tuple[Packed, ...], tuple[str, ...]] | None


def pack(r: Resource) -> Packed:
    return (r.type_url, r.name, r.version, r.any_bytes, tuple(r.requires), tuple(r.warms_with), r.wildcard)


def unpack(p: Packed) -> Resource:
    type_url, name, version, any_bytes, requires, warms_with, wildcard = p
    return Resource.from_any(name, type_url, any_bytes, requires, warms_with, wildcard, version)


@dataclass(frozen=True)
class FleetShipment:
    generation: int
    accepted_at: float  # time.monotonic() of the change (CLOCK_MONOTONIC is host-wide on Linux)
    content_changed: bool
    types: dict[str, TypeChange]
    # The Delta variant (route tables split into virtual hosts, docs/route-tables.md), diffed
    # against the previous shipment's Delta variant; None when the snapshot has none.
    delta_types: dict[str, TypeChange | str] | None = None


# A Delta-variant type whose pool is the SotW snapshot's own (clusters, endpoints, listeners):
# not shipped twice.
SAME_AS_SOTW = "sotw"


def diff(previous: Snapshot | None, current: Snapshot) -> dict[str, TypeChange]:
    """What a worker holding ``previous`` needs to build ``current`` (all of it if None)."""
    return _diff_pools(previous, current, None)  # type: ignore[return-value]


def diff_delta(previous: Snapshot | None, current: Snapshot) -> dict[str, TypeChange | str] | None:
    """What a worker needs to build ``current``'s Delta variant on top of ``previous``'s."""
    if current.delta is None:
        return None
    return _diff_pools(previous.delta if previous is not None else None, current.delta, current)


def _diff_pools(previous: Snapshot | None, current: Snapshot, sotw: Snapshot | None) -> dict[str, TypeChange | str]:
    changes: dict[str, TypeChange | str] = {}
    for type_url, pool in current.resources.items():
        if sotw is not None and sotw.resources.get(type_url) is pool:
            changes[type_url] = SAME_AS_SOTW
            continue
        old = previous.resources.get(type_url) if previous is not None else None
        if old is pool:
            changes[type_url] = None
            continue
        old = old or {}
        upserts = tuple(pack(r) for name, r in pool.items() if old.get(name) != r)
        removed = tuple(name for name in old if name not in pool)
        changes[type_url] = None if previous is not None and not upserts and not removed else (upserts, removed)
    return changes


def apply(previous: Snapshot | None, shipment: FleetShipment) -> Snapshot:
    """The snapshot ``shipment`` describes on top of ``previous`` (with its Delta variant, if
    shipped). An unchanged type keeps the previous pool *object* (streams tell an unchanged type
    by identity); pools stay sorted by name, as ``Snapshot.build`` makes them."""
    snapshot = Snapshot(shipment.generation, _apply_pools(previous, shipment.types, None))
    if shipment.delta_types is None:
        return snapshot
    delta_pools = _apply_pools(previous.delta if previous is not None else None, shipment.delta_types, snapshot)
    return snapshot.with_delta(Snapshot(shipment.generation, delta_pools))


def _apply_pools(previous: Snapshot | None, types: Mapping[str, TypeChange | str],
                 sotw: Snapshot | None) -> dict[str, Mapping[str, Resource]]:
    pools: dict[str, Mapping[str, Resource]] = {}
    for type_url, change in types.items():
        if change == SAME_AS_SOTW and sotw is not None:
            pools[type_url] = sotw.resources[type_url]
            continue
        old = previous.resources.get(type_url, {}) if previous is not None else {}
        if change is None:
            pools[type_url] = old
            continue
        assert not isinstance(change, str)
        upserts, removed = change
        merged = dict(old)
        for name in removed:
            merged.pop(name, None)
        for packed in upserts:
            resource = unpack(packed)
            merged[resource.name] = resource
        pools[type_url] = dict(sorted(merged.items()))
    return pools
