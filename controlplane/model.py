"""The domain model: services, their blue and green environments, traffic rules and deployments.

Plain frozen dataclasses and pure functions. No I/O, no protobuf, no clock reads: every function
that records a time takes ``now`` as an argument. Every transition either returns a new value or
raises a :class:`~controlplane.errors.BlueGreenError` subclass and changes nothing.

The traffic rule keeps two environments apart:

* ``active`` is the *stable* environment: the one that held 100 % of traffic before the current
  shift began (or holds it now). The other one is the *idle* environment; the preview entry
  sends traffic to it.
* ``previous`` is the environment that was active before ``active``: the target of a rollback
  once a shift has completed.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .errors import ConflictError, ValidationError

MAX_ENDPOINTS = 1000
MAX_ENDPOINT_WEIGHT = 10_000  # EDS load_balancing_weight is a uint32; keep sums far from overflow
MAX_DOMAINS = 100
MAX_DRAIN_SECONDS = 86_400
MAX_STANDBY_SECONDS = 30 * 86_400


class Environment(str, enum.Enum):
    BLUE = "blue"
    GREEN = "green"

    @property
    def other(self) -> Environment:
        return Environment.GREEN if self is Environment.BLUE else Environment.BLUE

    @classmethod
    def parse(cls, value: object) -> Environment:
        if isinstance(value, Environment):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValidationError(f"unknown environment {value!r}: expected 'blue' or 'green'") from None


class DeploymentStatus(str, enum.Enum):
    DEPLOYING = "deploying"  # version registered in the idle environment, not yet verified
    READY = "ready"  # registered (and, with smoke tests, verified); takes no production traffic
    SHIFTING = "shifting"  # takes part of production traffic while a shift is in progress
    ACTIVE = "active"  # takes 100 % of production traffic
    DRAINING = "draining"  # weight 0, in-flight requests finishing
    STANDBY = "standby"  # weight 0, kept registered and warm for instant rollback
    FAILED = "failed"  # verification failed before it took production traffic
    ROLLED_BACK = "rolled_back"  # took traffic, then traffic was moved back off it
    DECOMMISSIONED = "decommissioned"  # replaced or retired; no longer in the fleet config


# ---------------------------------------------------------------------------------------------
# Validation of single values. Each raises ValidationError naming the field and the problem.

_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$")
_DOMAIN_LABELS = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_PREFIX = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}$")


def _is_port(text: str) -> bool:
    # ASCII digits only: str.isdigit() is also true for '²' and full-width digits.
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def validate_service_name(name: object) -> str:
    if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
        raise ValidationError(
            f"invalid service name {name!r}: use 1-48 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_domain(domain: object) -> str:
    """A virtual-host domain as Envoy accepts it: a host name, optionally ':port', with at most
    one wildcard '*' as the whole domain, a leading '*' or a trailing '*'."""
    if not isinstance(domain, str) or not domain:
        raise ValidationError(f"invalid domain {domain!r}: must be a non-empty string")
    if domain == "*":
        return domain
    host, sep, port = domain.partition(":")
    if sep and not _is_port(port):
        raise ValidationError(f"invalid domain {domain!r}: port must be 1-65535")
    core = host
    if host.startswith("*"):
        core = host[1:].lstrip(".-")
        if not core:
            raise ValidationError(f"invalid domain {domain!r}: wildcard needs a suffix, e.g. '*.example.com'")
    elif host.endswith("*"):
        if sep:
            # Envoy treats '*' as a wildcard only at the very end of the domain: 'x.*:8080'
            # would be an exact domain that no Host header ever matches.
            raise ValidationError(f"invalid domain {domain!r}: a trailing wildcard cannot have a port; use 'x.*'")
        core = host[:-1].rstrip(".-")
        if not core:
            raise ValidationError(f"invalid domain {domain!r}: wildcard needs a prefix, e.g. 'example.*'")
    if len(domain) > 253 or not _DOMAIN_LABELS.fullmatch(core):
        raise ValidationError(
            f"invalid domain {domain!r}: expected a host name such as 'shop.example.com', "
            "'*.example.com', 'shop.*' or '*'"
        )
    return domain


def validate_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or len(prefix) > 1024 or not _PREFIX.fullmatch(prefix):
        raise ValidationError(
            f"invalid prefix {prefix!r}: must start with '/' and contain only URL path characters"
        )
    return prefix


def validate_version(version: object) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ValidationError(
            f"invalid version {version!r}: use 1-128 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
    return version


def _validate_seconds(field_name: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field_name} must be an integer number of seconds, got {value!r}")
    if not 0 <= value <= maximum:
        raise ValidationError(f"{field_name} must be between 0 and {maximum}, got {value}")
    return value


@dataclass(frozen=True, order=True)
class Endpoint:
    """An upstream address. Only IP literals: EDS does not resolve DNS names.

    ``weight`` is the endpoint's share of its environment's capacity (docs/capacity.md) and its
    EDS load-balancing weight. It takes no part in equality: an address is listed once."""

    host: str
    port: int
    weight: int = field(default=1, compare=False)

    @classmethod
    def parse(cls, text: object) -> Endpoint:
        """``"IP:PORT"`` or ``{"address": "IP:PORT", "weight": N}`` (weight 1-10000, default 1)."""
        if isinstance(text, Mapping):
            return cls._parse_weighted(text)
        if not isinstance(text, str):
            raise ValidationError(f"invalid endpoint {text!r}: expected a string 'IP:PORT' or an object {{\"address\": \"IP:PORT\", \"weight\": N}}")
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
        if not sep or not host or not port:
            raise ValidationError(f"invalid endpoint {text!r}: expected 'IP:PORT', e.g. '10.0.0.5:8080' or '[::1]:8080'")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValidationError(
                f"invalid endpoint {text!r}: host must be an IPv4 or IPv6 address "
                "(EDS endpoints are not resolved through DNS)"
            ) from None
        if not _is_port(port):
            raise ValidationError(f"invalid endpoint {text!r}: port must be 1-65535")
        if getattr(address, "scope_id", None):
            raise ValidationError(f"invalid endpoint {text!r}: IPv6 zone ids ('%...') are not supported by Envoy")
        if address.version == 6 and not text.startswith("["):
            raise ValidationError(f"invalid endpoint {text!r}: write IPv6 addresses as '[ADDR]:PORT'")
        return cls(str(address), int(port))

    @classmethod
    def _parse_weighted(cls, spec: Mapping[str, Any]) -> Endpoint:
        reject_unknown("endpoint", spec, {"address", "weight"})
        if "address" not in spec:
            raise ValidationError(f"invalid endpoint {dict(spec)!r}: 'address' ('IP:PORT') is required")
        if not isinstance(spec["address"], str):
            raise ValidationError(f"invalid endpoint address {spec['address']!r}: expected a string 'IP:PORT'")
        endpoint = cls.parse(spec["address"])
        weight = spec.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_ENDPOINT_WEIGHT:
            raise ValidationError(f"invalid endpoint {spec['address']}: weight must be an integer between 1 and {MAX_ENDPOINT_WEIGHT}, got {weight!r}")
        return replace(endpoint, weight=weight)

    def to_json(self) -> str | dict[str, Any]:
        """The API and stored form: the plain string unless the weight is not 1 (so the stored
        state of services that use no weights is what it was before weights existed)."""
        return str(self) if self.weight == 1 else {"address": str(self), "weight": self.weight}

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class EnvironmentState:
    """What runs in one environment: a version label and the addresses serving it."""

    version: str = ""
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def registered(self) -> bool:
        return bool(self.endpoints)

    @property
    def capacity(self) -> int:
        """The sum of the endpoints' weights (docs/capacity.md)."""
        return sum(e.weight for e in self.endpoints)


