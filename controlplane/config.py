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
    xds:                                 # optional; liveness of proxy connections (defaults shown)
      keepalive_seconds: 30              # ping a connection idle this long; null: never
      keepalive_timeout_seconds: 10      # close it if the ping is not answered in time
      first_request_timeout_seconds: 10  # end a stream that sends no request in time; null: never
      max_connection_age_seconds: null   # ask clients to reconnect after about this long (+-10 %)
      max_connection_age_grace_seconds: 60  # then give open streams this long before closing

Without a file there is one fleet, ``default``, with listener ``http`` on 127.0.0.1:10000 and
preview on 127.0.0.1:10001, serving every service.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ValidationError
from .model import DEFAULT_FLEET, Fleet, ListenerSpec, validate_service_name

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")


@dataclass(frozen=True)
class XdsSettings:
    """The ``xds:`` section: how the ADS server treats proxy connections (seconds)."""

    keepalive_seconds: float | None = 30.0
    keepalive_timeout_seconds: float = 10.0
    first_request_timeout_seconds: float | None = 10.0
    max_connection_age_seconds: float | None = None
    max_connection_age_grace_seconds: float = 60.0


@dataclass(frozen=True)
class Settings:
    fleets: tuple[Fleet, ...] = (DEFAULT_FLEET,)
    admin_token: str | None = None
    xds: XdsSettings = XdsSettings()

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


def _fleet(name: str, raw: object) -> Fleet:
    where = f"fleets.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{where}: invalid fleet name {name!r}")
    data = _mapping(where, raw)
    _check_keys(where, data, {"listeners", "services"})
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


def _seconds(where: str, value: object, *, nullable: bool) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 365 * 86400:
        expected = "a number of seconds > 0" + (" or null" if nullable else "")
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    return float(value)


# The xds section's plain duration keys: name -> may it be null. Other kinds of keys (e.g. TLS
# files) get their own parser in _xds and their name in _XDS_KEYS.
_XDS_DURATIONS = {
    "keepalive_seconds": True,
    "keepalive_timeout_seconds": False,
    "first_request_timeout_seconds": True,
    "max_connection_age_seconds": True,
    "max_connection_age_grace_seconds": False,
}
_XDS_KEYS = set(_XDS_DURATIONS)


def _xds(raw: object) -> XdsSettings:
    data = _mapping("xds", raw)
    _check_keys("xds", data, _XDS_KEYS)
    values: dict[str, Any] = {}
    for key, nullable in _XDS_DURATIONS.items():
        if key in data:
            values[key] = _seconds(f"xds.{key}", data[key], nullable=nullable)
    return XdsSettings(**values)


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
    if "fleets" in root:
        raw = _mapping("fleets", root["fleets"])
        if not raw:
            raise ConfigError("fleets: define at least one fleet")
        fleets = tuple(_fleet(str(name), value) for name, value in raw.items())
    xds = _xds(root["xds"]) if "xds" in root else XdsSettings()
    return Settings(fleets=fleets, admin_token=token, xds=xds)


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
