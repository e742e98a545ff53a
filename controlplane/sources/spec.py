"""The ``endpoint_sources:`` section of the config file, as frozen settings (parsed in
:mod:`controlplane.config`; docs/endpoint-sources.md)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Owned

DNS_TYPES = ("A", "AAAA", "SRV")


@dataclass(frozen=True)
class FileSourceSpec:
    path: str
    format: str  # yaml | json
    poll_seconds: float = 1.0


@dataclass(frozen=True)
class DnsSourceSpec:
    name: str  # the DNS name to resolve
    type: str  # A | AAAA | SRV
    port: int | None = None  # A/AAAA: required; SRV: from the records
    interval_seconds: float = 30.0
    timeout_seconds: float = 5.0
    nameservers: tuple[tuple[str, int], ...] = ()  # (address, port); empty: the system's (/etc/resolv.conf)


@dataclass(frozen=True)
class SourceSpec:
    """One configured source: its name, what it owns, and exactly one kind."""

    name: str
    owns: tuple[Owned, ...]
    allow_empty: bool = False
    file: FileSourceSpec | None = None
    dns: DnsSourceSpec | None = None
