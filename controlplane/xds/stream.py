"""Per-stream protocol state for ADS, State of the World and Delta. Pure: no I/O, no clock reads.

A driver (``server.py``) feeds each stream its requests and the fleet's snapshots and writes the
bytes these classes return. The rules they enforce (DESIGN.md, "Envoy facts"):

* One response per type in flight. The next is planned when the proxy ACKs or NACKs it, so a
  burst of changes costs at most one extra push, and what the proxy holds is always known.
* ACK vs NACK: a request answering our latest nonce with ``error_detail`` is a NACK. The
  rejected content is recorded (per proxy, exported) and never sent again on this stream; the
  proxy keeps its last good version of what it rejected (see "Partial NACKs" below).
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

Contract on ``Resource.requires``: a resource requires only resources of types that come
*earlier* in ``typeurls.PUSH_ORDER`` (a route requires clusters and endpoints). That order is
what makes removals of unknown content finite: see "Unknown content" below.

Unknown content. A Delta proxy reconnecting with ``initial_resource_versions`` may name
resources we do not have at that version, or at all (deleted while the control plane was down,
another replica's state, a renamed listener). They are recorded as held with content ``None``.
A ``None`` resource of type T might require anything of a type earlier than T, so while one is
held, removals of earlier types wait; nothing waits for removals of T itself or later types. A
name the snapshot lacks is therefore removed (routes first), a name it has is replaced, and
once the proxy ACKs those the stream knows everything it holds again and removals go on. What
the proxy holds of a type is known only once it has requested that type on this stream, so
removals of a type also wait until the proxy has asked for every later type the snapshot needs
(Envoy asks for all its types at once when it reconnects).

Known limit, SotW: a reconnecting SotW proxy reports only a version per type, not what it
holds. If that version is not the current content's, the first CDS response is the full current
set, and a cluster only the proxy knows goes at once, even if a route it still holds names it
(until the RDS answer replaces that route). Delta proxies report each resource and are safe.

Partial NACKs. Envoy applies the valid resources of a response and rejects only the others (CDS
and LDS: "Error adding/updating cluster(s) NAME: reason, ..."; removals are applied first). The
model after a NACK:

* If the NACK's ``error_detail.message`` names some of the resources the response added or
  changed (whole-word match), exactly those are rejected: the proxy keeps its previous version
  of them (or lacks them if new), and holds everything else the response carried, removals
  included. The rejected ``(name, version)`` pairs are never sent again on this stream; siblings
  are held back by nothing but their own requirements.
* Otherwise we cannot tell what was applied, and assume the worst for each purpose. Every
  resource the response added, changed or removed is rejected at that version and counts as
  possibly held at either version, for removal safety, and as not held, for gating:
  Delta sends what the proxy had before again (so we learn which version it holds) and
  records what it did not have, or the response removed, with unknown content (``None``, see
  above). SotW keeps planning from the last ACKed set, and sends that full set again once it
  equals the snapshot, even if its version did not change. Both keep the response's
  requirements in ``maybe_requires`` until the proxy ACKs a response that settles them.

Both cases keep make-before-break: a resource is sent only once its requirements are in what the
proxy certainly holds now *and* after the response in flight (``acked`` and ``sent``), and a
removal waits while anything the proxy holds, may hold, or is about to hold requires it.

Bad requests (no or unknown ``type_url``, more names than ``MAX_NAMES``) raise
:class:`ProtocolError`, which the driver turns into ``INVALID_ARGUMENT``. Per-stream state is
bounded: one :class:`TypeState` per served type, names capped, the rejected set pruned to
what the current snapshot could still send.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from envoy.service.discovery.v3 import discovery_pb2

from .. import typeurls
from .snapshot import Ref, Resource, Snapshot, content_version, length_delimited


# A type's subscribed names (and Delta initial_resource_versions) per stream. Far above any real
# fleet (one name per cluster); it only bounds what one misbehaving client can make us hold.
MAX_NAMES = 100_000

# SotW push plans shared per snapshot (SotwStream._shared_plan). A fleet's streams fall into a
# few states (the same history); the bound only caps what unusual histories can make us hold.
MAX_SHARED_PLANS = 256


class ProtocolError(ValueError):
    """A request that breaks the xDS protocol; the message names the problem. The stream ends."""


def _order(type_url: str) -> int:
    try:
        return typeurls.PUSH_ORDER.index(type_url)
    except ValueError:
        return len(typeurls.PUSH_ORDER)


def _may_require(holder_type: str, type_url: str) -> bool:
    """Can a resource of ``holder_type`` require one of ``type_url``? (Only earlier types.)"""
    if holder_type in typeurls.PUSH_ORDER and type_url in typeurls.PUSH_ORDER:
        return _order(type_url) < _order(holder_type)
    return holder_type != type_url


def mentions(message: str, name: str) -> bool:
    """Does ``message`` name ``name`` as a whole word (not inside a longer name)?"""
    start = message.find(name)
    while start != -1:
        end = start + len(name)
        before = message[start - 1] if start else " "
        after = message[end] if end < len(message) else " "
        if not (_name_char(before) or _name_char(after)):
            return True
        start = message.find(name, start + 1)
    return False


def _name_char(char: str) -> bool:
    return char.isalnum() or char in "_-."


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
    legacy_wildcard: bool = False  # SotW: wildcard by an empty first request; empty lists keep it
    names: set[str] = field(default_factory=set)
    names_key: frozenset[str] = frozenset()  # SotW: ``names`` frozen (a cache key), kept in step by _subscribe
    # What the proxy holds (acked) and will hold once it applies the response in flight (sent).
    # A value of None is a resource the proxy reported at a version we do not have the content of.
    acked: dict[str, Resource | None] = field(default_factory=dict)
    sent: dict[str, Resource | None] = field(default_factory=dict)
    acked_version: str = ""
    sent_version: str = ""
    last_nonce: str = ""  # latest nonce sent for this type
    pending_nonce: str | None = None  # nonce of the response in flight, if any
    pending_updates: tuple[Resource, ...] = ()  # what the response in flight adds or changes
    pending_base: dict[str, Resource | None] | None = None  # ``sent`` before that response
    pending_complete_at: int | None = None  # generation the response in flight completes
    synced_generation: int | None = None  # the proxy holds exactly this generation's content
    synced_pool: Mapping[str, Resource] | None = None
    rejected: set[tuple[str, str]] = field(default_factory=set)  # (name, version) NACKed
    # SotW, after a NACK that did not say which resources it rejected: the requirements of what
    # the proxy may have applied, kept (for removal safety only) until its next ACK.
    maybe_requires: frozenset[Ref] = frozenset()
    uncertain: bool = False  # SotW: since such a NACK, send the full set once it is complete
    force_answer: bool = False  # SotW: answer the next request even if nothing changed
    force_names: set[str] = field(default_factory=set)  # Delta: names to (re)send
    responses: int = 0
    nacks: int = 0
    last_nack: Nack | None = None
    rejecting: bool = False  # the proxy's answer to our latest response of this type was a NACK
    unknown: bool = False  # acked or sent may hold entries of unknown content (None)
    # Delta: the first request reported holding nothing; answer it even if there is nothing to
    # send, or Envoy waits out its initial fetch timeout (15 s) before it finishes warming.
    owes_answer: bool = False

    def wants(self, name: str) -> bool:
        """Does the subscription cover ``name`` (by wildcard, by name, or by its namespace)?"""
        if self.wildcard or name in self.names:
            return True
        return self.type_url in typeurls.NAMESPACED_TYPES and typeurls.namespace_of(name) in self.names


class StreamState:
    """State shared by both protocol variants. Subclasses parse requests and encode responses."""

    protocol: Protocol
    # True when the variant never changes an ``acked`` or ``sent`` dict in place (every change
    # assigns a new one): then they can be shared, by a stream's two and by streams sent the same
    # plan, instead of copied per ACK.
    _shares_held = False

    def __init__(self, stream_id: int, node_id: str, fleet: str, snapshot: Snapshot, now: float) -> None:
        self.stream_id = stream_id
        self.node_id = node_id
        self.fleet = fleet
        self.snapshot = self._view(snapshot)
        self.connected_since = now
        self.types: dict[str, TypeState] = {}
        self._ordered: list[TypeState] = []  # self.types in push order (see _push_all)
        self._nonce = 0
        # Responses the proxy has ACKed on this stream: grows whenever it applies one (a cheap
        # progress mark for observers, read per event).
        self.applied = 0

    # -- events --------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot) -> list[Outgoing]:
        """A new snapshot for the fleet: plan every type in make-before-break order."""
        self.snapshot = self._view(snapshot)
        return self._push_all()

    @staticmethod
    def _view(snapshot: Snapshot) -> Snapshot:
        """The variant of a fleet's snapshot this protocol serves."""
        return snapshot

    # -- queries -------------------------------------------------------------------------

    def converged(self) -> bool:
        """True when this proxy holds exactly the current snapshot's content for every type it
        needs: the wildcard types (if the snapshot has wildcard-visible resources of them), and
        everything that the resources it subscribed to warm with. A client that names what it
        wants (a proxyless gRPC client) has converged once it holds those and what they warm
        with; named-only resources it did not name are not its business."""
        snapshot = self.snapshot
        generation = snapshot.generation
        # Cheap checks first: this runs after every ACK and push, and a stream with a response
        # in flight (most calls during a fan-out) is decided without building its needs.
        for state in self.types.values():
            if state.subscribed and (state.pending_nonce is not None or state.synced_generation != generation):
                return False
        key = self._subscription_key()
        if key is None:
            return self._subscribed_to_needs()
        # The answer depends on the snapshot and the subscriptions only: one per snapshot for
        # all streams subscribed alike (this runs after every ACK of every stream).
        memo = snapshot.sotw_plans
        cached = memo.get(key)
        if cached is None:
            cached = self._subscribed_to_needs()
            if len(memo) < MAX_SHARED_PLANS:
                memo[key] = cached
        return cached  # type: ignore[return-value]

    def _subscription_key(self) -> tuple[object, ...] | None:
        """Every type's subscription, hashable, or None if the variant keeps no frozen names."""
        return None

    def _subscribed_to_needs(self) -> bool:
        """Does the client subscribe to everything the snapshot says it needs (see converged)?"""
        snapshot = self.snapshot
        needed = self._needed_names()
        for type_url in typeurls.PUSH_ORDER:
            state = self.types.get(type_url)
            wanted = needed.get(type_url, frozenset())
            if state is None or not state.subscribed:
                if wanted or (type_url in typeurls.WILDCARD_TYPES and snapshot.wildcard_pool(type_url)):
                    return False
                continue
            if not state.wildcard and not wanted <= state.names:
                return False
        return True

    def _needed_names(self) -> dict[str, set[str]]:
        """By type, the names this client must be subscribed to because of what it subscribed
        to: what its wildcard subscriptions and its named resources warm with."""
        snapshot = self.snapshot
        needed: dict[str, set[str]] = {}
        for state in self.types.values():
            if not state.subscribed:
                continue
            if state.wildcard:
                for type_url, names in snapshot.warmed_by_wildcard(state.type_url).items():
                    needed.setdefault(type_url, set()).update(names)
            if not state.names or not snapshot.warms_anything(state.type_url):
                continue
            pool = snapshot.of_type(state.type_url)
            for name in state.names:
                resource = pool.get(name)
                if resource is None:
                    continue
                for type_url, warmed in resource.warms_with:
                    if snapshot.covers(type_url, warmed):
                        needed.setdefault(type_url, set()).add(warmed)
        return needed

    # -- planning ------------------------------------------------------------------------

    def _state(self, type_url: str) -> TypeState:
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = TypeState(type_url)
            # Push order: typeurls.PUSH_ORDER, then other types as they came (a stable sort).
            self._ordered = sorted(self.types.values(), key=lambda s: _order(s.type_url))
        return state

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def _push_all(self) -> list[Outgoing]:
        out: list[Outgoing] = []
        for state in self._ordered:  # (this runs after every ACK and every snapshot)
            if state.subscribed and state.pending_nonce is None:
                pushed = self._push(state, force=False)
                if pushed:
                    out += pushed
        return out

    def _desired(self, state: TypeState) -> Mapping[str, Resource]:
        if state.type_url in typeurls.NAMESPACED_TYPES:
            named = self.snapshot.select(state.type_url, frozenset(state.names))
            if state.wildcard:
                return {**self.snapshot.wildcard_pool(state.type_url), **named}
            return named
        pool = self.snapshot.of_type(state.type_url)
        named = {name: pool[name] for name in state.names if name in pool}
        if state.wildcard:
            # Named-only resources go to a wildcard subscriber only if it also names them.
            return {**self.snapshot.wildcard_pool(state.type_url), **named}
        return named

    def _type_state(self, type_url: str) -> TypeState:
        """The state of a requested type; ProtocolError unless it is one this server serves."""
        state = self.types.get(type_url)
        if state is not None:
            return state
        if not type_url:
            raise ProtocolError("request has no type_url")
        if type_url not in typeurls.PUSH_ORDER:
            raise ProtocolError(f"type_url {type_url!r} is not served here; served: {', '.join(typeurls.PUSH_ORDER)}")
        return self._state(type_url)

    def _has_applied_all(self, resource: Resource) -> bool:
        """Does the proxy certainly hold every resource ``resource`` requires, now (ACKed) and
        after the response in flight (which may remove some), with known content?

        A requirement the client will never ask for before it has this resource does not gate
        it (see ``_will_ask``): a client that names its listeners or clusters discovers names
        from the resources that carry them (a proxyless gRPC client asks for a route's clusters
        after it got the route) and orders the chain itself (gRFC A74: it uses a route only once
        it has all its clusters); holding the route back would deadlock it. Envoy subscribes to
        clusters and listeners by wildcard and to the endpoints of every cluster it holds, so
        for Envoy every requirement gates, whatever order its requests come in."""
        for type_url, names in resource.requires_by_type:
            state = self.types.get(type_url)
            if state is None or not state.acked.keys() >= names:
                held = state.acked if state is not None else {}
                missing = [n for n in names if n not in held]
                if any(self._will_ask(type_url, name, state) for name in missing):
                    return False
                names = names & held.keys()
                if not names:
                    continue
                assert state is not None
            # ``sent`` lacks something ``acked`` has only while a response removing it is in
            # flight; skip the second check otherwise (this runs for every route, every push).
            if state.pending_nonce is not None and not state.sent.keys() >= names:
                return False
            if state.unknown and any(state.acked[n] is None or state.sent[n] is None for n in names):
                return False
        return True

    def _will_ask(self, type_url: str, name: str, state: TypeState | None) -> bool:
        """Will the client ask for this resource without first getting one that names it? Yes
        if its subscription covers the name, or something it holds or is being sent warms with
        it (Envoy asks for a cluster's endpoints once it has the cluster), or it has not asked
        for the type yet and is not a client that names its listeners and clusters (an Envoy
        reconnecting may ask for routes before clusters, and then clusters by wildcard)."""
        if state is not None and state.subscribed and state.wants(name):
            return True
        if (state is None or not state.subscribed) and not self._names_what_it_wants():
            return True
        for holder_type, holder in self.snapshot.warmed_by(type_url, name):
            holder_state = self.types.get(holder_type)
            if holder_state is not None and (holder in holder_state.acked or holder in holder_state.sent):
                return True
        return False

    def _names_what_it_wants(self) -> bool:
        """Has the client subscribed to a wildcard type (CDS, LDS) by names, without wildcard?"""
        for type_url in typeurls.WILDCARD_TYPES:
            state = self.types.get(type_url)
            if state is not None and state.subscribed and not state.wildcard and state.names:
                return True
        return False

    def _held_requirements(self, extra: Iterable[Resource | None]) -> tuple[set[Ref], set[str]]:
        """Everything required by what the proxy holds, may hold or is about to hold, and the
        types of which it holds resources of unknown content (they might require anything of
        an earlier type)."""
        required: set[Ref] = set()
        unknown: set[str] = set()
        for state in self.types.values():
            required.update(state.maybe_requires)
            for held in (state.acked, state.sent):
                for resource in held.values():
                    if resource is None:
                        unknown.add(state.type_url)
                    else:
                        required.update(resource.requires)
        for resource in extra:
            if resource is not None:
                required.update(resource.requires)
        return required, unknown

    def _unreported_holders(self, type_url: str) -> bool:
        """Is there a type that may require ``type_url`` which the proxy will ask for (the
        snapshot needs it, see ``converged``) but has not asked for on this stream yet? Until it
        does, we do not know what it holds of that type (a reconnecting proxy may hold routes
        naming a cluster only it knows), so removals of ``type_url`` wait."""
        snapshot = self.snapshot
        for holder in typeurls.PUSH_ORDER:
            if not _may_require(holder, type_url):
                continue
            state = self.types.get(holder)
            if state is not None and state.subscribed:
                continue
            if snapshot.warmed_names(holder) or (holder in typeurls.WILDCARD_TYPES and snapshot.wildcard_pool(holder)):
                return True
        return False

    def _plan(self, state: TypeState) -> tuple[dict[str, Resource | None], bool]:
        """What the proxy should hold of this type next, and whether that equals the snapshot.

        New or changed resources whose requirements the proxy has not applied yet, or that the
        proxy rejected at that version, are held back (the old version stays); resources the
        snapshot dropped stay while something the proxy holds still requires them.
        """
        desired = self._desired(state)
        current = state.sent
        rejected = state.rejected
        content: dict[str, Resource | None] = {}
        for name, resource in desired.items():
            old = current.get(name)
            if old is not None and old.version == resource.version:
                content[name] = resource
            elif not (rejected and (name, resource.version) in rejected) and self._has_applied_all(resource):
                content[name] = resource
            elif name in current:
                content[name] = old
        if state.type_url in typeurls.ALL_OR_NOTHING_TYPES and self._holds_back_some(state, desired, content):
            # One change must wait, so they all do, removals included: the proxy keeps what it has.
            return {n: r for n, r in current.items() if state.wants(n)}, False
        leaving = [name for name in current if name not in content and state.wants(name)]
        if leaving:
            required, unknown = self._held_requirements(content.values())
            blocked = any(_may_require(holder, state.type_url) for holder in unknown) or self._unreported_holders(state.type_url)
            for name in leaving:
                if blocked or (state.type_url, name) in required:
                    content[name] = current[name]
        complete = content.keys() == desired.keys() and all(
            content[n] is not None and content[n].version == r.version for n, r in desired.items()  # type: ignore[union-attr]
        )
        return content, complete

    @staticmethod
    def _holds_back_some(state: TypeState, desired: Mapping[str, Resource], content: Mapping[str, Resource | None]) -> bool:
        """Does the plan hold back a change for its requirements (not for a rejection, which is
        final: waiting for it would hold the others back for good)?"""
        for name, resource in desired.items():
            planned = content.get(name)
            if (planned is None or planned.version != resource.version) and (name, resource.version) not in state.rejected:
                return True
        return False

    def _ack(self, state: TypeState) -> None:
        """The proxy applied the response in flight: what was sent is what it holds."""
        self.applied += 1
        state.rejecting = False
        state.acked = state.sent if self._shares_held else dict(state.sent)
        state.acked_version = state.sent_version
        state.pending_nonce = None
        complete = state.pending_complete_at is not None
        if complete:
            state.synced_generation = state.pending_complete_at
        state.pending_complete_at = None
        state.pending_updates = ()
        state.pending_base = None
        if state.maybe_requires and (complete or self.protocol is Protocol.SOTW):
            # The proxy now holds exactly what we sent: a full set (SotW), or the snapshot.
            state.maybe_requires = frozenset()
        state.uncertain = False
        if state.unknown:
            state.unknown = any(r is None for r in state.acked.values())

    def _nack(self, state: TypeState, message: str, now: float) -> None:
        """The proxy rejected the response in flight: work out what it holds now (see the
        module docstring, "Partial NACKs")."""
        updates = state.pending_updates
        base = state.pending_base if state.pending_base is not None else state.acked
        removed = [name for name in base if name not in state.sent]
        named = [r for r in updates if mentions(message, r.name)]
        state.nacks += 1
        state.rejecting = True
        state.last_nack = Nack(state.sent_version, message, now)
        # Bounded: forget rejections the current snapshot could not send any more.
        pool = self.snapshot.of_type(state.type_url)
        state.rejected = {(n, v) for n, v in state.rejected if n in pool and pool[n].version == v}
        if named:
            state.rejected.update((r.name, r.version) for r in named)
            held = dict(state.acked)
            for name in removed:
                held.pop(name, None)
            rejected_names = {r.name for r in named}
            for resource in updates:
                if resource.name not in rejected_names:
                    held[resource.name] = resource
            state.acked = held
            state.sent = dict(held)
            state.acked_version = state.sent_version = content_version(r for r in held.values() if r is not None)
        else:
            state.rejected.update((r.name, r.version) for r in updates)
            self._after_unexplained_nack(state, updates, removed)
        state.pending_nonce = None
        state.pending_complete_at = None
        state.pending_updates = ()
        state.pending_base = None
        state.synced_pool = None

    def _after_unexplained_nack(self, state: TypeState, updates: tuple[Resource, ...], removed: list[str]) -> None:
        raise NotImplementedError

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
    _shares_held = True  # (every SotW change of acked or sent assigns a new dict)

    def on_request(self, request: discovery_pb2.DiscoveryRequest, now: float) -> list[Outgoing]:
        """Handle one request; the responses to write, in order. ProtocolError on a bad one."""
        state = self._type_state(request.type_url)
        if len(request.resource_names) > MAX_NAMES:
            raise ProtocolError(f"{len(request.resource_names)} resource_names for {request.type_url}; at most {MAX_NAMES}")
        first = not state.subscribed
        replied = False
        if request.response_nonce and not first and state.last_nonce:
            # (Before we sent anything of this type on this stream, a nonce can only come from
            # an earlier connection: it is no ACK, and the request is handled as if it had none.)
            if request.response_nonce != state.last_nonce:
                return []  # stale: the proxy has not yet seen our latest response of this type
            if state.pending_nonce == request.response_nonce:
                replied = True
                if request.HasField("error_detail"):
                    self._nack(state, request.error_detail.message, now)
                else:
                    self._ack(state)
        added = self._subscribe(state, request, first)
        if first:
            # First request for the type on this stream. A proxy reconnecting after a
            # control-plane restart reports the version it holds; versions are content hashes,
            # so if it matches what we would send, the proxy already holds exactly that.
            desired = self._desired(state)
            version = self._version_of(state, desired, complete=True)
            answer = not (request.version_info and request.version_info == version)
            if not answer:
                state.acked = state.sent = self._interned(state.type_url, version, desired)
                state.acked_version = state.sent_version = version
        else:
            # Never answer a plain ACK with the same resources; do answer a changed
            # subscription, and the request that follows a warming trigger.
            answer = added or state.force_answer
        out = self._push(state, force=answer)
        if replied or first:
            # An ACK or NACK, or what a first request says the proxy holds, may open a gate or
            # release a removal of another type.
            out += self._push_all()
        return out

    def _subscribe(self, state: TypeState, request: discovery_pb2.DiscoveryRequest, first: bool) -> bool:
        """Record the subscription; True if it asks for something it did not ask for before
        (such a request is answered even at an unchanged version).

        As the xDS spec has it: "*" among the names subscribes to everything; names without
        "*" subscribe to those names only; an empty list on the first request for CDS or LDS is
        the legacy wildcard, which later empty lists keep (Envoy sends names only for EDS and
        RDS; a gRPC client names the clusters and listeners it wants).
        """
        names = set(request.resource_names)
        if "*" in names:
            wildcard, legacy = True, False
            names.discard("*")
        elif names:
            wildcard = legacy = False
        else:
            legacy = (first and state.type_url in typeurls.WILDCARD_TYPES) or state.legacy_wildcard
            wildcard = legacy
        added = first or (wildcard and not state.wildcard) or (not wildcard and bool(names - state.names))
        changed = added or wildcard != state.wildcard or (not wildcard and names != state.names)
        if names != state.names:
            state.names_key = frozenset(names)
        state.subscribed = True
        state.wildcard = wildcard
        state.legacy_wildcard = legacy
        state.names = names
        if changed and not wildcard:
            # The proxy dropped what it no longer subscribes to.
            state.acked = {n: r for n, r in state.acked.items() if n in names}
            state.sent = {n: r for n, r in state.sent.items() if n in names}
        if changed:
            state.synced_pool = None
        return added

    def _after_unexplained_nack(self, state: TypeState, updates: tuple[Resource, ...], removed: list[str]) -> None:
        # Plan on from the last ACKed set: the next response is the full set and corrects
        # whatever the proxy did apply. Until the proxy ACKs one, what it may have applied keeps
        # its requirements, and what the response removed counts as possibly gone.
        last_good = state.acked
        state.uncertain = True
        state.maybe_requires = state.maybe_requires.union(*(r.requires for r in updates))
        state.sent = dict(last_good)
        state.sent_version = state.acked_version
        if removed:
            gone = set(removed)
            state.acked = {n: r for n, r in last_good.items() if n not in gone}

    def _version_of(self, state: TypeState, content: Mapping[str, Resource | None], *, complete: bool) -> str:
        if complete:
            if not state.wildcard:
                return self.snapshot.version(state.type_url, state.names_key)
            pool = self.snapshot.of_type(state.type_url)
            if not any(name in pool and not pool[name].wildcard for name in state.names):
                return self.snapshot.version(state.type_url)
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
        plan = self._shared_plan(state)
        if plan is None:
            # A subscribed resource is held back (it waits for its clusters). Envoy takes a
            # response without it as "no such resource" and may finish warming a listener with
            # no routes; send nothing until every subscribed resource can go.
            return []
        version, complete = plan.version, plan.complete
        if version == state.sent_version and not force and not (complete and state.uncertain):
            if complete:
                state.synced_generation = self.snapshot.generation
                state.synced_pool = pool
            return []
        if plan.unknown:
            return []  # cannot happen in SotW: we never record content we do not hold
        nonce = self._next_nonce()
        # Every stream sent this content shares the body; only the nonce is its own.
        body = self.snapshot.sotw_body(state.type_url, version, plan.resources)
        payload = body + length_delimited(5, nonce.encode())
        state.pending_base = state.sent
        state.sent = plan.content  # shared with the other streams sent this plan (never changed in place)
        state.sent_version = version
        state.last_nonce = state.pending_nonce = nonce
        state.pending_complete_at = self.snapshot.generation if complete else None
        state.pending_updates = plan.updates
        state.synced_pool = pool if complete else None
        state.force_answer = False
        state.responses += 1
        self._mark_warming(plan.updates)
        return [Outgoing(state.type_url, nonce, version, payload, len(plan.resources))]

    def _subscription_key(self) -> tuple[object, ...] | None:
        return ("subscriptions", *((s.type_url, s.subscribed, s.wildcard, s.names_key) for s in self.types.values()))

    def _shared_plan(self, state: TypeState) -> _SotwPlan | None:
        """``_plan_push(state)``, computed once per snapshot for all streams in the same state.

        The plan is a function of the snapshot and of what ``_plan`` reads of the stream: each
        type's subscription, ``acked`` and ``sent`` and whether a response is in flight, this
        type's rejections, and every type's uncertainty (``unknown``, ``maybe_requires``). The key
        holds those, the dicts by identity: SotW shares them (``_shares_held``) among streams sent
        the same plan, so streams in the same state present the same objects. The entry keeps
        those dicts alive, so an id in a key cannot be reused while the entry exists. Streams
        with rejections or uncertain content (rare) are planned on their own.

        Why: a weight change set off the same plan for every stream of a fleet; at 5000 streams
        the per-stream planning was 12 % of the server's CPU (bench/RESULTS.md section 8)."""
        if state.rejected:
            return self._plan_push(state)
        parts: list[object] = [state.type_url]
        held: list[object] = []
        for other in self.types.values():
            if other.unknown or other.maybe_requires:
                return self._plan_push(state)
            # (Empty dicts are all alike: a type not yet sent has its own empty one per stream.)
            parts.append((other.type_url, other.subscribed, other.wildcard, other.names_key,
                          id(other.acked) if other.acked else 0, id(other.sent) if other.sent else 0,
                          other.pending_nonce is None))
            held.append(other.acked)
            held.append(other.sent)
        key = tuple(parts)
        plans = self.snapshot.sotw_plans
        entry = plans.get(key)
        if entry is not None:
            return entry[0]  # type: ignore[index,no-any-return]
        plan = self._plan_push(state)
        if len(plans) < MAX_SHARED_PLANS:
            plans[key] = (plan, held)
        return plan

    def _interned(self, type_url: str, version: str, content: dict[str, Resource | None]) -> dict[str, Resource | None]:
        """One dict per (type, complete content version) and snapshot, so that streams that
        reconnect holding the current content present the same objects to ``_shared_plan``."""
        plans = self.snapshot.sotw_plans
        key = ("held", type_url, version)
        interned = plans.get(key)
        if interned is None:
            if len(plans) >= MAX_SHARED_PLANS:
                return content
            interned = plans[key] = content
        return interned  # type: ignore[return-value]

    def _plan_push(self, state: TypeState) -> _SotwPlan | None:
        """What ``_push`` sends next for this type, whatever the nonce and versions in flight;
        None while a subscribed resource is held back."""
        content, complete = self._plan(state)
        if not state.wildcard and any(name not in content for name in self._desired(state)):
            return None
        version = self._version_of(state, content, complete=complete)
        unknown = any(r is None for r in content.values())
        resources = tuple(content[n] for n in sorted(content))
        sent = state.sent
        updates = tuple(r for r in resources if r is not None and ((old := sent.get(r.name)) is None or old.version != r.version))
        return _SotwPlan(content, complete, version, resources, updates, unknown)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _SotwPlan:
    """One SotW push, shared by the streams in the same state (see ``SotwStream._shared_plan``)."""

    content: dict[str, Resource | None]  # never changed in place: streams hold it as their ``sent``
    complete: bool
    version: str
    resources: tuple[Resource, ...]  # sorted by name
    updates: tuple[Resource, ...]  # what the push adds or changes, relative to ``sent``
    unknown: bool  # some content is unknown (None): never in SotW


