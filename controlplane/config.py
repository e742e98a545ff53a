"""The control plane's configuration file (``--config FILE``), loaded once into frozen settings.

Example::

    admin:
      token_file: /etc/bluegreen/token   # or `token: "..."`; required to bind a non-loopback address
    fleets:
      edge:                              # Envoys with node.cluster "edge"
        listeners:
          - name: http
            address: 0.0.0.0
            port: 10000
            preview_port: 10001          # optional: everything here goes to the idle environment
        services: ["shop", "search"]     # optional; default: every service
        identities:                      # optional (needs xds.tls): client certificate URI/DNS
          - "spiffe://example.org/edge/*"  # SANs allowed to join; '*' matches within one path segment
    xds:
      tls:                               # optional: mTLS on the xDS port
        cert: /etc/bluegreen/xds.crt     # the server's certificate chain (PEM)
        key: /etc/bluegreen/xds.key
        client_ca: /etc/bluegreen/proxies-ca.crt  # proxies must present a certificate it signed
      max_request_bytes: 16777216        # largest gRPC message accepted (ADS and metrics)
      max_streams: 100000                # open streams in total (ADS and metrics)
      max_streams_per_identity: 64       # optional: per certificate identity (or per IP without TLS)

Without a file there is one fleet, ``default``, with listener ``http`` on 127.0.0.1:10000 and
preview on 127.0.0.1:10001, serving every service.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ValidationError
from .model import DEFAULT_FLEET, Fleet, ListenerSpec, validate_service_name

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")


DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_STREAMS = 100_000


@dataclass(frozen=True)
class XdsTls:
    """PEM files for mTLS on the xDS port, read when the server starts."""

    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class XdsSettings:
    """The ``xds:`` section. Caps of None are off."""

    tls: XdsTls | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_streams: int | None = DEFAULT_MAX_STREAMS
    max_streams_per_identity: int | None = None


@dataclass(frozen=True)
class Settings:
    fleets: tuple[Fleet, ...] = (DEFAULT_FLEET,)
    admin_token: str | None = None
    xds: XdsSettings = XdsSettings()
    # fleet name -> identity patterns allowed to join it (fleets absent here: any client the
    # transport admits). See :func:`identity_allowed`.
    fleet_identities: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def fleet(self, name: str) -> Fleet | None:
        for fleet in self.fleets:
            if fleet.name == name:
                return fleet
        return None


def _check_keys(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _mapping(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _port(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{where}: expected a port number 1-65535, got {value!r}")
    return value


def _listener(where: str, raw: object) -> ListenerSpec:
    data = _mapping(where, raw)
    _check_keys(where, data, {"name", "address", "port", "preview_port"})
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith("-preview"):
        raise ConfigError(f"{where}.name: expected a name of letters, digits, '_' or '-' (not ending in '-preview'), got {name!r}")
    address = data.get("address", "127.0.0.1")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"{where}.address: expected an IP address, got {address!r}") from None
    if getattr(parsed, "scope_id", None):
        raise ConfigError(f"{where}.address: IPv6 zone ids ('%...') are not supported by Envoy, got {address!r}")
    port = _port(f"{where}.port", data.get("port"))
    preview = data.get("preview_port")
    preview_port = _port(f"{where}.preview_port", preview) if preview is not None else None
    return ListenerSpec(name=name, address=address, port=port, preview_port=preview_port)


def identity_allowed(patterns: tuple[str, ...], names: tuple[str, ...]) -> bool:
    """Whether any certificate name (URI or DNS SAN) matches any pattern. A pattern is matched
    whole and case-sensitively; ``*`` stands for one or more characters other than ``/``, so
    ``spiffe://example.org/edge/*`` admits ``spiffe://example.org/edge/envoy-1`` but neither
    ``.../edge`` nor ``.../edge/a/b``."""
    return any(_identity_regex(p).fullmatch(n) for p in patterns for n in names)


_IDENTITY_REGEXES: dict[str, re.Pattern[str]] = {}


def _identity_regex(pattern: str) -> re.Pattern[str]:
    regex = _IDENTITY_REGEXES.get(pattern)
    if regex is None:
        regex = _IDENTITY_REGEXES[pattern] = re.compile("[^/]+".join(re.escape(part) for part in pattern.split("*")))
    return regex


def _identities(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() == v and v for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of certificate identities (URI or DNS SANs), "
                          f"e.g. [\"spiffe://example.org/edge/*\"]")
    for pattern in value:
        if "**" in pattern or pattern == "*":
            raise ConfigError(f"{where}: pattern {pattern!r} is too broad: '*' matches one path segment, give the rest")
    return tuple(value)


def _xds_settings(raw: object) -> XdsSettings:
    """The ``xds:`` section (see the module docstring)."""
    data = _mapping("xds", raw)
    _check_keys("xds", data, {"tls", "max_request_bytes", "max_streams", "max_streams_per_identity"})
    tls = None
    if "tls" in data:
        t = _mapping("xds.tls", data["tls"])
        _check_keys("xds.tls", t, {"cert", "key", "client_ca"})
        paths = {}
        for key in ("cert", "key", "client_ca"):
            value = t.get(key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"xds.tls.{key}: expected a file path (PEM), got {value!r}")
            if not Path(value).is_file():
                raise ConfigError(f"xds.tls.{key}: no such file {value!r}")
            paths[key] = Path(value)
        tls = XdsTls(**paths)
    return XdsSettings(
        tls=tls,
        max_request_bytes=_positive("xds.max_request_bytes", data.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
                                    minimum=64 * 1024),
        max_streams=_positive("xds.max_streams", data.get("max_streams", DEFAULT_MAX_STREAMS)),
        max_streams_per_identity=(_positive("xds.max_streams_per_identity", data["max_streams_per_identity"])
                                  if data.get("max_streams_per_identity") is not None else None),
    )


def _positive(where: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: expected an integer of at least {minimum}, got {value!r}")
    return value


def _fleet(name: str, raw: object) -> Fleet:
    where = f"fleets.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{where}: invalid fleet name {name!r}")
    data = _mapping(where, raw)
    _check_keys(where, data, {"listeners", "services", "identities"})
    raw_listeners = data.get("listeners")
    if not isinstance(raw_listeners, list) or not raw_listeners:
        raise ConfigError(f"{where}.listeners: expected a non-empty list")
    listeners = tuple(_listener(f"{where}.listeners[{i}]", item) for i, item in enumerate(raw_listeners))
    names = [l.name for l in listeners]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.listeners: names must be unique, got {names}")
    ports = [p for l in listeners for p in (l.port, l.preview_port) if p is not None]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"{where}.listeners: every port and preview_port must be distinct, got {ports}")
    services = data.get("services")
    if services is None or services == ["*"]:
        chosen = None
    elif isinstance(services, list) and all(isinstance(s, str) for s in services):
        try:
            chosen = tuple(validate_service_name(s) for s in services)
        except ValidationError as exc:
            raise ConfigError(f"{where}.services: {exc}") from None
    else:
        raise ConfigError(f"{where}.services: expected a list of service names or [\"*\"]")
    return Fleet(name=name, listeners=listeners, services=chosen)


def parse_settings(data: object) -> Settings:
    if data is None:
        return Settings()
    root = _mapping("config", data)
    _check_keys("config", root, {"admin", "fleets", "xds"})
    token = None
    if "admin" in root:
        admin = _mapping("admin", root["admin"])
        _check_keys("admin", admin, {"token", "token_file"})
        if "token" in admin and "token_file" in admin:
            raise ConfigError("admin: give token or token_file, not both")
        if "token" in admin:
            token = admin["token"]
        elif "token_file" in admin:
            try:
                token = Path(admin["token_file"]).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"admin.token_file: {exc}") from exc
        if token is not None and (not isinstance(token, str) or len(token) < 16):
            raise ConfigError("admin token: expected a string of at least 16 characters")
    fleets: tuple[Fleet, ...] = (DEFAULT_FLEET,)
    identities: dict[str, tuple[str, ...]] = {}
    if "fleets" in root:
        raw = _mapping("fleets", root["fleets"])
        if not raw:
            raise ConfigError("fleets: define at least one fleet")
        fleets = tuple(_fleet(str(name), value) for name, value in raw.items())
        for name, value in raw.items():
            if isinstance(value, dict) and "identities" in value:
                identities[str(name)] = _identities(f"fleets.{name}.identities", value["identities"])
    xds = _xds_settings(root["xds"]) if "xds" in root else XdsSettings()
    if identities and xds.tls is None:
        # Without mTLS there is no verified identity to match: the list would refuse every proxy.
        raise ConfigError(f"fleets.{next(iter(identities))}.identities: needs xds.tls (client certificates)")
    return Settings(fleets=fleets, admin_token=token, xds=xds, fleet_identities=identities)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses repeated keys: PyYAML would silently keep the last one (e.g. a fleet defined twice)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_settings(path: str | Path | None) -> Settings:
    if path is None:
        return Settings()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    return parse_settings(data)
