"""Endpoints from DNS: A, AAAA or SRV records, re-resolved every ``interval_seconds``, with
dnspython's asyncio resolver.

* A / AAAA: one endpoint per address, on the configured ``port``, weight 1.
* SRV: the records of the lowest priority value (higher ones are backups, RFC 2782); each
  target's A and AAAA addresses on the record's port, with the record's weight (0 counts as 1,
  the smallest weight an endpoint can have; above 10000 is capped).

A lookup that fails (timeout, SERVFAIL, refused, an SRV target that does not resolve) is an
error: the last good endpoints stay. A name that resolves to no records (NXDOMAIN, or no
records of the type) is an answer, not a failure: it means "no instances" and is applied only
with the source's ``allow_empty: true``; otherwise it is reported as an error like a failure
(docs/endpoint-sources.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from ..model import MAX_ENDPOINT_WEIGHT, Endpoint
from .base import Endpoints, Owned, Reporter, SourceError, checked_endpoints
from .spec import DnsSourceSpec


class NoRecords(SourceError):
    """The name resolved, to nothing (NXDOMAIN or no records of the type)."""


class DnsSource:
    """See the module docstring. Implements :class:`~controlplane.sources.base.EndpointSource`
    for one owned (service, environment)."""

    def __init__(self, name: str, owns: tuple[Owned, ...], spec: DnsSourceSpec, *, allow_empty: bool = False) -> None:
        self.name = name
        self.owns = owns
        self.spec = spec
        self.allow_empty = allow_empty
        self.resolver = dns.asyncresolver.Resolver(configure=not spec.nameservers)
        if spec.nameservers:
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port) for address, port in spec.nameservers]
        self.resolver.timeout = spec.timeout_seconds  # per nameserver try
        self.resolver.lifetime = spec.timeout_seconds
        # No negative caching across rounds: a name that comes back must be seen at the next round.
        self.resolver.cache = None

    async def run(self, report: Reporter) -> None:
        while True:
            try:
                endpoints = await self.resolve()
            except NoRecords as exc:
                if self.allow_empty:
                    report.endpoints({pair: () for pair in self.owns})
                else:
                    report.error(f"{self.spec.type} {self.spec.name}: {exc}")
            except SourceError as exc:
                report.error(f"{self.spec.type} {self.spec.name}: {exc}")
            else:
                report.endpoints({pair: endpoints for pair in self.owns})
            await asyncio.sleep(self.spec.interval_seconds)

    async def resolve(self) -> Endpoints:
        """The endpoints the name gives now. NoRecords for an empty answer, SourceError for a failure."""
        if self.spec.type == "SRV":
            endpoints = await self._srv()
        else:
            assert self.spec.port is not None
            endpoints = [Endpoint(address, self.spec.port) for address in await self._addresses(self.spec.name, self.spec.type)]
        if not endpoints:
            raise NoRecords("no records")
        return checked_endpoints(self.spec.name, _merge(endpoints), allow_empty=False)

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = await self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoRecords(f"{name} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise NoRecords(f"{name} has no {rdtype} records") from None
        except dns.exception.Timeout:
            raise SourceError(f"{name}: no answer within {self.spec.timeout_seconds:g}s") from None
        except dns.exception.DNSException as exc:
            raise SourceError(f"{name}: lookup failed: {exc}") from None
        return list(answer)

    async def _addresses(self, name: str, rdtype: str) -> list[str]:
        return [record.address for record in await self._query(name, rdtype)]

    async def _srv(self) -> list[Endpoint]:
        records = await self._query(self.spec.name, "SRV")
        best = min(record.priority for record in records)
        endpoints = []
        for record in (r for r in records if r.priority == best):
            target = record.target.to_text()
            addresses = []
            for rdtype in ("A", "AAAA"):
                try:
                    addresses += await self._addresses(target, rdtype)
                except NoRecords:
                    pass
            if not addresses:
                # A target that does not resolve is a broken answer, not "no instances".
                raise SourceError(f"SRV target {target} has no A or AAAA records")
            weight = min(max(record.weight, 1), MAX_ENDPOINT_WEIGHT)
            endpoints += [Endpoint(address, record.port, weight) for address in addresses]
        return endpoints


def _merge(endpoints: list[Endpoint]) -> list[Endpoint]:
    """One endpoint per address: two SRV records naming the same target and port add up."""
    merged: dict[Endpoint, int] = {}
    for endpoint in endpoints:
        merged[endpoint] = merged.get(endpoint, 0) + endpoint.weight
    return [Endpoint(e.host, e.port, min(weight, MAX_ENDPOINT_WEIGHT)) for e, weight in merged.items()]


def describe(spec: DnsSourceSpec) -> dict[str, Any]:
    return {"kind": "dns", "name": spec.name, "type": spec.type, "port": spec.port,
            "interval_seconds": spec.interval_seconds,
            "nameservers": [f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in spec.nameservers]}