@dataclass(frozen=True)
class Traffic:
    """Traffic split between the environments. Weights are integers summing to 100."""

    active: Environment = Environment.BLUE
    previous: Environment | None = None
    blue: int = 100
    green: int = 0

    def weight(self, env: Environment) -> int:
        return self.blue if env is Environment.BLUE else self.green

    @property
    def idle(self) -> Environment:
        return self.active.other

    @property
    def weights(self) -> dict[str, int]:
        return {"blue": self.blue, "green": self.green}


# A cookie name is an RFC 6265 token; header names are lower-case HTTP field names (Envoy
# matches them lower-cased; pseudo-headers and hop-by-hop names are not routing material).
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,64}$")
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9!#$%&'()*+\-./:<=>?@\[\]^_`{|}~]{1,256}$")
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9\-_.]{0,63}$")
_RESERVED_HEADERS = {"host", "cookie", "connection", "content-length", "transfer-encoding", "te", "upgrade", "keep-alive"}
MAX_AFFINITY_TTL = 30 * 86_400
MAX_TARGET_HEADERS = 10


@dataclass(frozen=True)
class Affinity:
    """Session affinity during a stepped shift: the environment a client was sent to is pinned in
    a cookie named ``cookie`` for ``ttl_seconds`` (see docs/affinity.md for the exact rule)."""

    cookie: str = "bluegreen-env"
    ttl_seconds: int = 3600


def parse_affinity(path: str, body: object) -> Affinity:
    """``{cookie, ttl_seconds}`` (both optional); ValidationError naming ``path``."""
    spec = require_object(path, body)
    reject_unknown(path, spec, {"cookie", "ttl_seconds"})
    default = Affinity()
    cookie = spec.get("cookie", default.cookie)
    if not isinstance(cookie, str) or not _COOKIE_NAME.match(cookie):
        raise ValidationError(f"{path}.cookie must be a cookie name (letters, digits and !#$%&'*+-.^_`|~, at most 64), got {cookie!r}")
    ttl = spec.get("ttl_seconds", default.ttl_seconds)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_AFFINITY_TTL:
        raise ValidationError(f"{path}.ttl_seconds must be an integer between 1 and {MAX_AFFINITY_TTL}, got {ttl!r}")
    return Affinity(cookie=cookie, ttl_seconds=ttl)


