"""Who is at the other end of a gRPC stream, and how many streams each client may hold.

Protocol-level only: an identity is what the transport proved (the verified client
certificate's URI and DNS SANs under mTLS), never what the client claims in a message. Which
identities may join which fleet is decided outside this package (``fleet.builder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class PeerIdentity:
    """The transport-level identity of a stream's client.

    ``names``: the URI SANs (SPIFFE IDs), then the DNS SANs, of the client certificate that the
    TLS handshake verified against the configured client CA; empty without mTLS. ``address``:
    gRPC's peer string (``ipv4:127.0.0.1:5000``)."""

    address: str
    names: tuple[str, ...] = ()

    @property
    def authenticated(self) -> bool:
        return bool(self.names)

    @property
    def key(self) -> str:
        """What per-client limits count by: the first certificate name under mTLS, else the
        client's IP address (without the port: one host's reconnects are one client)."""
        if self.names:
            return self.names[0]
        return _host(self.address)

    def describe(self) -> str:
        return self.names[0] if self.names else f"unauthenticated peer {self.address}"

    @classmethod
    def from_context(cls, context: Any) -> PeerIdentity:
        """From a grpc.aio ``ServicerContext``. grpcio exposes a verified certificate's SANs as
        ``peer_uri`` and ``peer_dns`` in the auth context (checked with grpcio 1.85)."""
        auth = context.auth_context() or {}
        names: list[str] = []
        for key in ("peer_uri", "peer_dns"):
            for value in auth.get(key, ()):
                name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                if name and name not in names:
                    names.append(name)
        return cls(str(context.peer() or ""), tuple(names))


def _host(address: str) -> str:
    """``ipv4:1.2.3.4:5`` -> ``1.2.3.4``; ``ipv6:[::1]:5`` -> ``::1``; anything else unchanged."""
    kind, sep, rest = address.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return address
    host = rest.rpartition(":")[0] or rest
    return host.strip("[]")


@dataclass(frozen=True)
class StreamLimits:
    """Caps on concurrent streams (ADS and metrics together); None: no cap."""

    max_streams: int | None = None
    max_streams_per_identity: int | None = None


class StreamLimiter:
    """Counts the open streams per client (:attr:`PeerIdentity.key`) and in total, and refuses
    new ones beyond :class:`StreamLimits`. ``on_refused(reason)`` is called for each refusal,
    with reason ``streams_total`` or ``streams_per_identity``. Not thread-safe: event loop only."""

    def __init__(self, limits: StreamLimits | None = None, on_refused: Callable[[str], None] | None = None) -> None:
        self.limits = limits or StreamLimits()
        self._on_refused = on_refused
        self._per_key: dict[str, int] = {}
        self.total = 0

    def acquire(self, peer: PeerIdentity) -> str | None:
        """Count a new stream of ``peer``; or, if a cap is reached, return the refusal message
        (naming the cap) and count nothing."""
        limits, key = self.limits, peer.key
        if limits.max_streams is not None and self.total >= limits.max_streams:
            return self._refuse("streams_total", f"stream cap reached: {self.total} streams open (xds.max_streams "
                                f"= {limits.max_streams}); retry later or on another replica")
        held = self._per_key.get(key, 0)
        if limits.max_streams_per_identity is not None and held >= limits.max_streams_per_identity:
            return self._refuse("streams_per_identity", f"per-client stream cap reached: {peer.describe()} holds {held} "
                                f"streams (xds.max_streams_per_identity = {limits.max_streams_per_identity})")
        self._per_key[key] = held + 1
        self.total += 1
        return None

    def release(self, peer: PeerIdentity) -> None:
        key = peer.key
        held = self._per_key.get(key, 0)
        if held <= 1:
            self._per_key.pop(key, None)
        else:
            self._per_key[key] = held - 1
        self.total = max(0, self.total - 1)

    def held(self, peer: PeerIdentity) -> int:
        return self._per_key.get(peer.key, 0)

    def _refuse(self, reason: str, message: str) -> str:
        if self._on_refused is not None:
            self._on_refused(reason)
        return message