class DeltaStream(StreamState):
    """Incremental xDS: responses carry only changed resources and the names removed."""

    protocol = Protocol.DELTA

    @staticmethod
    def _view(snapshot: Snapshot) -> Snapshot:
        return snapshot.for_delta()

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest, now: float) -> list[Outgoing]:
        """Handle one request; the responses to write, in order. ProtocolError on a bad one."""
        type_url = request.type_url
        state = self._type_state(type_url)
        if len(state.names) + len(request.resource_names_subscribe) > MAX_NAMES or len(request.initial_resource_versions) > MAX_NAMES:
            raise ProtocolError(f"more than {MAX_NAMES} resource names subscribed for {type_url}")
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
        if acked_or_nacked or first:  # (see SotwStream.on_request)
            out += [o for o in self._push_all() if o.type_url != type_url or not out]
        return out

    def _subscribe(self, state: TypeState, request: discovery_pb2.DeltaDiscoveryRequest, first: bool) -> None:
        subscribe = list(request.resource_names_subscribe)
        if first:
            state.subscribed = True
            # Legacy wildcard: a first request naming nothing subscribes to everything. Envoy
            # (1.40) starts its VHDS subscriptions so: it names no namespace, takes every virtual
            # host sent and files each under its route configuration by name.
            if not subscribe and (state.type_url in typeurls.WILDCARD_TYPES or state.type_url in typeurls.NAMESPACED_TYPES):
                state.wildcard = True
            state.owes_answer = not request.initial_resource_versions
            pool = self.snapshot.of_type(state.type_url)
            for name, version in request.initial_resource_versions.items():
                known = pool.get(name)
                held = known if known is not None and known.version == version else None
                state.acked[name] = state.sent[name] = held
                state.unknown = state.unknown or held is None
        namespaced = state.type_url in typeurls.NAMESPACED_TYPES
        for name in subscribe:
            if name == "*":
                state.wildcard = True
                continue
            state.names.add(name)
            held = state.sent.get(name) is not None or (
                # A namespace the proxy reported resources of (reconnecting): what changed goes.
                namespaced and any(typeurls.namespace_of(n) == name for n in state.sent))
            if not (first and held):
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
            if namespaced:
                # The proxy dropped the namespace's resources too.
                state.acked = {n: r for n, r in state.acked.items() if state.wants(n)}
                state.sent = {n: r for n, r in state.sent.items() if state.wants(n)}

    def _after_unexplained_nack(self, state: TypeState, updates: tuple[Resource, ...], removed: list[str]) -> None:
        # A resource the proxy had before is still there, at its old version or the new one:
        # send it again (at the snapshot's version, or the old one if that is the rejected
        # one) so we know which. One that is new, or that the response removed, may or may
        # not be there: unknown content, sent again once it changes or removed again if the
        # snapshot lacks it. What the response carried may be applied: its requirements stay
        # until the proxy ACKs a response that brings it to the snapshot.
        held = dict(state.acked)
        state.maybe_requires = state.maybe_requires.union(*(r.requires for r in updates))
        for resource in updates:
            if not state.wants(resource.name):
                continue
            if held.get(resource.name) is not None:
                state.force_names.add(resource.name)
            else:
                held[resource.name] = None
                state.unknown = True
        for name in removed:
            if state.wants(name):
                held[name] = None
                state.unknown = True
        state.acked = held
        state.sent = dict(held)
        state.acked_version = state.sent_version = content_version(r for r in held.values() if r is not None)

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
        fast = self._changed_only(state, pool)
        if fast is not None:
            return self._send(state, pool, fast, [], [], complete=True)
        content, complete = self._plan(state)
        forced = state.force_names
        namespaced = state.type_url in typeurls.NAMESPACED_TYPES
        updates: list[Resource] = []
        for name in sorted(content):
            resource = content[name]
            if resource is None:
                continue
            held = state.sent.get(name)
            changed = held is None or held.version != resource.version
            if not (changed or name in forced or (namespaced and forced and typeurls.namespace_of(name) in forced)):
                continue
            if (name, resource.version) in state.rejected:
                # Never re-send what this proxy rejected: it keeps its last good version, so
                # it does not hold the snapshot's content.
                complete = False
                continue
            updates.append(resource)
        removed = sorted(n for n in state.sent if n not in content)
        # Subscribed names the snapshot does not have are answered as removed, so the proxy
        # need not wait for its initial fetch timeout to learn they do not exist.
        # (An empty namespace is answered so too: Envoy's VHDS waits for a first response.)
        absent = [n for n in state.force_names if not self.snapshot.covers(state.type_url, n) and n not in state.sent and state.wants(n)]
        if not updates and not removed and not absent and not (complete and state.owes_answer):
            state.force_names.clear()
            if complete:
                state.synced_generation = self.snapshot.generation
                state.synced_pool = pool
            return []
        return self._send(state, pool, updates, removed, absent, complete=complete)

    def _changed_only(self, state: TypeState, pool: Mapping[str, Resource]) -> list[Resource] | None:
        """The updates of a wildcard subscriber that held the whole previous pool, when all it
        needs is the resources that changed since, and each can go now: planned from the
        snapshot's shared diff in O(changes), not O(pool). None when the full plan is needed
        (removals, a resource that must wait, rejections, unknown content, forced names).

        Why: with VHDS a weight change alters one of thousands of virtual hosts, and the full
        plan cost ~2 ms per stream at 1,000 services (measured), against ~0.2 ms before."""
        old = state.synced_pool
        if (old is None or not state.wildcard or state.names or state.force_names or state.unknown or state.rejected
                or state.maybe_requires or len(state.sent) != len(old) or self.snapshot.wildcard_pool(state.type_url) is not pool):
            return None
        changed, removed = self.snapshot.changes_since(state.type_url, old)
        if removed or not changed:
            return None  # (nothing changed: the full plan records the proxy as in sync)
        updates = [pool[name] for name in changed]
        if not all(self._has_applied_all(r) for r in updates):
            return None  # the full plan holds back what must wait (all of it, for some types)
        return updates

    def _send(self, state: TypeState, pool: Mapping[str, Resource], updates: list[Resource], removed: list[str],
              absent: list[str], *, complete: bool) -> list[Outgoing]:
        """Encode a response and record it as in flight."""
        nonce = self._next_nonce()
        system_version = self.snapshot.version(state.type_url) if complete else ""
        payload = b"".join(
            (
                length_delimited(1, system_version.encode()),
                *(r.delta_field for r in updates),
                length_delimited(4, state.type_url.encode()),
                *(length_delimited(6, n.encode()) for n in removed),
                *(length_delimited(6, n.encode()) for n in sorted(absent)),
                length_delimited(5, nonce.encode()),
            )
        )
        sent = dict(state.sent)
        for resource in updates:
            sent[resource.name] = resource
        for name in removed:
            del sent[name]
        state.pending_base = state.sent
        state.sent = sent
        state.sent_version = system_version or content_version(r for r in state.sent.values() if r is not None)
        state.pending_nonce = state.last_nonce = nonce
        state.pending_complete_at = self.snapshot.generation if complete else None
        state.pending_updates = tuple(updates)
        state.synced_pool = pool if complete else None
        state.force_names.clear()
        state.owes_answer = False
        state.responses += 1
        self._mark_warming(updates)
        return [Outgoing(state.type_url, nonce, state.sent_version, payload, len(updates), len(removed) + len(absent))]