def affinity_to_dict(affinity: Affinity | None) -> dict[str, Any] | None:
    return {"cookie": affinity.cookie, "ttl_seconds": affinity.ttl_seconds} if affinity is not None else None


@dataclass(frozen=True)
class Target:
    """Requests that carry every one of ``headers`` (exact values) and, if set, the cookie
    ``cookie`` = value go to the new environment during a deployment's targeting phase."""

    headers: tuple[tuple[str, str], ...] = ()
    cookie: tuple[str, str] | None = None


def parse_target_rule(path: str, spec: Mapping[str, Any]) -> Target:
    """The ``headers`` and ``cookie`` fields of ``spec`` (at least one); ValidationError naming ``path``."""
    headers = spec.get("headers", {})
    if not isinstance(headers, Mapping) or len(headers) > MAX_TARGET_HEADERS:
        raise ValidationError(f"{path}.headers must be an object of at most {MAX_TARGET_HEADERS} header names and values")
    checked = []
    for name, value in headers.items():
        name = name.lower() if isinstance(name, str) else name  # HTTP header names are case-insensitive
        if not isinstance(name, str) or not _HEADER_NAME.match(name) or name in _RESERVED_HEADERS:
            raise ValidationError(f"{path}.headers: {name!r} is not a header to route on (letters, digits, '-', '_', '.'; "
                                  "not a pseudo-header or host, cookie, connection, ...)")
        if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
            raise ValidationError(f"{path}.headers.{name} must be a non-empty printable string of at most 256 characters")
        checked.append((name, value))
    cookie = spec.get("cookie")
    parsed_cookie = None
    if cookie is not None:
        cookie_spec = require_object(f"{path}.cookie", cookie)
        reject_unknown(f"{path}.cookie", cookie_spec, {"name", "value"})
        name, value = cookie_spec.get("name"), cookie_spec.get("value")
        if not isinstance(name, str) or not _COOKIE_NAME.match(name):
            raise ValidationError(f"{path}.cookie.name must be a cookie name, got {name!r}")
        if not isinstance(value, str) or not _COOKIE_VALUE.match(value):
            raise ValidationError(f"{path}.cookie.value must be a cookie value (no spaces, quotes, commas or semicolons), got {value!r}")
        parsed_cookie = (name, value)
    if not checked and parsed_cookie is None:
        raise ValidationError(f"{path} needs headers or a cookie to match")
    return Target(headers=tuple(sorted(checked)), cookie=parsed_cookie)


@dataclass(frozen=True)
class Release:
    """How the routes treat the deployment ``deployment`` shifting traffic to ``environment``,
    beyond the weights: set by the workflow for the phases that need it, cleared when the
    deployment reaches 100 %, fails or is rolled back (so nothing outlives it, e.g. no pin).

    * ``affinity``: pins; ``earlier`` are the new environment's weights at the earlier steps of
      this shift (a client pinned to the old environment at one of them is drawn again);
    * ``mirror_percent``: that share of production requests is copied to the new environment;
    * ``target``: matching requests go to the new environment."""

    deployment: str
    environment: Environment
    affinity: Affinity | None = None
    earlier: tuple[int, ...] = ()
    mirror_percent: float = 0.0
    target: Target | None = None


def release_to_dict(release: Release | None) -> dict[str, Any] | None:
    if release is None:
        return None
    target = release.target
    return {
        "deployment": release.deployment,
        "environment": release.environment.value,
        "affinity": affinity_to_dict(release.affinity),
        "earlier": list(release.earlier),
        "mirror_percent": release.mirror_percent,
        "target": None if target is None else {
            "headers": dict(target.headers),
            "cookie": {"name": target.cookie[0], "value": target.cookie[1]} if target.cookie else None,
        },
    }


def release_from_dict(data: Mapping[str, Any] | None) -> Release | None:
    if data is None:
        return None
    affinity = data.get("affinity")
    target = data.get("target")
    return Release(
        deployment=data["deployment"],
        environment=Environment(data["environment"]),
        affinity=Affinity(affinity["cookie"], affinity["ttl_seconds"]) if affinity else None,
        earlier=tuple(data.get("earlier", ())),
        mirror_percent=data.get("mirror_percent", 0.0),
        target=None if target is None else Target(
            headers=tuple(sorted(target.get("headers", {}).items())),
            cookie=(target["cookie"]["name"], target["cookie"]["value"]) if target.get("cookie") else None,
        ),
    )


