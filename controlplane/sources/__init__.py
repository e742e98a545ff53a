"""Endpoint sources: endpoints from where they already are (docs/endpoint-sources.md).

``base`` is the plug-in interface, ``file`` and ``dns`` the two built-in sources, ``manager``
runs them and applies what they report; :func:`build_sources` turns the config's specs into
sources.
"""

from __future__ import annotations

from typing import Any

from .base import EndpointSource, Endpoints, Owned, Reporter, SourceError
from .manager import EndpointSources
from .spec import DnsSourceSpec, FileSourceSpec, SourceSpec

__all__ = ["DnsSourceSpec", "EndpointSource", "EndpointSources", "Endpoints", "FileSourceSpec", "Owned", "Reporter",
           "SourceError", "SourceSpec", "build_sources"]


def build_sources(specs: tuple[SourceSpec, ...]) -> list[tuple[EndpointSource, dict[str, Any]]]:
    """One source per spec, with the description ``GET /v1/endpoint-sources`` shows. A new kind
    of source is added here (and to the config parser)."""
    from . import dns, file  # late: dnspython is only imported when a DNS source is configured

    built: list[tuple[EndpointSource, dict[str, Any]]] = []
    for spec in specs:
        if spec.file is not None:
            built.append((file.FileSource(spec.name, spec.owns, spec.file, allow_empty=spec.allow_empty),
                          {**file.describe(spec.file), "allow_empty": spec.allow_empty}))
        elif spec.dns is not None:
            built.append((dns.DnsSource(spec.name, spec.owns, spec.dns, allow_empty=spec.allow_empty),
                          {**dns.describe(spec.dns), "allow_empty": spec.allow_empty}))
    return built
