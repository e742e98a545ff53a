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


def diff(previous: Snapshot | None, current: Snapshot) -> dict[str, TypeChange]:
    """What a worker holding ``previous`` needs to build ``current`` (all of it if None)."""
    changes: dict[str, TypeChange] = {}
    for type_url, pool in current.resources.items():
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
    """The snapshot ``shipment`` describes on top of ``previous``. An unchanged type keeps the
    previous pool *object* (streams tell an unchanged type by identity); pools stay sorted by
    name, as ``Snapshot.build`` makes them."""
    pools: dict[str, Mapping[str, Resource]] = {}
    for type_url, change in shipment.types.items():
        old = previous.resources.get(type_url, {}) if previous is not None else {}
        if change is None:
            pools[type_url] = old
            continue
        upserts, removed = change
        merged = dict(old)
        for name in removed:
            merged.pop(name, None)
        for packed in upserts:
            resource = unpack(packed)
            merged[resource.name] = resource
        pools[type_url] = dict(sorted(merged.items()))
    return Snapshot(shipment.generation, pools)
