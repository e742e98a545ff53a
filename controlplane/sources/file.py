"""A watched file of endpoints (YAML or JSON), e.g. written by config management.

The file maps service -> environment -> endpoint list, in the API's endpoint shapes::

    shop:
      green: ["10.0.1.1:8080", {address: "10.0.1.2:8080", weight: 2}]

Watching is a poll of the file's content every ``poll_seconds``: it sees atomic renames (the
usual way config management replaces a file: a new inode under the old name) as well as
in-place writes, on every filesystem, with no inotify limits. Reading a small file once a
second costs nothing next to the rest of the control plane; a change is acted upon only when
the content's hash changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..model import Environment
from .base import Endpoints, Owned, Reporter, SourceError, parse_endpoint_list
from .spec import FileSourceSpec


def parse_endpoints_file(text: str, fmt: str, owns: tuple[Owned, ...], *, allow_empty: bool) -> dict[Owned, Endpoints]:
    """The endpoint set of every owned pair. The whole file is refused (SourceError naming the
    place) if it does not parse, lists an endpoint the API would refuse, misses an owned pair,
    or names a (service, environment) this source does not own: a typo must not pass silently."""
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SourceError(f"not valid {fmt.upper()}: {exc}") from None
    if not isinstance(data, Mapping):
        raise SourceError(f"expected a mapping of service -> environment -> endpoints, got {type(data).__name__}")
    owned = set(owns)
    found: dict[Owned, Endpoints] = {}
    for service, environments in data.items():
        if not isinstance(environments, Mapping):
            raise SourceError(f"{service}: expected a mapping of environment -> endpoints, got {type(environments).__name__}")
        for env_name, raw in environments.items():
            try:
                pair = Owned(str(service), Environment.parse(env_name))
            except Exception:
                raise SourceError(f"{service}.{env_name}: unknown environment (blue or green)") from None
            if pair not in owned:
                raise SourceError(f"{service}.{env_name}: not owned by this source (add it to the source's owns in the config)")
            found[pair] = parse_endpoint_list(f"{service}.{env_name}", raw, allow_empty=allow_empty)
    missing = sorted(str(pair) for pair in owned - set(found))
    if missing:
        raise SourceError(f"missing {', '.join(missing)} (every owned service/environment must be listed)")
    return found


class FileSource:
    """See the module docstring. Implements :class:`~controlplane.sources.base.EndpointSource`."""

    def __init__(self, name: str, owns: tuple[Owned, ...], spec: FileSourceSpec, *, allow_empty: bool = False) -> None:
        self.name = name
        self.owns = owns
        self.spec = spec
        self.allow_empty = allow_empty

    async def run(self, report: Reporter) -> None:
        """Reads the file now and whenever its content (or its absence) changes; each new
        content is judged once, so a bad file is reported once, not once per poll."""
        last: object = None
        while True:
            try:
                raw = await asyncio.to_thread(Path(self.spec.path).read_bytes)
            except OSError as exc:
                key: object = ("unreadable", exc.errno)
                if key != last:
                    report.error(f"cannot read {self.spec.path}: {exc.strerror or exc}")
            else:
                key = hashlib.sha256(raw).digest()
                if key != last:
                    problem = self._read(raw, report)
                    if problem is not None:
                        report.error(problem)
            last = key
            await asyncio.sleep(self.spec.poll_seconds)

    def _read(self, raw: bytes, report: Reporter) -> str | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"{self.spec.path}: not UTF-8 text"
        try:
            found = parse_endpoints_file(text, self.spec.format, self.owns, allow_empty=self.allow_empty)
        except SourceError as exc:
            return f"{self.spec.path}: {exc}"
        report.endpoints(found)
        return None


def describe(spec: FileSourceSpec) -> dict[str, Any]:
    return {"kind": "file", "path": spec.path, "format": spec.format, "poll_seconds": spec.poll_seconds}
