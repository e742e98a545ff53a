"""Per-stream protocol state for ADS, State of the World and Delta. Pure: no I/O, no clock reads.

A driver (``server.py``) feeds each stream its requests and the fleet's snapshots and writes the
bytes these classes return. The rules they enforce (DESIGN.md, "Envoy facts"):

* One response per type in flight. The next is planned when the proxy ACKs or NACKs it, so a
  burst of changes costs at most one extra push, and what the proxy holds is always known.
* ACK vs NACK: a request answering our latest nonce with ``error_detail`` is a NACK. The
  rejected content is recorded (per proxy, exported) and never sent again on this stream; the
  proxy keeps its last good config, which we go back to treating as what it holds.
* SotW: a request whose nonce is not the latest we sent for its type is stale and ignored;
  a plain ACK is not answered; a changed subscription is answered even at an unchanged version.
  Delta: subscription changes are never ignored (they are deltas), only stale ACKs are.
* Make before break: a resource is sent only once everything it ``requires`` has been ACKed by
  this proxy (a route waits for its clusters and their endpoints), and a resource is removed
  only once nothing the proxy holds requires it (a cluster stays until routes stop naming it).
  Types are planned in CDS, EDS, LDS, RDS order.
* Warming: after a response adds or changes a resource, the next request for what it
  ``warms_with`` is answered even if unchanged (a changed cluster waits for its EDS answer).
* Versions are content hashes, so after a control-plane restart a reconnecting proxy whose
  reported version matches the current content needs no response at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from envoy.service.discovery.v3 import discovery_pb2

from .. import typeurls
from .snapshot import Ref, Resource, Snapshot, content_version, length_delimited


class Protocol(str, enum.Enum):
    SOTW = "sotw"
    DELTA = "delta"


@dataclass(frozen=True)
class Nack:
    version: str
    message: str
    at: float


@dataclass(frozen=True)
class Outgoing:
    """A serialized response ready to be written to the stream."""

    type_url: str
    nonce: str
    version: str
    payload: bytes
    resources: int
    removed: int = 0


@dataclass
class TypeState:
    """What one proxy holds and has been sent for one resource type."""

    type_url: str
    subscribed: bool = False  # the proxy asked for this type on this stream
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    # What the proxy holds (acked) and will hold once it applies the response in flight (sent).
    # A value of None is a resource the proxy reported at a version we do not have the content of.
    acked: dict[str, Resource | None] = field(default_factory=dict)
    sent: dict[str, Resource | None] = field(default_factory=dict)
    acked_version: str = ""
    sent_version: str = ""
    last_nonce: str = ""  # latest nonce sent for this type
    pending_nonce: str | None = None  # nonce of the response in flight, if any
    pending_updates: tuple[Resource, ...] = ()
    pending_complete_at: int | None = None  # generation the response in flight completes
    synced_generation: int | None = None  # the proxy holds exactly this generation's content
    synced_pool: Mapping[str, Resource] | None = None
    rejected_version: str | None = None  # SotW: content version the proxy NACKed
    rejected: set[tuple[str, str]] = field(default_factory=set)  # Delta: (name, version) NACKed
    force_answer: bool = False  # SotW: answer the next request even if nothing changed
    force_names: set[str] = field(default_factory=set)  # Delta: names to (re)send
    responses: int = 0
    nacks: int = 0
    last_nack: Nack | None = None
    rejecting: bool = False  # the proxy's answer to our latest response of this type was a NACK
    unknown: bool = False  # acked holds entries of unknown content (Delta initial_resource_versions)

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class StreamState:
    """State shared by both protocol variants. Subclasses parse requests and encode responses."""

    protocol: Protocol

    def __init__(self, stream_id: int, node_id: str, fleet: str, snapshot: Snapshot, now: float) -> None:
        self.stream_id = stream_id
        self.node_id = node_id
        self.fleet = fleet
        self.snapshot = snapshot
        self.connected_since = now
        self.types: dict[str, TypeState] = {}
        self._nonce = 0

    # -- events --------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot) -> list[Outgoing]:
        """A new snapshot for the fleet: plan every type in make-before-break order."""
        self.snapshot = snapshot
        return self._push_all()

    # -- queries -------------------------------------------------------------------------

    def converged(self) -> bool:
        """True when this proxy holds exactly the current snapshot's content for every type it
        needs: the wildcard types, and everything the snapshot's resources warm with."""
        snapshot = self.snapshot
        generation = snapshot.generation
        for type_url in typeurls.PUSH_ORDER:
            pool = snapshot.of_type(type_url)
            state = self.types.get(type_url)
            needed = snapshot.warmed_names(type_url)
            if state is None or not state.subscribed:
                if needed or (type_url in typeurls.WILDCARD_TYPES and pool):
                    return False
                continue
            if state.pending_nonce is not None or state.synced_generation != generation:
                return False
            if not state.wildcard and not needed <= state.names:
                return False
        return True

    # -- planning ------------------------------------------------------------------------

    def _state(self, type_url: str) -> TypeState:
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = TypeState(type_url)
        return state

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def _push_all(self) -> list[Outgoing]:
        out: list[Outgoing] = []
        for type_url in typeurls.PUSH_ORDER:
            state = self.types.get(type_url)
            if state is not None and state.subscribed:
                out.extend(self._push(state, force=False))
        for type_url, state in self.types.items():  # types outside the known order, if any
            if type_url not in typeurls.PUSH_ORDER and state.subscribed:
                out.extend(self._push(state, force=False))
        return out

    def _desired(self, state: TypeState) -> dict[str, Resource]:
        pool = self.snapshot.of_type(state.type_url)
        if state.wildcard:
            return dict(pool)
        return {name: pool[name] for name in state.names if name in pool}

    def _has_applied_all(self, resource: Resource) -> bool:
        """Has the proxy ACKed every resource ``resource`` requires, with known content?"""
        for type_url, names in resource.requires_by_type:
            state = self.types.get(type_url)
            if state is None or not state.acked.keys() >= names:
                return False
            if state.unknown and any(state.acked[n] is None for n in names):
                return False
        return True

    def _held_requirements(self, extra: Iterable[Resource | None]) -> tuple[set[Ref], bool]:
        """Everything required by what the proxy holds or is about to hold. The flag is True if
        the proxy holds a resource whose content we do not know (it might require anything)."""
        required: set[Ref] = set()
        unknown = False
        for state in self.types.values():
            for held in (state.acked, state.sent):
                for resource in held.values():
                    if resource is None:
                        unknown = True
                    else:
                        required.update(resource.requires)
        for resource in extra:
            if resource is not None:
                required.update(resource.requires)
        return required, unknown

    def _plan(self, state: TypeState) -> tuple[dict[str, Resource | None], bool]:
        """What the proxy should hold of this type next, and whether that equals the snapshot.

        New or changed resources whose requirements the proxy has not applied yet are held back
        (the old version stays); resources the snapshot dropped stay while something the proxy
        holds still requires them.
        """
        desired = self._desired(state)
        current = state.sent
        content: dict[str, Resource | None] = {}
        for name, resource in desired.items():
            old = current.get(name)
            if old is not None and old.version == resource.version:
                content[name] = resource
            elif self._has_applied_all(resource):
                content[name] = resource
            elif name in current:
                content[name] = old
        leaving = [name for name in current if name not in content and state.wants(name)]
        if leaving:
            required, unknown = self._held_requirements(content.values())
            for name in leaving:
                if unknown or (state.type_url, name) in required:
                    content[name] = current[name]
        complete = content.keys() == desired.keys() and all(
            content[n] is not None and content[n].version == r.version for n, r in desired.items()  # type: ignore[union-attr]
        )
        return content, complete

    def _ack(self, state: TypeState) -> None:
        """The proxy applied the response in flight: what was sent is what it holds."""
        state.rejecting = False
        state.acked = dict(state.sent)
        state.acked_version = state.sent_version
        state.pending_nonce = None
        if state.pending_complete_at is not None:
            state.synced_generation = state.pending_complete_at
        state.pending_complete_at = None
        state.pending_updates = ()

    def _keep_last_good(self, state: TypeState) -> None:
        """After a NACK: the proxy keeps its last good config, which is what it acked."""
        state.sent = dict(state.acked)
        state.sent_version = state.acked_version
        state.pending_nonce = None
        state.pending_complete_at = None
        state.pending_updates = ()
        state.synced_pool = None

    def _mark_warming(self, updates: Iterable[Resource]) -> None:
        for resource in updates:
            for type_url, name in resource.warms_with:
                self._on_warm(self._state(type_url), name)

    def _on_warm(self, state: TypeState, name: str) -> None:
        raise NotImplementedError

    def _push(self, state: TypeState, *, force: bool) -> list[Outgoing]:
        raise NotImplementedError


