"""The endpoint-source plug-in interface (docs/endpoint-sources.md).

An endpoint source reads where a service's instances already are (a file written by config
management, DNS, a Kubernetes EndpointSlice, Consul ...) and reports the endpoint set of each
(service, environment) it owns. It never writes to the store itself: the manager
(:mod:`controlplane.sources.manager`) validates what it reports, keeps the last good set, and
writes through the same operation as ``PUT /v1/services/{name}/environments/{env}``.

Nothing here does I/O; the concrete sources live in ``file.py`` and ``dns.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from ..errors import ValidationError
from ..model import MAX_ENDPOINTS, Endpoint, Environment


@dataclass(frozen=True, order=True)
class Owned:
    """One (service, environment) whose endpoints a source owns."""

    service: str
    environment: Environment

    def __str__(self) -> str:
        return f"{self.service}/{self.environment.value}"


Endpoints = tuple[Endpoint, ...]


class SourceError(Exception):
    """A source could not read its endpoints this time (unreadable or invalid file, DNS lookup
    failed). The manager keeps the last good endpoints, logs and counts it."""


class Reporter(Protocol):
    """What a running source calls. Both methods are cheap and never raise; safe to call from
    the source's own task only (the manager's event loop)."""

    def endpoints(self, found: Mapping[Owned, Endpoints]) -> None:
        """A complete, validated endpoint set for each owned (service, environment) in
        ``found``. Owned pairs absent from ``found`` keep their last reported set."""

    def error(self, message: str) -> None:
        """This round failed; nothing changes (the last good endpoints stay)."""


class EndpointSource(Protocol):
    """A plug-in. ``name`` is unique among the configured sources (it labels metrics, the API
    view and the 409 that refuses API writes to an owned environment); ``owns`` is fixed at
    start, so ownership is known even while the source has never succeeded."""

    name: str
    owns: tuple[Owned, ...]

    async def run(self, report: Reporter) -> None:
        """Report endpoints until cancelled: at once, then on every change (or every interval).
        Raising ends the source (the manager logs it and restarts it after a back-off); a
        failed round should call ``report.error`` and carry on instead."""


def parse_endpoint_list(where: str, raw: object, *, allow_empty: bool) -> Endpoints:
    """The API's endpoint shapes (``"IP:PORT"`` or ``{"address", "weight"}``), checked as
    ``PUT .../environments/{env}`` checks them. Raises SourceError naming ``where``."""
    if not isinstance(raw, list):
        raise SourceError(f"{where}: expected a list of 'IP:PORT' strings or {{address, weight}} objects, got {type(raw).__name__}")
    if len(raw) > MAX_ENDPOINTS:
        raise SourceError(f"{where}: at most {MAX_ENDPOINTS} endpoints, got {len(raw)}")
    try:
        endpoints = [Endpoint.parse(item) for item in raw]
    except ValidationError as exc:
        raise SourceError(f"{where}: {exc}") from None
    return checked_endpoints(where, endpoints, allow_empty=allow_empty)


def checked_endpoints(where: str, endpoints: Sequence[Endpoint], *, allow_empty: bool) -> Endpoints:
    """Sorted, without repeats; empty only with ``allow_empty`` (an empty set from a source is
    refused unless the operator said it means "no instances", docs/endpoint-sources.md)."""
    if len(set(endpoints)) != len(endpoints):
        raise SourceError(f"{where}: an endpoint is listed twice")
    if not endpoints and not allow_empty:
        raise SourceError(f"{where}: no endpoints (an empty set is only applied with allow_empty: true)")
    return tuple(sorted(endpoints))


def endpoints_json(endpoints: Endpoints) -> list[str | dict[str, Any]]:
    """The API's form; also what the manager compares (weights included)."""
    return [e.to_json() for e in endpoints]