@dataclass(frozen=True)
class Webhook:
    """A receiver of deployment event notifications (controlplane/notify/): ``events`` empty
    means every event. Checked fully (allowlist, secret file) by notify.events.parse_webhook."""

    url: str
    format: str = "json"
    secret_file: str | None = None
    events: tuple[str, ...] = ()
    timeout_seconds: float = 5.0

    def wants(self, event: str) -> bool:
        return not self.events or event in self.events

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "format": self.format, "secret_file": self.secret_file, "events": list(self.events),
                "timeout_seconds": self.timeout_seconds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Webhook":
        """From a stored or requested object; ValidationError for a shape that is not one."""
        if not isinstance(data, Mapping) or not isinstance(data.get("url"), str):
            raise ValidationError("a webhook is an object with a 'url' string")
        events = data.get("events") or ()
        if not isinstance(events, (list, tuple)) or not all(isinstance(e, str) for e in events):
            raise ValidationError("a webhook's events must be a list of event names")
        timeout = data.get("timeout_seconds", 5.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValidationError("a webhook's timeout_seconds must be a number")
        secret = data.get("secret_file")
        return cls(data["url"], str(data.get("format", "json")), str(secret) if secret is not None else None, tuple(events), float(timeout))


@dataclass(frozen=True)
class Service:
    name: str
    domains: tuple[str, ...] = ("*",)
    prefix: str = "/"
    drain_seconds: int = 60
    standby_seconds: int = 1800
    # Gates wait for every connected proxy, lagging and rejecting ones too (README, "Convergence policy").
    require_all_proxies: bool = False
    blue: EnvironmentState = field(default_factory=EnvironmentState)
    green: EnvironmentState = field(default_factory=EnvironmentState)
    traffic: Traffic = field(default_factory=Traffic)
    deployment_seq: int = 0  # last deployment number issued for this service
    affinity: Affinity | None = None  # session affinity for this service's stepped shifts (a deployment may set its own)
    release: Release | None = None  # routing of the deployment in progress beyond weights (set by the workflow)
    # The service's own notification webhooks (as given; checked at the API edge by
    # controlplane.notify.events.parse_webhook), in addition to the config file's.
    notifications: tuple[Webhook, ...] = ()
    # The release group (docs/releases.md) that holds this service while it moves in lockstep with
    # others: set and cleared in the same store transactions as its members' deployments, so a
    # request on the service alone sees it atomically and is refused (409) while it is set.
    release_group: str | None = None

    def environment(self, env: Environment) -> EnvironmentState:
        return self.blue if env is Environment.BLUE else self.green

    def with_environment(self, env: Environment, state: EnvironmentState) -> Service:
        return replace(self, **{env.value: state})


@dataclass(frozen=True)
class Event:
    """One transition in a deployment's history."""

    at: float
    status: str
    actor: str  # "api" (a person or pipeline) or "automatic" (timers, smoke tests, analysis)
    reason: str


@dataclass(frozen=True)
class Deployment:
    """One version placed in one environment of a service, and what became of it.

    The fields after ``updated_at`` belong to the deployment workflow (``deploy/transitions.py``); a version
    registered by hand (``PUT .../environments/...``) leaves them at their defaults.
    """

    id: str
    service: str
    version: str
    environment: Environment
    status: DeploymentStatus
    deployed_at: float
    activated_at: float | None = None
    updated_at: float | None = None
    spec: Mapping[str, Any] | None = None  # the deployment request, defaults filled in
    step: int = -1  # index into strategy.steps of the weight in force; -1 before the shift
    deadline: float | None = None  # end of the current timed phase: step, bake, drain or standby
    paused_remaining: float | None = None  # seconds left of the phase when paused; None: running
    awaiting_promote: bool = False
    baking: bool = False  # at 100 %, analysis continues until the bake deadline
    failures: int = 0  # consecutive analysis intervals that breached a threshold
    analysis: Mapping[str, Any] | None = None  # the latest analysis figures
    intervals_judged: int = 0  # analysis intervals judged (ok or breach) in the current step or bake
    no_data_intervals: int = 0  # consecutive analysis intervals with too few requests to judge
    extended: bool = False  # the current step or bake outlived its deadline to be judged (history says why)
    reason: str | None = None  # why it failed or was rolled back
    counterpart: str | None = None  # the other environment's deployment this one replaces or serves
    hooks_pending: bool = False  # decommission webhooks still to be called
    waiting_for: str | None = None  # what a due decommission waits for (proxies still routing to it)
    phase: str | None = None  # before the shift: "mirror" (ready, shadow traffic) or "targeting" (shifting, step -1); "scaling" (waiting for capacity)
    # Capacity of the environment that served 100 % when the deployment started (the capacity
    # guard's reference, docs/capacity.md); None: nothing served before (first version).
    baseline_capacity: int | None = None
    scaling_step: int | None = None  # the step a "scaling" phase waits to shift to
    history: tuple[Event, ...] = ()
    # The figures of the last analysis intervals (each with its time, "at"), oldest first; the
    # dashboard draws them. Bounded (transitions.INTERVALS_KEPT).
    intervals: tuple[Mapping[str, Any], ...] = ()

    @property
    def in_progress(self) -> bool:
        """A workflow deployment that has not settled: a second one must wait."""
        return self.spec is not None and (
            self.status in (DeploymentStatus.DEPLOYING, DeploymentStatus.READY, DeploymentStatus.SHIFTING)
            or (self.status is DeploymentStatus.ACTIVE and self.baking)
        )


@dataclass(frozen=True)
class ListenerSpec:
    """A port the proxies of a fleet listen on, with an optional preview port that sends every
    request to the idle environment."""

    name: str
    address: str
    port: int
    preview_port: int | None = None


@dataclass(frozen=True)
class Fleet:
    """A group of Envoys that get the same configuration; Envoy's ``node.cluster`` names it."""

    name: str
    listeners: tuple[ListenerSpec, ...]
    services: tuple[str, ...] | None = None  # None: every service

    def serves(self, service: str) -> bool:
        return self.services is None or service in self.services


DEFAULT_FLEET = Fleet(
    name="default",
    listeners=(ListenerSpec(name="http", address="127.0.0.1", port=10000, preview_port=10001),),
)


def route_conflict(fleets: tuple[Fleet, ...], services: list[Service], candidate: Service) -> str | None:
    """Describe a clash if ``candidate`` claims a (domain, prefix) that another service on the
    same fleet already routes; None if it is free. Two services cannot own the same requests."""
    claims = {(d.lower(), candidate.prefix) for d in candidate.domains}
    for other in services:
        if other.name == candidate.name:
            continue
        shared = [f.name for f in fleets if f.serves(other.name) and f.serves(candidate.name)]
        if not shared:
            continue
        clash = claims & {(d.lower(), other.prefix) for d in other.domains}
        if clash:
            domain, prefix = sorted(clash)[0]
            return (
                f"service {other.name} already routes domain {domain!r} with prefix {prefix!r} "
                f"on fleet {shared[0]}; use another domain or prefix"
            )
    return None


# ---------------------------------------------------------------------------------------------
# Parsing user input (already JSON-decoded) into model values.

def reject_unknown(kind: str, body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(f"unknown field(s) in {kind}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def require_object(kind: str, body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ValidationError(f"{kind} must be a JSON object, got {type(body).__name__}")
    return body


def apply_service_spec(existing: Service | None, name: str, body: object) -> Service:
    """Create or update a service's settings from a request body. Fields not given keep their
    current value (or the default for a new service). Environments and traffic are untouched."""
    validate_service_name(name)
    spec = require_object("service", body)
    reject_unknown("service", spec, {"domains", "prefix", "drain_seconds", "standby_seconds", "require_all_proxies", "affinity", "notifications"})
    base = existing or Service(name=name)
    changes: dict[str, Any] = {}
    if "domains" in spec:
        domains = spec["domains"]
        if not isinstance(domains, list) or not domains:
            raise ValidationError("domains must be a non-empty list of strings")
        if len(domains) > MAX_DOMAINS:
            raise ValidationError(f"domains: at most {MAX_DOMAINS} entries")
        checked = tuple(validate_domain(d) for d in domains)
        if len(set(d.lower() for d in checked)) != len(checked):
            raise ValidationError("domains must not repeat")
        changes["domains"] = checked
    if "prefix" in spec:
        changes["prefix"] = validate_prefix(spec["prefix"])
    if "drain_seconds" in spec:
        changes["drain_seconds"] = _validate_seconds("drain_seconds", spec["drain_seconds"], MAX_DRAIN_SECONDS)
    if "standby_seconds" in spec:
        changes["standby_seconds"] = _validate_seconds("standby_seconds", spec["standby_seconds"], MAX_STANDBY_SECONDS)
    if "require_all_proxies" in spec:
        if not isinstance(spec["require_all_proxies"], bool):
            raise ValidationError(f"require_all_proxies must be true or false, got {spec['require_all_proxies']!r}")
        changes["require_all_proxies"] = spec["require_all_proxies"]
    if "affinity" in spec:
        changes["affinity"] = None if spec["affinity"] is None else parse_affinity("affinity", spec["affinity"])
    if "notifications" in spec:
        notifications = require_object("notifications", spec["notifications"])
        reject_unknown("notifications", notifications, {"webhooks"})
        hooks = notifications.get("webhooks", [])
        if not isinstance(hooks, list) or not all(isinstance(h, dict) for h in hooks):
            raise ValidationError("notifications.webhooks must be a list of objects like {\"url\": \"https://...\"}")
        changes["notifications"] = tuple(Webhook.from_dict(h) for h in hooks)
    return replace(base, **changes)


def parse_environment_spec(body: object) -> EnvironmentState:
    spec = require_object("environment", body)
    reject_unknown("environment", spec, {"version", "endpoints"})
    if "version" not in spec:
        raise ValidationError("environment: 'version' is required")
    if "endpoints" not in spec:
        raise ValidationError("environment: 'endpoints' is required (a list of 'IP:PORT' or {\"address\", \"weight\"} objects)")
    version = validate_version(spec["version"])
    raw = spec["endpoints"]
    if not isinstance(raw, list):
        raise ValidationError("endpoints must be a list of 'IP:PORT' strings or {\"address\": \"IP:PORT\", \"weight\": N} objects")
    if len(raw) > MAX_ENDPOINTS:
        raise ValidationError(f"endpoints: at most {MAX_ENDPOINTS} entries")
    endpoints = [Endpoint.parse(e) for e in raw]
    if len(set(endpoints)) != len(endpoints):
        raise ValidationError("endpoints must not repeat")
    return EnvironmentState(version=version, endpoints=tuple(sorted(endpoints)))


def parse_weights(body: object) -> dict[Environment, int]:
    spec = require_object("traffic", body)
    reject_unknown("traffic", spec, {"weights"})
    weights = spec.get("weights")
    if not isinstance(weights, Mapping):
        raise ValidationError('traffic: "weights" must be an object like {"blue": 90, "green": 10}')
    parsed: dict[Environment, int] = {}
    for key, value in weights.items():
        env = Environment.parse(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"weight of {env.value} must be an integer, got {value!r}")
        if not 0 <= value <= 100:
            raise ValidationError(f"weight of {env.value} must be between 0 and 100, got {value}")
        parsed[env] = value
    missing = [e.value for e in Environment if e not in parsed]
    if missing:
        raise ValidationError(f"weights: missing {', '.join(missing)}; give both blue and green")
    total = sum(parsed.values())
    if total != 100:
        raise ValidationError(f"weights must sum to 100, got {total}")
    return parsed


# ---------------------------------------------------------------------------------------------
# Transitions. Each returns the new service plus the deployment records it creates or changes.

@dataclass(frozen=True)
class Change:
    """The result of a transition: the new service and the deployment records to write."""

    service: Service
    deployments: tuple[Deployment, ...] = ()


def set_environment(
    service: Service,
    env: Environment,
    state: EnvironmentState,
    current: Mapping[Environment, Deployment | None],
    now: float,
) -> Change:
    """Register ``state`` in environment ``env``.

    A new version in an environment that takes production traffic is refused: that would be an
    in-place upgrade of live traffic, the thing blue-green exists to avoid. Changing only the
    endpoints of a live environment (scaling) is allowed, but never to an empty list.
    """
    old = service.environment(env)
    # An environment is live when it takes traffic and has something serving it: a new service
    # starts with blue at 100 % and nothing registered, and its first version is no upgrade.
    live = service.traffic.weight(env) > 0 and old.registered
    if live and state.version != old.version:
        raise ConflictError(
            f"environment {env.value} of {service.name} takes {service.traffic.weight(env)}% of traffic; "
            f"deploy version {state.version} to the idle environment {env.other.value} instead"
        )
    if live and not state.endpoints:
        raise ConflictError(f"environment {env.value} of {service.name} takes traffic; it cannot have zero endpoints")
    new_service = service.with_environment(env, state)
    records: list[Deployment] = []
    if state.version != old.version or current.get(env) is None:
        previous = current.get(env)
        if previous is not None and previous.status not in _FINAL:
            records.append(replace(previous, status=DeploymentStatus.DECOMMISSIONED, updated_at=now))
        seq = service.deployment_seq + 1
        new_service = replace(new_service, deployment_seq=seq)
        # Status follows the weight: the first version of a new service takes blue's 100 % at once.
        takes_traffic = service.traffic.weight(env) > 0 and state.registered
        status = DeploymentStatus.ACTIVE if takes_traffic else DeploymentStatus.READY
        records.append(
            Deployment(
                id=f"{service.name}-{seq}",
                service=service.name,
                version=state.version,
                environment=env,
                status=status,
                deployed_at=now,
                activated_at=now if takes_traffic else None,
                updated_at=now,
            )
        )
    return Change(new_service, tuple(records))


_FINAL = {DeploymentStatus.FAILED, DeploymentStatus.ROLLED_BACK, DeploymentStatus.DECOMMISSIONED}


def set_weights(
    service: Service,
    weights: Mapping[Environment, int],
    current: Mapping[Environment, Deployment | None],
    now: float,
    *,
    rollback: bool = False,
) -> Change:
    """Move traffic. An environment that would take traffic must have endpoints.

    When one environment reaches 100 % it becomes ``active`` and the former active one becomes
    ``previous``. A split leaves ``active`` unchanged: it names the stable side of the shift.
    """
    for env, weight in weights.items():
        if weight > 0 and not service.environment(env).registered:
            raise ConflictError(
                f"environment {env.value} of {service.name} has no endpoints; "
                f"register them (PUT /v1/services/{service.name}/environments/{env.value}) before sending traffic"
            )
    traffic = service.traffic
    active, previous = traffic.active, traffic.previous
    for env in Environment:
        if weights[env] == 100 and env is not active:
            active, previous = env, active
    new_traffic = Traffic(active=active, previous=previous, blue=weights[Environment.BLUE], green=weights[Environment.GREEN])
    # Traffic moved by hand ends whatever a deployment's release routing was doing.
    new_service = replace(service, traffic=new_traffic, release=None)
    records: list[Deployment] = []
    for env in Environment:
        record = current.get(env)
        if record is None or record.status in (DeploymentStatus.FAILED, DeploymentStatus.DECOMMISSIONED):
            continue
        weight = weights[env]
        if weight == 100:
            status = DeploymentStatus.ACTIVE
        elif weight > 0:
            status = DeploymentStatus.SHIFTING if env is not active else DeploymentStatus.ACTIVE
        elif rollback and record.status in (DeploymentStatus.SHIFTING, DeploymentStatus.ACTIVE):
            status = DeploymentStatus.ROLLED_BACK
        elif record.status in (DeploymentStatus.ACTIVE, DeploymentStatus.SHIFTING) and env is previous:
            status = DeploymentStatus.STANDBY
        elif record.status is DeploymentStatus.SHIFTING:
            status = DeploymentStatus.READY
        else:
            status = record.status
        if status is not record.status:
            activated = now if status is DeploymentStatus.ACTIVE and record.activated_at is None else record.activated_at
            # Timers belong to the status: a standby environment is decommissioned when its
            # standby ends, whoever put it there; any other status has no timer.
            deadline = now + service.standby_seconds if status is DeploymentStatus.STANDBY else None
            history = record.history + (Event(now, status.value, "api", f"traffic set to blue {weights[Environment.BLUE]}% / green {weights[Environment.GREEN]}%"),)
            records.append(replace(record, status=status, activated_at=activated, updated_at=now, deadline=deadline,
                                   paused_remaining=None, awaiting_promote=False, baking=False, waiting_for=None,
                                   history=history))
    return Change(new_service, tuple(records))


def switch_target(service: Service, to: Environment | None) -> Environment:
    """The environment an atomic switch sends 100 % to: the idle one unless named."""
    target = to if to is not None else service.traffic.idle
    if service.traffic.weight(target) == 100:
        raise ConflictError(f"{service.name}: {target.value} already takes 100% of traffic")
    return target


def rollback_target(service: Service) -> Environment:
    """Where a rollback sends 100 %: back to the stable side of an unfinished shift, or, after a
    completed switch, to the environment that was active before."""
    traffic = service.traffic
    if traffic.weight(traffic.active) < 100:
        return traffic.active
    if traffic.previous is None:
        raise ConflictError(f"{service.name}: nothing to roll back to; no earlier active environment is recorded")
    target = traffic.previous
    if not service.environment(target).registered:
        raise ConflictError(f"{service.name}: cannot roll back to {target.value}: it has no endpoints")
    return target


def full_weights(target: Environment) -> dict[Environment, int]:
    return {target: 100, target.other: 0}


# ---------------------------------------------------------------------------------------------
# Serialization (for the store and the API). Stable key order keeps stored bytes deterministic.

def service_to_dict(service: Service) -> dict[str, Any]:
    def env(e: EnvironmentState) -> dict[str, Any]:
        return {"version": e.version, "endpoints": [x.to_json() for x in e.endpoints]}

    t = service.traffic
    return {
        "name": service.name,
        "domains": list(service.domains),
        "prefix": service.prefix,
        "drain_seconds": service.drain_seconds,
        "standby_seconds": service.standby_seconds,
        "require_all_proxies": service.require_all_proxies,
        "environments": {"blue": env(service.blue), "green": env(service.green)},
        "traffic": {
            "active": t.active.value,
            "previous": t.previous.value if t.previous else None,
            "weights": t.weights,
        },
        "deployment_seq": service.deployment_seq,
        # Only when set, so the stored form of services that use neither stays as it was.
        **({"affinity": affinity_to_dict(service.affinity)} if service.affinity is not None else {}),
        **({"release": release_to_dict(service.release)} if service.release is not None else {}),
        "notifications": [h.to_dict() for h in service.notifications],
        **({"release_group": service.release_group} if service.release_group is not None else {}),
    }


def service_from_dict(data: Mapping[str, Any]) -> Service:
    def env(d: Mapping[str, Any]) -> EnvironmentState:
        return EnvironmentState(d["version"], tuple(Endpoint.parse(x) for x in d["endpoints"]))

    t = data["traffic"]
    return Service(
        name=data["name"],
        domains=tuple(data["domains"]),
        prefix=data["prefix"],
        drain_seconds=data["drain_seconds"],
        standby_seconds=data["standby_seconds"],
        require_all_proxies=data.get("require_all_proxies", False),
        blue=env(data["environments"]["blue"]),
        green=env(data["environments"]["green"]),
        traffic=Traffic(
            active=Environment(t["active"]),
            previous=Environment(t["previous"]) if t["previous"] else None,
            blue=t["weights"]["blue"],
            green=t["weights"]["green"],
        ),
        deployment_seq=data.get("deployment_seq", 0),
        affinity=Affinity(data["affinity"]["cookie"], data["affinity"]["ttl_seconds"]) if data.get("affinity") else None,
        release=release_from_dict(data.get("release")),
        notifications=tuple(Webhook.from_dict(h) for h in data.get("notifications", ())),
        release_group=data.get("release_group"),
    )


def deployment_to_dict(d: Deployment) -> dict[str, Any]:
    return {
        "id": d.id,
        "service": d.service,
        "version": d.version,
        "environment": d.environment.value,
        "status": d.status.value,
        "deployed_at": d.deployed_at,
        "activated_at": d.activated_at,
        "updated_at": d.updated_at,
        "spec": dict(d.spec) if d.spec is not None else None,
        "step": d.step,
        "deadline": d.deadline,
        "paused_remaining": d.paused_remaining,
        "awaiting_promote": d.awaiting_promote,
        "baking": d.baking,
        "failures": d.failures,
        "analysis": dict(d.analysis) if d.analysis is not None else None,
        "intervals_judged": d.intervals_judged,
        "no_data_intervals": d.no_data_intervals,
        "extended": d.extended,
        "reason": d.reason,
        "counterpart": d.counterpart,
        "hooks_pending": d.hooks_pending,
        "waiting_for": d.waiting_for,
        "phase": d.phase,
        "baseline_capacity": d.baseline_capacity,
        "scaling_step": d.scaling_step,
        "history": [{"at": e.at, "status": e.status, "actor": e.actor, "reason": e.reason} for e in d.history],
        "intervals": [dict(i) for i in d.intervals],
    }


def deployment_from_dict(data: Mapping[str, Any]) -> Deployment:
    return Deployment(
        id=data["id"],
        service=data["service"],
        version=data["version"],
        environment=Environment(data["environment"]),
        status=DeploymentStatus(data["status"]),
        deployed_at=data["deployed_at"],
        activated_at=data.get("activated_at"),
        updated_at=data.get("updated_at"),
        spec=data.get("spec"),
        step=data.get("step", -1),
        deadline=data.get("deadline"),
        paused_remaining=data.get("paused_remaining"),
        awaiting_promote=data.get("awaiting_promote", False),
        baking=data.get("baking", False),
        failures=data.get("failures", 0),
        analysis=data.get("analysis"),
        # Absent from records stored by releases before "analysis always judges".
        intervals_judged=data.get("intervals_judged", 0),
        no_data_intervals=data.get("no_data_intervals", 0),
        extended=data.get("extended", False),
        reason=data.get("reason"),
        counterpart=data.get("counterpart"),
        hooks_pending=data.get("hooks_pending", False),
        waiting_for=data.get("waiting_for"),
        phase=data.get("phase"),
        baseline_capacity=data.get("baseline_capacity"),
        scaling_step=data.get("scaling_step"),
        history=tuple(Event(e["at"], e["status"], e["actor"], e["reason"]) for e in data.get("history", ())),
        intervals=tuple(data.get("intervals", ())),  # absent from records of older releases
    )


# ---------------------------------------------------------------------------------------------
# Release groups (docs/releases.md)


class ReleaseGroupStatus(enum.Enum):
    IN_PROGRESS = "in_progress"  # members are being verified, shifted or baked in lockstep
    COMPLETE = "complete"  # every member is active and baked; the services are free again
    FAILED = "failed"  # stopped before any production traffic (smoke tests failed, aborted)
    ROLLED_BACK = "rolled_back"  # every member went back to the version it replaced

    @property
    def terminal(self) -> bool:
        return self is not ReleaseGroupStatus.IN_PROGRESS


@dataclass(frozen=True)
class ReleaseGroup:
    """Several services released together: one deployment per member, moved in lockstep.

    ``members`` maps each service to its deployment id; ``spec`` is the request as validated (the
    per-member deployment specs are derived from it). The members' own records carry the state
    of each; this record carries the group's status and its history."""

    id: str
    status: ReleaseGroupStatus
    members: tuple[tuple[str, str], ...]  # (service, deployment id), sorted by service
    spec: Mapping[str, Any]
    created_at: float
    updated_at: float
    reason: str | None = None
    history: tuple[Event, ...] = ()

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.members)


def release_group_to_dict(group: ReleaseGroup) -> dict[str, Any]:
    return {
        "id": group.id,
        "status": group.status.value,
        "members": {name: deployment for name, deployment in group.members},
        "spec": dict(group.spec),
        "created_at": group.created_at,
        "updated_at": group.updated_at,
        "reason": group.reason,
        "history": [{"at": e.at, "status": e.status, "actor": e.actor, "reason": e.reason} for e in group.history],
    }


def release_group_from_dict(data: Mapping[str, Any]) -> ReleaseGroup:
    return ReleaseGroup(
        id=data["id"],
        status=ReleaseGroupStatus(data["status"]),
        members=tuple(sorted(data["members"].items())),
        spec=data["spec"],
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        reason=data.get("reason"),
        history=tuple(Event(e["at"], e["status"], e["actor"], e["reason"]) for e in data.get("history", ())),
    )
