"""The control plane's configuration file (``--config FILE``), loaded once into frozen settings.

Example::

    admin:
      tokens:                            # named bearer tokens, each with a role (viewer, operator, admin)
        - {name: ci, token_file: /etc/bluegreen/ci.token, role: operator}
        - {name: oncall, token_file: /etc/bluegreen/oncall.token, role: admin}
      hosts: [bluegreen.internal]        # Host names the admin API answers to (besides IPs and localhost)
      tls: {cert: /etc/bluegreen/tls.crt, key: /etc/bluegreen/tls.key}
    smoke:
      commands_allowed:                  # argv prefixes a deployment's smoke commands may start with
        - ["/usr/local/bin/smoke-check"]
    webhooks:
      allowed: ["https://hooks.internal/bluegreen/", "10.0.0.0/8"]   # default: loopback only
    migrations:
      databases_allowed: ["db.internal:5432"]                          # default: loopback only
    analysis:
      prometheus_allowed: ["https://prometheus.internal/"]             # default: loopback only
    notifications:                       # deployment event webhooks (docs/notifications.md)
      webhooks:
        - {url: "https://hooks.internal/bluegreen", secret_file: /etc/bluegreen/hook.secret, format: json, events: []}
    fleets:
      edge:                              # Envoys with node.cluster "edge"
        listeners:
          - name: http
            address: 0.0.0.0
            port: 10000
            preview_port: 10001          # optional: everything here goes to the idle environment
        services: ["shop", "search"]     # optional; default: every service
        identities:                      # optional (needs xds.tls): client certificate URI/DNS
          - "spiffe://example.org/edge/*"  # SANs allowed to join; '*' = one path segment or DNS label
    convergence:
      lagging_after_seconds: 10          # a proxy behind that ACKs nothing this long is lagging: gates stop waiting for it
    xds:                                 # optional (defaults shown)
      keepalive_seconds: 30              # ping a connection idle this long; null: never
      keepalive_timeout_seconds: 10      # close it if the ping is not answered in time
      first_request_timeout_seconds: 10  # end a stream that sends no request in time; null: never
      max_connection_age_seconds: null   # ask clients to reconnect after about this long (+-10 %)
      max_connection_age_grace_seconds: 60  # then give open streams this long before closing
      tls:                               # optional: mTLS on the xDS port
        cert: /etc/bluegreen/xds.crt     # the server's certificate chain (PEM)
        key: /etc/bluegreen/xds.key
        client_ca: /etc/bluegreen/proxies-ca.crt  # proxies must present a certificate it signed
      max_request_bytes: 16777216        # largest gRPC message accepted (ADS and metrics)
      max_streams: 100000                # open streams in total (ADS and metrics)
      max_streams_per_identity: 64       # optional: per certificate identity (or per IP without TLS), per worker
      route_split: vhds                  # Delta proxies get route tables one virtual host at a time
                                         # (VHDS, needs Envoy >= 1.40 for VHDS over ADS); off: whole tables
      workers: null                      # xDS worker processes on the port; null: one per core; 1: none (docs/workers.md)
    endpoint_sources:                    # optional: endpoints from where they already are (docs/endpoint-sources.md)
      - name: cm-file                    # unique; labels metrics, GET /v1/endpoint-sources and 409s
        owns:                            # or `service: shop` + `environment: green` for one pair
          - {service: shop, environment: green}
        file: {path: /etc/bluegreen/endpoints.yaml, format: yaml, poll_seconds: 1}  # format: yaml | json (default: by extension)
      - name: search-green-dns
        service: search
        environment: green
        allow_empty: false               # an empty answer/list means "no instances" only when true
        dns: {name: _http._tcp.search-green.internal, type: SRV, interval_seconds: 30,
              timeout_seconds: 5, nameservers: ["10.0.0.2", "10.0.0.3:5353"]}    # A/AAAA also need port

The older single-token form ``admin: {token: ...}`` or ``admin: {token_file: ...}`` still works:
one token named ``admin`` with role ``admin``. With no token configured at all, ``bluegreen
serve`` generates one (see :mod:`controlplane.serve`). Token values never appear in error messages.

Without a file there is one fleet, ``default``, with listener ``http`` on 127.0.0.1:10000 and
preview on 127.0.0.1:10001, serving every service.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ValidationError
from .model import DEFAULT_FLEET, Environment, Fleet, ListenerSpec, validate_service_name
from .notify.events import WebhookTarget, parse_webhook
from .sources.base import Owned
from .sources.spec import DNS_TYPES, DnsSourceSpec, FileSourceSpec, SourceSpec

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")
MIN_TOKEN_LENGTH = 16
ROLES = ("viewer", "operator", "admin")
LOOPBACK_RULES: tuple[str, ...] = ("127.0.0.0/8", "::1", "localhost")


@dataclass(frozen=True)
class TokenSpec:
    """A named bearer token and its role. ``repr`` hides the value: settings get logged."""

    name: str
    token: str = field(repr=False)
    role: str = "admin"


@dataclass(frozen=True)
class AdminSettings:
    tokens: tuple[TokenSpec, ...] = ()
    hosts: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class Allowlists:
    """What deployments may make the control plane run or call (see controlplane/admin/policy.py)."""

    smoke_commands: tuple[tuple[str, ...], ...] = ()
    webhooks: tuple[str, ...] = LOOPBACK_RULES
    databases: tuple[str, ...] = LOOPBACK_RULES
    prometheus: tuple[str, ...] = LOOPBACK_RULES  # analysis.prometheus_allowed: Prometheus servers analysis may query


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
    """The ``xds:`` section: how the ADS server treats proxy connections. Durations are in
    seconds; caps and durations of None are off."""

    keepalive_seconds: float | None = 30.0
    keepalive_timeout_seconds: float = 10.0
    first_request_timeout_seconds: float | None = 10.0
    max_connection_age_seconds: float | None = None
    max_connection_age_grace_seconds: float = 60.0
    tls: XdsTls | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_streams: int | None = DEFAULT_MAX_STREAMS
    max_streams_per_identity: int | None = None
    # xDS worker processes sharing the port (docs/workers.md); None: one per core this process
    # may use; 1: serve xDS in the main process (no workers). `serve --xds-workers` overrides it.
    workers: int | None = None
    # "vhds": Delta proxies get each virtual host of the route tables as a resource of its own;
    # "off": every proxy gets whole route tables (docs/route-tables.md).
    route_split: str = "vhds"


ROUTE_SPLITS = ("vhds", "off")


@dataclass(frozen=True)
class Settings:
    fleets: tuple[Fleet, ...] = (DEFAULT_FLEET,)
    admin_token: str | None = None  # shorthand for one token named "admin" with role admin
    admin: AdminSettings = AdminSettings()
    allow: Allowlists = Allowlists()
    lagging_after_seconds: float = 10.0
    xds: XdsSettings = XdsSettings()
    # fleet name -> identity patterns allowed to join it (fleets absent here: any client the
    # transport admits). See :func:`identity_allowed`.
    fleet_identities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    notifications: tuple[WebhookTarget, ...] = ()  # the notifications: section (docs/notifications.md)
    endpoint_sources: tuple[SourceSpec, ...] = ()  # the endpoint_sources: section (docs/endpoint-sources.md)

    def tokens(self) -> tuple[TokenSpec, ...]:
        """Every configured token; empty means `bluegreen serve` generates one."""
        legacy = (TokenSpec("admin", self.admin_token, "admin"),) if self.admin_token else ()
        return legacy + self.admin.tokens

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
    """Whether any certificate name matches any pattern. A pattern is matched whole and
    case-sensitively. A URI pattern (with ``://``) matches URI SANs only, and its ``*`` stands
    for one or more characters other than ``/``: ``spiffe://example.org/edge/*`` admits
    ``spiffe://example.org/edge/envoy-1`` but neither ``.../edge`` nor ``.../edge/a/b``. A DNS
    pattern matches DNS SANs only, and its ``*`` stays within one label: ``*.edge.example.com``
    admits ``a.edge.example.com``, not ``a.b.edge.example.com``."""
    return any(_is_uri(p) == _is_uri(n) and _identity_regex(p).fullmatch(n) for p in patterns for n in names)


def _is_uri(name: str) -> bool:
    return "://" in name


_IDENTITY_REGEXES: dict[str, re.Pattern[str]] = {}


def _identity_regex(pattern: str) -> re.Pattern[str]:
    regex = _IDENTITY_REGEXES.get(pattern)
    if regex is None:
        wildcard = "[^/]+" if _is_uri(pattern) else "[^./]+"
        regex = _IDENTITY_REGEXES[pattern] = re.compile(wildcard.join(re.escape(part) for part in pattern.split("*")))
    return regex


def _identities(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() == v and v for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of certificate identities (URI or DNS SANs), "
                          f"e.g. [\"spiffe://example.org/edge/*\"]")
    for pattern in value:
        if "**" in pattern or pattern == "*":
            raise ConfigError(f"{where}: pattern {pattern!r} is too broad: '*' matches one path segment, give the rest")
    return tuple(value)


def _xds_tls_and_limits(data: dict[str, Any]) -> dict[str, Any]:
    """The ``xds:`` section's TLS files and stream limits (see the module docstring)."""
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
    return dict(
        tls=tls,
        max_request_bytes=_positive("xds.max_request_bytes", data.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
                                    minimum=64 * 1024),
        max_streams=_positive("xds.max_streams", data.get("max_streams", DEFAULT_MAX_STREAMS)),
        max_streams_per_identity=(_positive("xds.max_streams_per_identity", data["max_streams_per_identity"])
                                  if data.get("max_streams_per_identity") is not None else None),
        workers=_positive("xds.workers", data["workers"]) if data.get("workers") is not None else None,
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


def _token_value(where: str, data: dict[str, Any]) -> str:
    """The token from ``token`` or ``token_file`` (stripped). Errors never echo the value."""
    if "token" in data and "token_file" in data:
        raise ConfigError(f"{where}: give token or token_file, not both")
    if "token" in data:
        token = data["token"]
    elif "token_file" in data:
        path = Path(str(data["token_file"]))
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.token_file: {exc}") from exc
        if path.stat().st_mode & 0o077:
            log.warning("%s.token_file %s is readable by group or others; chmod 600 it", where, path)
    else:
        raise ConfigError(f"{where}: give token or token_file")
    if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{where} token: expected a string of at least {MIN_TOKEN_LENGTH} characters")
    return token


def _token_spec(where: str, raw: object) -> TokenSpec:
    data = _mapping(where, raw)
    _check_keys(where, data, {"name", "token", "token_file", "role"})
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: expected a name of letters, digits, '_' or '-', got {name!r}")
    role = data.get("role")
    if role not in ROLES:
        raise ConfigError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
    return TokenSpec(name=name, token=_token_value(where, data), role=role)


def _string_list(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a list of non-empty strings")
    return tuple(value)


def _admin(raw: object) -> tuple[str | None, AdminSettings]:
    admin = _mapping("admin", raw)
    _check_keys("admin", admin, {"token", "token_file", "tokens", "hosts", "tls"})
    legacy = _token_value("admin", admin) if ("token" in admin or "token_file" in admin) else None
    raw_tokens = admin.get("tokens", [])
    if not isinstance(raw_tokens, list):
        raise ConfigError("admin.tokens: expected a list of {name, token | token_file, role}")
    tokens = tuple(_token_spec(f"admin.tokens[{i}]", item) for i, item in enumerate(raw_tokens))
    names = [t.name for t in tokens] + (["admin"] if legacy else [])
    if len(set(names)) != len(names):
        raise ConfigError(f"admin.tokens: names must be unique (admin.token is named 'admin'), got {names}")
    values = [t.token for t in tokens] + ([legacy] if legacy else [])
    if len(set(values)) != len(values):
        raise ConfigError("admin.tokens: two tokens have the same value; each name needs its own token")
    hosts = _string_list("admin.hosts", admin.get("hosts", []))
    cert = key = None
    if "tls" in admin:
        tls = _mapping("admin.tls", admin["tls"])
        _check_keys("admin.tls", tls, {"cert", "key"})
        for k in ("cert", "key"):
            if not isinstance(tls.get(k), str) or not Path(tls[k]).is_file():
                raise ConfigError(f"admin.tls.{k}: expected the path of a PEM file, got {tls.get(k)!r}")
        cert, key = tls["cert"], tls["key"]
    return legacy, AdminSettings(tokens=tokens, hosts=hosts, tls_cert=cert, tls_key=key)


def _smoke_commands(raw: object) -> tuple[tuple[str, ...], ...]:
    smoke = _mapping("smoke", raw)
    _check_keys("smoke", smoke, {"commands_allowed"})
    entries = smoke.get("commands_allowed", [])
    if not isinstance(entries, list):
        raise ConfigError("smoke.commands_allowed: expected a list of argv prefixes (a program path, or a list of strings)")
    allowed = []
    for i, entry in enumerate(entries):
        prefix = [entry] if isinstance(entry, str) else entry
        if not isinstance(prefix, list) or not prefix or not all(isinstance(a, str) and a for a in prefix):
            raise ConfigError(f"smoke.commands_allowed[{i}]: expected a program path or a non-empty list of strings")
        allowed.append(tuple(prefix))
    return tuple(allowed)


def _rules(where: str, raw: object, key: str) -> tuple[str, ...]:
    from .admin.policy import check_rule  # late: the policy module needs this one's Allowlists

    data = _mapping(where, raw)
    _check_keys(where, data, {key})
    rules = _string_list(f"{where}.{key}", data.get(key, list(LOOPBACK_RULES)))
    for i, rule in enumerate(rules):
        problem = check_rule(rule)
        if problem:
            raise ConfigError(f"{where}.{key}[{i}]: {problem}")
    return rules


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
_XDS_KEYS = set(_XDS_DURATIONS) | {"tls", "max_request_bytes", "max_streams", "max_streams_per_identity", "route_split", "workers"}


def _xds(raw: object) -> XdsSettings:
    data = _mapping("xds", raw)
    _check_keys("xds", data, _XDS_KEYS)
    values: dict[str, Any] = {}
    for key, nullable in _XDS_DURATIONS.items():
        if key in data:
            values[key] = _seconds(f"xds.{key}", data[key], nullable=nullable)
    values.update(_xds_tls_and_limits(data))
    if "route_split" in data:
        split = data["route_split"]
        if split is False:  # YAML reads a bare `off` as false
            split = "off"
        if split not in ROUTE_SPLITS:
            raise ConfigError(f"xds.route_split: expected one of {', '.join(ROUTE_SPLITS)}, got {split!r}")
        values["route_split"] = split
    return XdsSettings(**values)


def parse_settings(data: object) -> Settings:
    if data is None:
        return Settings()
    root = _mapping("config", data)
    _check_keys("config", root, {"admin", "convergence", "fleets", "smoke", "webhooks", "migrations", "xds", "notifications", "analysis",
                                  "endpoint_sources"})
    token, admin = _admin(root["admin"]) if "admin" in root else (None, AdminSettings())
    allow = Allowlists(
        smoke_commands=_smoke_commands(root["smoke"]) if "smoke" in root else (),
        webhooks=_rules("webhooks", root["webhooks"], "allowed") if "webhooks" in root else LOOPBACK_RULES,
        databases=_rules("migrations", root["migrations"], "databases_allowed") if "migrations" in root else LOOPBACK_RULES,
        prometheus=_rules("analysis", root["analysis"], "prometheus_allowed") if "analysis" in root else LOOPBACK_RULES,
    )
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
    lagging_after = 10.0
    if "convergence" in root:
        convergence = _mapping("convergence", root["convergence"])
        _check_keys("convergence", convergence, {"lagging_after_seconds"})
        raw_lagging = convergence.get("lagging_after_seconds", lagging_after)
        if isinstance(raw_lagging, bool) or not isinstance(raw_lagging, (int, float)) or not 0 < raw_lagging <= 3600:
            raise ConfigError(f"convergence.lagging_after_seconds: expected a number of seconds > 0 and <= 3600, got {raw_lagging!r}")
        lagging_after = float(raw_lagging)
    xds = _xds(root["xds"]) if "xds" in root else XdsSettings()
    if identities and xds.tls is None:
        # Without mTLS there is no verified identity to match: the list would refuse every proxy.
        raise ConfigError(f"fleets.{next(iter(identities))}.identities: needs xds.tls (client certificates)")
    notifications = _notifications(root["notifications"], allow) if "notifications" in root else ()
    sources = _endpoint_sources(root["endpoint_sources"]) if "endpoint_sources" in root else ()
    return Settings(fleets=fleets, admin_token=token, admin=admin, allow=allow, lagging_after_seconds=lagging_after,
                    xds=xds, fleet_identities=identities, notifications=notifications, endpoint_sources=sources)


def _endpoint_sources(raw: object) -> tuple[SourceSpec, ...]:
    """``endpoint_sources: [{name, owns | service+environment, allow_empty?, file | dns}]``.
    Names are unique and no (service, environment) has two owners."""
    if not isinstance(raw, list):
        raise ConfigError(f"endpoint_sources: expected a list of sources, got {type(raw).__name__}")
    specs = tuple(_endpoint_source(f"endpoint_sources[{i}]", item) for i, item in enumerate(raw))
    names: set[str] = set()
    owners: dict[Owned, str] = {}
    for i, spec in enumerate(specs):
        if spec.name in names:
            raise ConfigError(f"endpoint_sources[{i}].name: {spec.name!r} is used twice; names must be unique")
        names.add(spec.name)
        for pair in spec.owns:
            if pair in owners:
                raise ConfigError(f"endpoint_sources[{i}]: {pair} is already owned by source {owners[pair]!r}; "
                                  "an environment has one source")
            owners[pair] = spec.name
    return specs


def _endpoint_source(where: str, raw: object) -> SourceSpec:
    data = _mapping(where, raw)
    _check_keys(where, data, {"name", "owns", "service", "environment", "allow_empty", "file", "dns"})
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: expected a name of letters, digits, '_' or '-', got {name!r}")
    owns = _owns(where, data)
    allow_empty = data.get("allow_empty", False)
    if not isinstance(allow_empty, bool):
        raise ConfigError(f"{where}.allow_empty: expected true or false, got {allow_empty!r}")
    kinds = [k for k in ("file", "dns") if k in data]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of file or dns")
    if kinds == ["file"]:
        return SourceSpec(name, owns, allow_empty, file=_file_source(f"{where}.file", data["file"]))
    if len(owns) != 1:
        raise ConfigError(f"{where}.owns: a dns source gives one set of endpoints: own exactly one service/environment")
    return SourceSpec(name, owns, allow_empty, dns=_dns_source(f"{where}.dns", data["dns"]))


def _owns(where: str, data: dict[str, Any]) -> tuple[Owned, ...]:
    if "owns" in data and ("service" in data or "environment" in data):
        raise ConfigError(f"{where}: give owns or service + environment, not both")
    if "owns" in data:
        items = data["owns"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}.owns: expected a non-empty list of {{service, environment}}")
        pairs = []
        for i, item in enumerate(items):
            entry = _mapping(f"{where}.owns[{i}]", item)
            _check_keys(f"{where}.owns[{i}]", entry, {"service", "environment"})
            pairs.append(_owned(f"{where}.owns[{i}]", entry))
        if len(set(pairs)) != len(pairs):
            raise ConfigError(f"{where}.owns: a service/environment is listed twice")
        return tuple(pairs)
    return (_owned(where, data),)


def _owned(where: str, data: dict[str, Any]) -> Owned:
    try:
        service = validate_service_name(data.get("service"))
    except ValidationError as exc:
        raise ConfigError(f"{where}.service: {exc}") from None
    env = data.get("environment")
    if env not in ("blue", "green"):
        raise ConfigError(f"{where}.environment: expected blue or green, got {env!r}")
    return Owned(service, Environment(env))


def _file_source(where: str, raw: object) -> FileSourceSpec:
    data = _mapping(where, raw)
    _check_keys(where, data, {"path", "format", "poll_seconds"})
    path = data.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.path: expected a file path, got {path!r}")
    fmt = data.get("format", "json" if path.endswith(".json") else "yaml")
    if fmt not in ("yaml", "json"):
        raise ConfigError(f"{where}.format: expected yaml or json, got {fmt!r}")
    poll = _seconds(f"{where}.poll_seconds", data.get("poll_seconds", 1.0), nullable=False)
    assert poll is not None
    # The file need not exist yet: config management may write it after we start (reported
    # in GET /v1/endpoint-sources until it does).
    return FileSourceSpec(path=path, format=fmt, poll_seconds=poll)


def _dns_source(where: str, raw: object) -> DnsSourceSpec:
    data = _mapping(where, raw)
    _check_keys(where, data, {"name", "type", "port", "interval_seconds", "timeout_seconds", "nameservers"})
    name = data.get("name")
    if not isinstance(name, str) or not name or len(name) > 253 or any(c.isspace() for c in name):
        raise ConfigError(f"{where}.name: expected a DNS name, got {name!r}")
    rdtype = data.get("type", "A")
    if rdtype not in DNS_TYPES:
        raise ConfigError(f"{where}.type: expected one of {', '.join(DNS_TYPES)}, got {rdtype!r}")
    port = data.get("port")
    if rdtype == "SRV" and port is not None:
        raise ConfigError(f"{where}.port: SRV records give the port; leave port out")
    if rdtype != "SRV":
        port = _port(f"{where}.port", port)
    interval = _seconds(f"{where}.interval_seconds", data.get("interval_seconds", 30.0), nullable=False)
    timeout = _seconds(f"{where}.timeout_seconds", data.get("timeout_seconds", 5.0), nullable=False)
    assert interval is not None and timeout is not None
    nameservers = tuple(_nameserver(f"{where}.nameservers[{i}]", v)
                        for i, v in enumerate(_string_list(f"{where}.nameservers", data.get("nameservers", []))))
    return DnsSourceSpec(name=name, type=rdtype, port=port, interval_seconds=interval, timeout_seconds=timeout,
                         nameservers=nameservers)


def _nameserver(where: str, text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT``; port 53 by default."""
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{where}: expected IP, IP:PORT or [IPv6]:PORT, got {text!r}")
        port = _port(where, int(rest[1:])) if rest[1:].isdigit() else (53 if not rest else -1)
    elif text.count(":") == 1:
        host, _, raw_port = text.partition(":")
        port = _port(where, int(raw_port)) if raw_port.isdigit() else -1
    if port == -1:
        raise ConfigError(f"{where}: bad port in {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: expected an IP address (nameservers are not resolved), got {text!r}") from None
    return host, port


def _notifications(raw: object, allow: Allowlists) -> tuple[WebhookTarget, ...]:
    """``notifications: {webhooks: [{url, secret_file, format, events, timeout_seconds}]}``; each
    URL must pass ``webhooks.allowed`` and each secret file must be readable now."""
    from .admin.policy import url_allowed  # late: the policy module needs this one's Allowlists

    data = _mapping("notifications", raw)
    _check_keys("notifications", data, {"webhooks"})
    hooks = data.get("webhooks", [])
    if not isinstance(hooks, list):
        raise ConfigError(f"notifications.webhooks: expected a list, got {type(hooks).__name__}")
    try:
        return tuple(parse_webhook(f"notifications.webhooks[{i}]", hook, lambda url: url_allowed(url, allow.webhooks))
                     for i, hook in enumerate(hooks))
    except ValueError as exc:
        raise ConfigError(f"{exc} (rules: {list(allow.webhooks)})" if "webhooks.allowed" in str(exc) else str(exc)) from None


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