class SotwStream(StreamState):
    """State of the World: every response carries the full set of the type's resources
    (wildcard types) or of the names the proxy subscribed to."""

    protocol = Protocol.SOTW

    def on_request(self, request: discovery_pb2.DiscoveryRequest, now: float) -> list[Outgoing]:
        type_url = request.type_url
        state = self._state(type_url)
        replied = False
        if request.response_nonce:
            if request.response_nonce != state.last_nonce:
                return []  # stale: the proxy has not yet seen our latest response of this type
            if state.pending_nonce == request.response_nonce:
                replied = True
                if request.HasField("error_detail"):
                    self._nack(state, request.error_detail.message, now)
                else:
                    self._ack(state)
        added = self._subscribe(state, request)
        if not request.response_nonce:
            # First request for the type on this stream. A proxy reconnecting after a
            # control-plane restart reports the version it holds; versions are content hashes,
            # so if it matches what we would send, the proxy already holds exactly that.
            desired = self._desired(state)
            version = self._version_of(state, desired, complete=True)
            answer = not (request.version_info and request.version_info == version)
            if not answer:
                state.acked = dict(desired)
                state.sent = dict(desired)
                state.acked_version = state.sent_version = version
        else:
            # Never answer a plain ACK with the same resources; do answer a changed
            # subscription, and the request that follows a warming trigger.
            answer = added or state.force_answer
        out = self._push(state, force=answer)
        if replied:
            out += self._push_all()  # an ACK or NACK may open a gate or release a removal
        return out

    def _subscribe(self, state: TypeState, request: discovery_pb2.DiscoveryRequest) -> bool:
        """Record the subscription; True if it asks for something it did not ask for before
        (such a request is answered even at an unchanged version)."""
        names = set(request.resource_names)
        wildcard = state.type_url in typeurls.WILDCARD_TYPES or "*" in names
        names.discard("*")
        added = not state.subscribed or (wildcard and not state.wildcard) or (not wildcard and bool(names - state.names))
        changed = added or wildcard != state.wildcard or (not wildcard and names != state.names)
        state.subscribed = True
        state.wildcard = wildcard
        state.names = names
        if changed and not wildcard:
            # The proxy dropped what it no longer subscribes to.
            state.acked = {n: r for n, r in state.acked.items() if n in names}
            state.sent = {n: r for n, r in state.sent.items() if n in names}
        if changed:
            state.synced_pool = None
        return added

    def _nack(self, state: TypeState, message: str, now: float) -> None:
        state.rejected_version = state.sent_version
        state.nacks += 1
        state.rejecting = True
        state.last_nack = Nack(state.sent_version, message, now)
        self._keep_last_good(state)

    def _version_of(self, state: TypeState, content: Mapping[str, Resource | None], *, complete: bool) -> str:
        if complete:
            return self.snapshot.version(state.type_url, None if state.wildcard else frozenset(state.names))
        return content_version(r for r in content.values() if r is not None)

    def _on_warm(self, state: TypeState, name: str) -> None:
        if state.subscribed and state.wants(name):
            state.force_answer = True

    def _push(self, state: TypeState, *, force: bool) -> list[Outgoing]:
        if state.pending_nonce is not None or not state.subscribed:
            return []
        pool = self.snapshot.of_type(state.type_url)
        if not force and state.synced_pool is pool:
            state.synced_generation = self.snapshot.generation  # nothing of this type changed
            return []
        content, complete = self._plan(state)
        if not state.wildcard and any(name not in content for name in self._desired(state)):
            # A subscribed resource is held back (it waits for its clusters). Envoy takes a
            # response without it as "no such resource" and may finish warming a listener with
            # no routes; send nothing until every subscribed resource can go.
            return []
        version = self._version_of(state, content, complete=complete)
        if version == state.sent_version and not force:
            if complete:
                state.synced_generation = self.snapshot.generation
                state.synced_pool = pool
            return []
        if version == state.rejected_version:
            return []  # never re-send what this proxy rejected; wait for new content
        if any(r is None for r in content.values()):
            return []  # cannot happen in SotW: we never record content we do not hold
        resources = [content[n] for n in sorted(content)]
        nonce = self._next_nonce()
        payload = b"".join(
            (
                length_delimited(1, version.encode()),
                *(r.sotw_field for r in resources),  # type: ignore[union-attr]
                length_delimited(4, state.type_url.encode()),
                length_delimited(5, nonce.encode()),
            )
        )
        updates = tuple(r for r in resources if r is not None and (state.sent.get(r.name) is None or state.sent[r.name].version != r.version))  # type: ignore[union-attr]
        state.sent = dict(content)
        state.sent_version = version
        state.last_nonce = state.pending_nonce = nonce
        state.pending_complete_at = self.snapshot.generation if complete else None
        state.pending_updates = updates
        state.synced_pool = pool if complete else None
        state.force_answer = False
        state.responses += 1
        self._mark_warming(updates)
        return [Outgoing(state.type_url, nonce, version, payload, len(resources))]


