"""Immutable snapshots of xDS resources, pre-serialized once per version.

A :class:`Resource` carries its serialized ``google.protobuf.Any`` and the two wire fragments
a response needs (the SotW ``resources`` field and the Delta ``Resource`` message), so that
building a response for any stream is a join of byte strings: no protobuf work per stream.

Versions are content hashes. The same resources give the same version on every replica and
after every restart, and different content can never reuse a version (DESIGN.md, fact 7).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from google.protobuf import any_pb2
from google.protobuf.message import Message

from .. import typeurls

Ref = tuple[str, str]  # (type_url, resource name)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """Encode one length-delimited protobuf field (wire type 2)."""
    if field_number < 16 and len(payload) < 128:
        # One-byte tag and length (nonces, versions, type URLs): this runs per response.
        return bytes((field_number << 3 | 2, len(payload))) + payload
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Resource:
    """One named xDS resource, serialized.

    ``requires`` lists resources a proxy must already have applied (ACKed) before this one may
    be sent to it, and which must not be removed from a proxy while this one is still there.
    Example: a route configuration requires every cluster it names and their endpoints.

    ``warms_with`` lists resources Envoy asks for because of this one and waits for before using
    it: a cluster warms with its ClusterLoadAssignment, a listener with its RouteConfiguration.
    After this resource changes, the next request for them is answered even if they did not
    change, and a proxy has not converged until it subscribed to them.

    ``wildcard`` False makes the resource *named-only*: it is sent only to clients that name it
    in their subscription, never in a wildcard response, and it takes no part in the versions
    and convergence needs of wildcard subscribers. (Example: a gRPC API listener, which a
    proxyless gRPC client asks for by name, in the same LDS as Envoy's wildcard listeners.)
    """

    type_url: str
    name: str
    version: str
    any_bytes: bytes
    requires: frozenset[Ref]
    warms_with: frozenset[Ref]
    sotw_field: bytes
    delta_field: bytes
    # ``requires`` grouped by type, so a stream checks them with one set operation per type.
    requires_by_type: tuple[tuple[str, frozenset[str]], ...] = ()
    wildcard: bool = True

    @classmethod
    def from_message(
        cls, name: str, message: Message, requires: Iterable[Ref] = (), warms_with: Iterable[Ref] = (), *, wildcard: bool = True
    ) -> Resource:
        packed = any_pb2.Any()
        packed.Pack(message)
        return cls._build(name, packed.type_url, packed.SerializeToString(deterministic=True), requires, warms_with, wildcard)

    @classmethod
    def from_serialized(
        cls, name: str, type_url: str, message_bytes: bytes, requires: Iterable[Ref] = (), warms_with: Iterable[Ref] = (),
        *, wildcard: bool = True,
    ) -> Resource:
        """A resource from an already serialized message of ``type_url`` (assembled from cached
        parts, for example). Its bytes, and so its version, equal ``from_message``'s for the
        same message serialized deterministically."""
        any_bytes = length_delimited(1, type_url.encode()) + length_delimited(2, message_bytes)
        return cls._build(name, type_url, any_bytes, requires, warms_with, wildcard)

    @classmethod
    def from_any(cls, name: str, type_url: str, any_bytes: bytes, requires: Iterable[Ref], warms_with: Iterable[Ref],
                 wildcard: bool, version: str) -> Resource:
        """A resource rebuilt from the fields of one built here (another process ships them:
        the xDS workers); ``version`` must be that resource's, and is not recomputed."""
        return cls._build(name, type_url, any_bytes, requires, warms_with, wildcard, version)

    @classmethod
    def _build(cls, name: str, type_url: str, any_bytes: bytes, requires: Iterable[Ref], warms_with: Iterable[Ref],
               wildcard: bool, version: str | None = None) -> Resource:
        version = version or hashlib.sha256(any_bytes).hexdigest()[:16]
        delta = length_delimited(3, name.encode()) + length_delimited(1, version.encode()) + length_delimited(2, any_bytes)
        requires = frozenset(requires)
        grouped: dict[str, set[str]] = {}
        for required_type, required in requires:
            grouped.setdefault(required_type, set()).add(required)
        return cls(
            type_url=type_url,
            name=name,
            version=version,
            any_bytes=any_bytes,
            requires=requires,
            warms_with=frozenset(warms_with),
            sotw_field=length_delimited(2, any_bytes),
            delta_field=length_delimited(2, delta),
            requires_by_type=tuple((t, frozenset(n)) for t, n in sorted(grouped.items())),
            wildcard=wildcard,
        )


def content_version(resources: Iterable[Resource]) -> str:
    """The version of a set of resources: a hash of their sorted (name, version) pairs."""
    digest = hashlib.sha256()
    for resource in sorted(resources, key=lambda r: r.name):
        digest.update(resource.name.encode())
        digest.update(b"\0")
        digest.update(resource.version.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """Everything one group of proxies (a fleet) should have, at one ``generation``.

    ``generation`` is an opaque, increasing number chosen by whoever sets the snapshot (the
    control plane uses the store revision it was built from); the protocol layer only compares it.
    """

    generation: int
    resources: Mapping[str, Mapping[str, Resource]]
    _versions: dict[tuple[str, frozenset[str] | None], str] = field(default_factory=dict, compare=False, repr=False)
    _warmed: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)
    _wildcard_pools: dict[str, Mapping[str, Resource]] = field(default_factory=dict, compare=False, repr=False)
    _warmed_by: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict, compare=False, repr=False)
    _warming: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)
    _warmers: dict[Ref, tuple[Ref, ...]] | None = field(default=None, compare=False, repr=False)
    _selected: dict[tuple[str, frozenset[str]], Mapping[str, Resource]] = field(default_factory=dict, compare=False, repr=False)
    _namespaces: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)
    _diffs: dict[tuple[str, int], tuple[Mapping[str, Resource], tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=dict, compare=False, repr=False)
    _sotw_bodies: dict[tuple[str, str], bytes] = field(default_factory=dict, compare=False, repr=False)
    # A memo of the protocol layer for SotW streams, bounded there, gone with the snapshot: push
    # plans shared by streams in the same state (``SotwStream._shared_plan``), the held dicts
    # they share, and whether a set of subscriptions covers what the snapshot needs (converged).
    sotw_plans: dict[tuple[object, ...], object] = field(default_factory=dict, compare=False, repr=False)
    # What Delta streams serve instead of this snapshot (see ``with_delta``), if it differs.
    delta: Snapshot | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, generation: int, resources: Iterable[Resource]) -> Snapshot:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in typeurls.PUSH_ORDER}
        for resource in resources:
            bucket = by_type.setdefault(resource.type_url, {})
            if resource.name in bucket:
                raise ValueError(f"duplicate {typeurls.SHORT_NAMES.get(resource.type_url, resource.type_url)} resource {resource.name!r}")
            bucket[resource.name] = resource
        return cls(generation, {t: dict(sorted(b.items())) for t, b in by_type.items()})

    def with_generation(self, generation: int, reuse: Snapshot | None = None) -> Snapshot:
        """The same resources at another generation. Pools equal to ``reuse``'s are replaced by
        ``reuse``'s own objects, so streams can tell an unchanged type with an identity check.
        The Delta variant, if any, goes along (reusing ``reuse``'s Delta variant's pools)."""
        pools: dict[str, Mapping[str, Resource]] = {}
        for type_url, pool in self.resources.items():
            old = reuse.resources.get(type_url) if reuse is not None else None
            pools[type_url] = old if old is not None and _same_pool(old, pool) else pool
        delta = None
        if self.delta is not None:
            delta = self.delta.with_generation(generation, reuse.for_delta() if reuse is not None else None)
        return Snapshot(generation, pools, delta=delta)

    def with_delta(self, delta: Snapshot) -> Snapshot:
        """This snapshot for State-of-the-World streams, ``delta`` (same generation) for Delta
        streams. Used when Delta clients can get the same configuration in smaller pieces (a
        route configuration's virtual hosts over VHDS) that SotW clients cannot ask for. Pools
        equal in both are shared, so they cost no memory twice."""
        if delta.generation != self.generation:
            raise ValueError(f"Delta variant at generation {delta.generation}, snapshot at {self.generation}")
        return Snapshot(self.generation, self.resources, delta=delta.with_generation(self.generation, self))

    def for_delta(self) -> Snapshot:
        """What a Delta stream serves: the Delta variant if there is one, else this snapshot."""
        return self.delta if self.delta is not None else self

    def sotw_body(self, type_url: str, version: str, resources: Iterable[Resource]) -> bytes:
        """A SotW DiscoveryResponse without its nonce: ``version_info``, ``resources`` (in the
        given order) and ``type_url``. Built once per (type, version) and shared by every
        stream sent that content: versions are content hashes, so equal versions mean equal
        resources (the caller passes them sorted by name)."""
        key = (type_url, version)
        body = self._sotw_bodies.get(key)
        if body is None:
            body = self._sotw_bodies[key] = b"".join((
                length_delimited(1, version.encode()),
                *(r.sotw_field for r in resources),
                length_delimited(4, type_url.encode()),
            ))
        return body

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, {})

    def wildcard_pool(self, type_url: str) -> Mapping[str, Resource]:
        """The type's resources a wildcard subscriber gets: all but the named-only ones. The
        same object as ``of_type(type_url)`` when the type has no named-only resource."""
        cached = self._wildcard_pools.get(type_url)
        if cached is None:
            pool = self.of_type(type_url)
            cached = pool if all(r.wildcard for r in pool.values()) else {n: r for n, r in pool.items() if r.wildcard}
            self._wildcard_pools[type_url] = cached
        return cached

    def version(self, type_url: str, names: frozenset[str] | None = None) -> str:
        """Content version of the type's resources: those in ``names``, or with ``None`` those a
        wildcard subscriber gets. Cached: every proxy of a fleet asks for the same sets."""
        key = (type_url, names)
        cached = self._versions.get(key)
        if cached is None:
            chosen = self.wildcard_pool(type_url).values() if names is None else self.select(type_url, names).values()
            cached = self._versions[key] = content_version(chosen)
        return cached

    def select(self, type_url: str, names: frozenset[str]) -> Mapping[str, Resource]:
        """The type's resources a subscription to ``names`` covers: those named, and for a
        namespaced type (``typeurls.NAMESPACED_TYPES``) every resource in a named namespace.
        Cached for namespaced types (every Delta proxy of a fleet names the same namespaces)."""
        pool = self.of_type(type_url)
        if type_url not in typeurls.NAMESPACED_TYPES:
            return {n: pool[n] for n in names if n in pool}
        key = (type_url, names)
        cached = self._selected.get(key)
        if cached is None:
            cached = {n: r for n, r in pool.items() if n in names or typeurls.namespace_of(n) in names}
            if len(self._selected) < 64:  # bounded: a client may name arbitrary sets
                self._selected[key] = cached
        return cached

    def changes_since(self, type_url: str, old: Mapping[str, Resource]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Names of the type's resources added or changed since pool ``old``, and names removed,
        each sorted. Cached: every stream that held the previous snapshot asks for the same
        ``old`` pool, so the O(pool) comparison runs once per snapshot, not once per stream."""
        key = (type_url, id(old))
        cached = self._diffs.get(key)
        if cached is not None and cached[0] is old:
            return cached[1], cached[2]
        pool = self.of_type(type_url)
        changed = tuple(sorted(n for n, r in pool.items() if (o := old.get(n)) is None or o.version != r.version))
        removed = tuple(sorted(n for n in old if n not in pool))
        if len(self._diffs) >= 8:  # bounded: streams far behind ask for older pools
            self._diffs.clear()
        self._diffs[key] = (old, changed, removed)
        return changed, removed

    def covers(self, type_url: str, name: str) -> bool:
        """Does a subscription to ``name`` cover anything in this snapshot (the resource, or
        for a namespaced type a non-empty namespace)?"""
        if name in self.of_type(type_url):
            return True
        if type_url not in typeurls.NAMESPACED_TYPES:
            return False
        namespaces = self._namespaces.get(type_url)
        if namespaces is None:
            namespaces = self._namespaces[type_url] = frozenset(typeurls.namespace_of(n) for n in self.of_type(type_url))
        return name in namespaces

    def warmed_names(self, type_url: str) -> frozenset[str]:
        """Names of ``type_url`` resources that some wildcard-visible resource in this snapshot
        warms with: a proxy subscribed to every wildcard type must be subscribed to them."""
        cached = self._warmed.get(type_url)
        if cached is None:
            cached = frozenset(
                name
                for source in self.resources
                for t, name in self._warms_of(source)
                if t == type_url and self.covers(type_url, name)
            )
            self._warmed[type_url] = cached
        return cached

    def warmed_by_wildcard(self, source_type: str) -> dict[str, frozenset[str]]:
        """What a wildcard subscription to ``source_type`` warms, by type: the names a
        converged wildcard subscriber of that type must also be subscribed to."""
        cached = self._warmed_by.get(source_type)
        if cached is None:
            grouped: dict[str, set[str]] = {}
            for type_url, name in self._warms_of(source_type):
                if self.covers(type_url, name):
                    grouped.setdefault(type_url, set()).add(name)
            cached = self._warmed_by[source_type] = {t: frozenset(n) for t, n in grouped.items()}
        return cached

    def warmed_by(self, type_url: str, name: str) -> tuple[Ref, ...]:
        """The resources of this snapshot that warm with ``(type_url, name)``."""
        if self._warmers is None:
            index: dict[Ref, list[Ref]] = {}
            for pool in self.resources.values():
                for resource in pool.values():
                    for ref in resource.warms_with:
                        index.setdefault(ref, []).append((resource.type_url, resource.name))
            object.__setattr__(self, "_warmers", {ref: tuple(holders) for ref, holders in index.items()})
        return self._warmers.get((type_url, name), ())  # type: ignore[union-attr]

    def warms_anything(self, type_url: str) -> bool:
        """Does any resource of the type warm with another resource?"""
        cached = self._warming.get(type_url)
        if cached is None:
            cached = self._warming[type_url] = any(r.warms_with for r in self.of_type(type_url).values())
        return cached

    def _warms_of(self, source_type: str) -> Iterable[Ref]:
        for resource in self.wildcard_pool(source_type).values():
            yield from resource.warms_with

    def check_consistent(self) -> None:
        """Raise ValueError if a resource requires one the snapshot does not hold."""
        for pool in self.resources.values():
            for resource in pool.values():
                for type_url, name in resource.requires:
                    if name not in self.of_type(type_url):
                        raise ValueError(
                            f"{resource.name} requires {typeurls.SHORT_NAMES.get(type_url, type_url)} "
                            f"{name!r}, which the snapshot does not contain"
                        )


def _same_pool(a: Mapping[str, Resource], b: Mapping[str, Resource]) -> bool:
    return a.keys() == b.keys() and all(a[n].version == r.version for n, r in b.items())


EMPTY = Snapshot.build(0, ())