class DeltaStream(StreamState):
    """Incremental xDS: responses carry only changed resources and the names removed."""

    protocol = Protocol.DELTA

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest, now: float) -> list[Outgoing]:
        type_url = request.type_url
        state = self._state(type_url)
        acked_or_nacked = False
        if request.response_nonce and request.response_nonce == state.pending_nonce:
            acked_or_nacked = True
            if request.HasField("error_detail"):
                self._nack(state, request.error_detail.message, now)
            else:
                self._ack(state)
        first = not state.subscribed
        self._subscribe(state, request, first)
        out = self._push(state, force=False)
        if acked_or_nacked:
            out += [o for o in self._push_all() if o.type_url != type_url or not out]
        return out

    def _subscribe(self, state: TypeState, request: discovery_pb2.DeltaDiscoveryRequest, first: bool) -> None:
        subscribe = list(request.resource_names_subscribe)
        if first:
            state.subscribed = True
            # Legacy wildcard: a first request naming nothing subscribes to everything.
            if not subscribe and state.type_url in typeurls.WILDCARD_TYPES:
                state.wildcard = True
            pool = self.snapshot.of_type(state.type_url)
            for name, version in request.initial_resource_versions.items():
                known = pool.get(name)
                held = known if known is not None and known.version == version else None
                state.acked[name] = state.sent[name] = held
                state.unknown = state.unknown or held is None
        for name in subscribe:
            if name == "*":
                state.wildcard = True
                continue
            state.names.add(name)
            held = state.sent.get(name)
            if not (first and held is not None):
                state.force_names.add(name)  # re-subscribed: send even if the proxy had it
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
                continue
            state.names.discard(name)
            if not state.wants(name):
                state.acked.pop(name, None)
                state.sent.pop(name, None)
                state.force_names.discard(name)

    def _nack(self, state: TypeState, message: str, now: float) -> None:
        state.rejected.update((r.name, r.version) for r in state.pending_updates)
        state.nacks += 1
        state.rejecting = True
        state.last_nack = Nack(state.sent_version, message, now)
        self._keep_last_good(state)

    def _on_warm(self, state: TypeState, name: str) -> None:
        if state.subscribed and state.wants(name):
            state.force_names.add(name)

    def _push(self, state: TypeState, *, force: bool) -> list[Outgoing]:
        if state.pending_nonce is not None or not state.subscribed:
            return []
        pool = self.snapshot.of_type(state.type_url)
        if not state.force_names and state.synced_pool is pool:
            state.synced_generation = self.snapshot.generation
            return []
        content, complete = self._plan(state)
        updates: list[Resource] = []
        for name in sorted(content):
            resource = content[name]
            if resource is None:
                continue
            held = state.sent.get(name)
            changed = held is None or held.version != resource.version
            if not (changed or name in state.force_names):
                continue
            if (name, resource.version) in state.rejected:
                # Never re-send what this proxy rejected: it keeps its last good version, so
                # it does not hold the snapshot's content.
                complete = False
                continue
            updates.append(resource)
        removed = sorted(n for n in state.sent if n not in content)
        if not updates and not removed:
            state.force_names.clear()
            if complete:
                state.synced_generation = self.snapshot.generation
                state.synced_pool = pool
            return []
        nonce = self._next_nonce()
        system_version = self.snapshot.version(state.type_url) if complete else ""
        payload = b"".join(
            (
                length_delimited(1, system_version.encode()),
                *(r.delta_field for r in updates),
                length_delimited(4, state.type_url.encode()),
                *(length_delimited(6, n.encode()) for n in removed),
                length_delimited(5, nonce.encode()),
            )
        )
        sent = dict(state.sent)
        for resource in updates:
            sent[resource.name] = resource
        for name in removed:
            del sent[name]
        state.sent = sent
        state.sent_version = system_version or content_version(r for r in state.sent.values() if r is not None)
        state.pending_nonce = state.last_nonce = nonce
        state.pending_complete_at = self.snapshot.generation if complete else None
        state.pending_updates = tuple(updates)
        state.synced_pool = pool if complete else None
        state.force_names.clear()
        state.responses += 1
        self._mark_warming(updates)
        return [Outgoing(state.type_url, nonce, state.sent_version, payload, len(updates), len(removed))]
