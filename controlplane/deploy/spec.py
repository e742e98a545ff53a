"""What a deployment request asks for: strategy, smoke tests, analysis. Pure parsing and validation.

Parsing takes the JSON-decoded body of ``POST /v1/services/{name}/deployments`` and returns frozen
values, or raises :class:`~controlplane.errors.ValidationError` naming the field (as a path such
as ``smoke.checks[0].expect_status``) and the problem. Defaults are filled in here, once, so the
stored spec says exactly what will happen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..errors import ValidationError
from ..model import (
    Affinity,
    EnvironmentState,
    Target,
    affinity_to_dict,
    parse_affinity,
    parse_environment_spec,
    parse_target_rule,
    reject_unknown,
    require_object,
)

MAX_STEPS = 20
MAX_SECONDS = 7 * 86_400
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
NO_DATA_POLICIES = ("wait", "fail", "pass")


@dataclass(frozen=True)
class Strategy:
    steps: tuple[int, ...] = (100,)  # [100] is the atomic switch
    step_seconds: float = 30.0
    bake_seconds: float = 60.0
    auto_promote: bool = True  # False: wait at the last step before 100 for an explicit promote


@dataclass(frozen=True)
class HttpCheck:
    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    expect_status: int = 200
    body_contains: str | None = None
    timeout_seconds: float = 2.0
    retries: int = 3


@dataclass(frozen=True)
class Webhook:
    url: str
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class Smoke:
    checks: tuple[HttpCheck, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    command_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class PrometheusQuery:
    """One PromQL expression judged per analysis interval: a breach when its value is above
    ``max`` or below ``min``. ``$service``, ``$environment``, ``$version`` and ``$interval`` are
    replaced by the deployment's (``for_environment`` "new", the default) or by the environment
    it replaces ("old"), and by the interval as a PromQL duration ("30s")."""

    name: str
    query: str
    max: float | None = None
    min: float | None = None
    for_environment: str = "new"  # new | old


@dataclass(frozen=True)
class PrometheusSource:
    url: str  # the Prometheus server (its /api/v1/query is called); must pass analysis.prometheus_allowed
    queries: tuple[PrometheusQuery, ...] = ()
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class Analysis:
    """Judge the new environment every ``interval_seconds`` while it shifts and bakes.

    A step or bake with analysis never ends unjudged: it ends with the first interval judged ok
    at or after its deadline, so it lasts at least one interval (``interval_seconds`` longer than
    ``step_seconds`` is allowed: each step lasts one interval). Intervals that wait for traffic
    (``no_data`` "wait") judge nothing; ``no_data_limit`` bounds that wait.
    """

    interval_seconds: float = 5.0
    max_error_rate: float = 0.01
    max_p99_ms: float | None = 500.0
    min_requests: int = 20
    no_data: str = "wait"  # wait | fail | pass
    failure_limit: int = 2
    # With no_data "wait": the Nth consecutive interval without min_requests requests (N >=
    # no_data_limit) counts as a breach, so waiting for traffic cannot hold a step forever.
    no_data_limit: int = 10
    # PromQL queries judged next to Envoy's own figures; errors reaching Prometheus (and empty
    # answers) follow ``no_data``.
    prometheus: PrometheusSource | None = None


@dataclass(frozen=True)
class Migrations:
    """An expand/contract migration set the deployment applies (expand before smoke tests)."""

    directory: str
    database: str  # postgresql:// URL; shown with its password hidden
    locking: str = "warning"  # lint severity of locking hazards: warning | error


@dataclass(frozen=True)
class Mirror:
    """Before any user is served by the new version: copy ``percent`` % of production requests
    to it for ``seconds`` (responses discarded), judged by the analysis (docs/mirroring.md)."""

    percent: float = 10.0
    seconds: float = 60.0


@dataclass(frozen=True)
class Targeting:
    """First phase of the shift: requests matching ``rule`` go to the new version, everyone else
    stays, for ``seconds`` or until promoted (docs/targeting.md)."""

    rule: Target
    seconds: float = 300.0


SCALE_TIMEOUT_POLICIES = ("fail", "rollback")


@dataclass(frozen=True)
class Scale:
    """The capacity guard and the hooks that scale an environment (docs/capacity.md).

    Before a step gives the new environment ``p`` % of traffic its capacity (the sum of its
    endpoints' weights) must be at least ``p`` % of the capacity that served 100 % when the
    deployment started, plus ``headroom_percent``; until it is, the deployment waits in the
    ``scaling`` phase, having called ``webhooks`` and ``commands`` with the capacity it needs,
    for at most ``timeout_seconds``, then does ``on_timeout``. After the replaced environment is
    decommissioned the hooks are called again with ``standby_capacity_percent`` of that capacity
    (the spec's ``standby_capacity``; ``standby_capacity_percent`` is its deprecated alias)."""

    webhooks: tuple[Webhook, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    timeout_seconds: float = 300.0
    on_timeout: str = "fail"  # fail | rollback
    headroom_percent: float = 0.0
    standby_capacity_percent: float = 0.0
    command_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class DeploymentSpec:
    version: str
    endpoints: EnvironmentState
    strategy: Strategy = field(default_factory=Strategy)
    smoke: Smoke = field(default_factory=Smoke)
    analysis: Analysis | None = None  # None: no automated analysis
    decommission_webhooks: tuple[Webhook, ...] = ()
    migrations: Migrations | None = None
    # convergence.require_all_proxies: gates wait for every connected proxy; None: the service's setting.
    require_all_proxies: bool | None = None
    affinity: Affinity | None = None  # session affinity during the shift; None: the service's setting
    mirror: Mirror | None = None
    target: Targeting | None = None
    scale: Scale | None = None  # None: no capacity guard


# ---------------------------------------------------------------------------------------------


def _number(path: str, value: object, *, minimum: float, maximum: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValidationError(f"{path} must be {kind}, got {value!r}")
    if value != value or not minimum <= value <= maximum:  # value != value: NaN
        raise ValidationError(f"{path} must be between {minimum:g} and {maximum:g}, got {value!r}")
    return value


def _bool(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"{path} must be true or false, got {value!r}")
    return value


def _string(path: str, value: object, *, max_len: int = 4096) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ValidationError(f"{path} must be a non-empty string of at most {max_len} characters")
    return value


def _url(path: str, value: object) -> str:
    text = _string(path, value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValidationError(f"{path} must be an http(s) URL, got {text!r}")
    return text


def parse_strategy(body: object) -> Strategy:
    spec = require_object("strategy", body)
    reject_unknown("strategy", spec, {"steps", "step_seconds", "bake_seconds", "auto_promote"})
    default = Strategy()
    steps = spec.get("steps", list(default.steps))
    if not isinstance(steps, list) or not steps or len(steps) > MAX_STEPS:
        raise ValidationError(f"strategy.steps must be a list of 1 to {MAX_STEPS} percentages ending at 100, e.g. [10, 50, 100]")
    checked = [int(_number(f"strategy.steps[{i}]", s, minimum=1, maximum=100, integer=True)) for i, s in enumerate(steps)]
    if any(b <= a for a, b in zip(checked, checked[1:])):
        raise ValidationError(f"strategy.steps must increase strictly, got {checked}")
    if checked[-1] != 100:
        raise ValidationError(f"strategy.steps must end at 100, got {checked}")
    return Strategy(
        steps=tuple(checked),
        step_seconds=_number("strategy.step_seconds", spec.get("step_seconds", default.step_seconds), minimum=0, maximum=MAX_SECONDS),
        bake_seconds=_number("strategy.bake_seconds", spec.get("bake_seconds", default.bake_seconds), minimum=0, maximum=MAX_SECONDS),
        auto_promote=_bool("strategy.auto_promote", spec.get("auto_promote", default.auto_promote)),
    )


def _parse_check(path: str, body: object) -> HttpCheck:
    spec = require_object(path, body)
    reject_unknown(path, spec, {"method", "path", "headers", "expect_status", "body_contains", "timeout_seconds", "retries"})
    default = HttpCheck()
    method = spec.get("method", default.method)
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise ValidationError(f"{path}.method must be one of {', '.join(sorted(HTTP_METHODS))}, got {method!r}")
    request_path = spec.get("path", default.path)
    if not isinstance(request_path, str) or not request_path.startswith("/") or any(c.isspace() for c in request_path):
        raise ValidationError(f"{path}.path must start with '/' and contain no whitespace, got {request_path!r}")
    headers = spec.get("headers", {})
    if not isinstance(headers, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValidationError(f"{path}.headers must be an object of string values")
    body_contains = spec.get("body_contains")
    if body_contains is not None:
        body_contains = _string(f"{path}.body_contains", body_contains)
    return HttpCheck(
        method=method.upper(),
        path=request_path,
        headers=tuple(sorted(headers.items())),
        expect_status=int(_number(f"{path}.expect_status", spec.get("expect_status", default.expect_status), minimum=100, maximum=599, integer=True)),
        body_contains=body_contains,
        timeout_seconds=_number(f"{path}.timeout_seconds", spec.get("timeout_seconds", default.timeout_seconds), minimum=0.01, maximum=300),
        retries=int(_number(f"{path}.retries", spec.get("retries", default.retries), minimum=0, maximum=100, integer=True)),
    )


def _parse_webhook(path: str, body: object) -> Webhook:
    spec = require_object(path, body)
    reject_unknown(path, spec, {"url", "timeout_seconds"})
    if "url" not in spec:
        raise ValidationError(f"{path}.url is required")
    return Webhook(
        url=_url(f"{path}.url", spec["url"]),
        timeout_seconds=_number(f"{path}.timeout_seconds", spec.get("timeout_seconds", 5.0), minimum=0.01, maximum=300),
    )


def _list(path: str, value: object, limit: int = 50) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise ValidationError(f"{path} must be a list of at most {limit} entries")
    return value


def parse_smoke(body: object) -> Smoke:
    spec = require_object("smoke", body)
    reject_unknown("smoke", spec, {"checks", "commands", "webhooks", "command_timeout_seconds"})
    checks = tuple(_parse_check(f"smoke.checks[{i}]", c) for i, c in enumerate(_list("smoke.checks", spec.get("checks", []))))
    commands = []
    for i, command in enumerate(_list("smoke.commands", spec.get("commands", []))):
        if not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command):
            raise ValidationError(f"smoke.commands[{i}] must be a non-empty list of strings (program and arguments; no shell)")
        commands.append(tuple(command))
    webhooks = tuple(_parse_webhook(f"smoke.webhooks[{i}]", w) for i, w in enumerate(_list("smoke.webhooks", spec.get("webhooks", []))))
    timeout = _number("smoke.command_timeout_seconds", spec.get("command_timeout_seconds", 60.0), minimum=0.1, maximum=3600)
    return Smoke(checks=checks, commands=tuple(commands), webhooks=webhooks, command_timeout_seconds=timeout)


def _parse_commands(path: str, value: object) -> tuple[tuple[str, ...], ...]:
    commands = []
    for i, command in enumerate(_list(path, value)):
        if not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command):
            raise ValidationError(f"{path}[{i}] must be a non-empty list of strings (program and arguments; no shell)")
        commands.append(tuple(command))
    return tuple(commands)


def parse_scale(body: object) -> Scale:
    spec = require_object("scale", body)
    reject_unknown("scale", spec, {"webhooks", "commands", "timeout_seconds", "on_timeout", "headroom_percent",
                                   "standby_capacity", "standby_capacity_percent", "command_timeout_seconds"})
    default = Scale()
    on_timeout = spec.get("on_timeout", default.on_timeout)
    if on_timeout not in SCALE_TIMEOUT_POLICIES:
        raise ValidationError(f"scale.on_timeout must be one of {', '.join(SCALE_TIMEOUT_POLICIES)}, got {on_timeout!r}")
    return Scale(
        webhooks=tuple(_parse_webhook(f"scale.webhooks[{i}]", w) for i, w in enumerate(_list("scale.webhooks", spec.get("webhooks", [])))),
        commands=_parse_commands("scale.commands", spec.get("commands", [])),
        timeout_seconds=_number("scale.timeout_seconds", spec.get("timeout_seconds", default.timeout_seconds), minimum=1, maximum=86_400),
        on_timeout=on_timeout,
        headroom_percent=_number("scale.headroom_percent", spec.get("headroom_percent", default.headroom_percent), minimum=0, maximum=1000),
        standby_capacity_percent=_standby_capacity(spec, default.standby_capacity_percent),
        command_timeout_seconds=_number("scale.command_timeout_seconds",
                                        spec.get("command_timeout_seconds", default.command_timeout_seconds), minimum=0.1, maximum=3600),
    )


def _standby_capacity(spec: Mapping[str, Any], default: float) -> float:
    """``scale.standby_capacity``: the warm pool after decommission, in percent of the capacity
    that served 100 % before the release, as a number (``50``) or a string (``"50%"``).
    ``standby_capacity_percent`` is its deprecated older name (a number only); giving both is
    refused, since they could disagree."""
    if "standby_capacity" in spec and "standby_capacity_percent" in spec:
        raise ValidationError("scale: give standby_capacity or its deprecated alias standby_capacity_percent, not both")
    if "standby_capacity_percent" in spec:
        return _number("scale.standby_capacity_percent", spec["standby_capacity_percent"], minimum=0, maximum=100)
    value = spec.get("standby_capacity", default)
    if isinstance(value, str):
        text = value.strip()
        number = text[:-1].strip() if text.endswith("%") else None
        try:
            value = float(number) if number else value
        except ValueError:
            pass
        if isinstance(value, str):
            raise ValidationError(f"scale.standby_capacity must be a percentage, a number (50) or a string like \"50%\", got {value!r}")
    return _number("scale.standby_capacity", value, minimum=0, maximum=100)


def parse_analysis(body: object) -> Analysis:
    spec = require_object("analysis", body)
    reject_unknown("analysis", spec, {"interval_seconds", "max_error_rate", "max_p99_ms", "min_requests", "no_data", "failure_limit",
                                      "no_data_limit", "prometheus"})
    default = Analysis()
    max_p99 = spec.get("max_p99_ms", default.max_p99_ms)
    no_data = spec.get("no_data", default.no_data)
    if no_data not in NO_DATA_POLICIES:
        raise ValidationError(f"analysis.no_data must be one of {', '.join(NO_DATA_POLICIES)}, got {no_data!r}")
    return Analysis(
        interval_seconds=_number("analysis.interval_seconds", spec.get("interval_seconds", default.interval_seconds), minimum=0.1, maximum=3600),
        max_error_rate=_number("analysis.max_error_rate", spec.get("max_error_rate", default.max_error_rate), minimum=0, maximum=1),
        max_p99_ms=None if max_p99 is None else _number("analysis.max_p99_ms", max_p99, minimum=0.001, maximum=3_600_000),
        min_requests=int(_number("analysis.min_requests", spec.get("min_requests", default.min_requests), minimum=0, maximum=10**9, integer=True)),
        no_data=no_data,
        failure_limit=int(_number("analysis.failure_limit", spec.get("failure_limit", default.failure_limit), minimum=1, maximum=1000, integer=True)),
        no_data_limit=int(_number("analysis.no_data_limit", spec.get("no_data_limit", default.no_data_limit), minimum=1, maximum=1000, integer=True)),
        prometheus=parse_prometheus(spec["prometheus"]) if spec.get("prometheus") is not None else None,
    )


MAX_PROMETHEUS_QUERIES = 20


def parse_prometheus(body: object) -> PrometheusSource:
    where = "analysis.prometheus"
    spec = require_object(where, body)
    reject_unknown(where, spec, {"url", "queries", "timeout_seconds"})
    url = _string(f"{where}.url", spec.get("url"))
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise ValidationError(f"{where}.url must be an http:// or https:// URL, got {url!r}")
    raw = _list(f"{where}.queries", spec.get("queries", []))
    if not raw or len(raw) > MAX_PROMETHEUS_QUERIES:
        raise ValidationError(f"{where}.queries: give 1 to {MAX_PROMETHEUS_QUERIES} queries")
    queries = tuple(_prometheus_query(f"{where}.queries[{i}]", q) for i, q in enumerate(raw))
    names = [q.name for q in queries]
    if len(set(names)) != len(names):
        raise ValidationError(f"{where}.queries: names must be unique, got {names}")
    timeout = _number(f"{where}.timeout_seconds", spec.get("timeout_seconds", 5.0), minimum=0.1, maximum=60)
    return PrometheusSource(url=url.rstrip("/"), queries=queries, timeout_seconds=timeout)


def _prometheus_query(where: str, body: object) -> PrometheusQuery:
    spec = require_object(where, body)
    reject_unknown(where, spec, {"name", "query", "max", "min", "for_environment"})
    name = _string(f"{where}.name", spec.get("name"))
    query = _string(f"{where}.query", spec.get("query"))
    bounds = {k: _number(f"{where}.{k}", spec[k], minimum=-1e18, maximum=1e18) for k in ("max", "min") if spec.get(k) is not None}
    if not bounds:
        raise ValidationError(f"{where}: give max, min or both (the value is a breach above max or below min)")
    which = spec.get("for_environment", "new")
    if which not in ("new", "old"):
        raise ValidationError(f"{where}.for_environment must be 'new' or 'old', got {which!r}")
    return PrometheusQuery(name=name, query=query, max=bounds.get("max"), min=bounds.get("min"), for_environment=which)


def parse_migrations(body: object) -> Migrations:
    spec = require_object("migrations", body)
    reject_unknown("migrations", spec, {"directory", "database", "locking"})
    for key in ("directory", "database"):
        if key not in spec:
            raise ValidationError(f"migrations.{key} is required")
    database = _string("migrations.database", spec["database"])
    if urlsplit(database).scheme not in ("postgres", "postgresql"):
        raise ValidationError("migrations.database must be a postgresql:// URL")
    locking = spec.get("locking", "warning")
    if locking not in ("warning", "error"):
        raise ValidationError(f"migrations.locking must be 'warning' or 'error', got {locking!r}")
    return Migrations(directory=_string("migrations.directory", spec["directory"]), database=database, locking=locking)


def parse_mirror(body: object) -> Mirror:
    spec = require_object("mirror", body)
    reject_unknown("mirror", spec, {"percent", "seconds"})
    default = Mirror()
    percent = _number("mirror.percent", spec.get("percent", default.percent), minimum=0, maximum=100)
    if percent == 0:
        raise ValidationError("mirror.percent must be above 0 (omit mirror to skip the phase)")
    if percent * 10_000 < 1:
        raise ValidationError(f"mirror.percent must be at least 0.0001 (one request in a million), got {percent!r}")
    return Mirror(percent=percent, seconds=_number("mirror.seconds", spec.get("seconds", default.seconds), minimum=0.1, maximum=MAX_SECONDS))


def parse_targeting(body: object) -> Targeting:
    spec = require_object("target", body)
    reject_unknown("target", spec, {"headers", "cookie", "seconds"})
    rule = parse_target_rule("target", spec)
    seconds = _number("target.seconds", spec.get("seconds", Targeting(rule).seconds), minimum=0.1, maximum=MAX_SECONDS)
    return Targeting(rule=rule, seconds=seconds)


def parse_deployment_spec(body: object) -> DeploymentSpec:
    spec = require_object("deployment", body)
    reject_unknown("deployment", spec, {"version", "endpoints", "strategy", "smoke", "analysis", "decommission", "migrations",
                                        "convergence", "affinity", "mirror", "target", "scale"})
    state = parse_environment_spec({k: spec[k] for k in ("version", "endpoints") if k in spec})
    if not state.endpoints:
        raise ValidationError("endpoints must list at least one 'IP:PORT': a deployment needs something to send traffic to")
    decommission = require_object("decommission", spec.get("decommission", {}))
    reject_unknown("decommission", decommission, {"webhooks"})
    hooks = tuple(_parse_webhook(f"decommission.webhooks[{i}]", w)
                  for i, w in enumerate(_list("decommission.webhooks", decommission.get("webhooks", []))))
    parsed = DeploymentSpec(
        version=state.version,
        endpoints=state,
        strategy=parse_strategy(spec.get("strategy", {})),
        smoke=parse_smoke(spec.get("smoke", {})),
        analysis=parse_analysis(spec["analysis"]) if spec.get("analysis") is not None else None,
        decommission_webhooks=hooks,
        migrations=parse_migrations(spec["migrations"]) if spec.get("migrations") is not None else None,
        require_all_proxies=parse_convergence(spec["convergence"]) if spec.get("convergence") is not None else None,
        affinity=parse_affinity("affinity", spec["affinity"]) if spec.get("affinity") is not None else None,
        mirror=parse_mirror(spec["mirror"]) if spec.get("mirror") is not None else None,
        target=parse_targeting(spec["target"]) if spec.get("target") is not None else None,
        scale=parse_scale(spec["scale"]) if spec.get("scale") is not None else None,
    )
    if parsed.mirror is not None and parsed.analysis is None:
        raise ValidationError("mirror needs analysis: nothing else judges the mirrored requests")
    return parsed


def parse_convergence(body: object) -> bool | None:
    """``convergence: {require_all_proxies: bool}``: None leaves the service's setting in force."""
    spec = require_object("convergence", body)
    reject_unknown("convergence", spec, {"require_all_proxies"})
    value = spec.get("require_all_proxies")
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"convergence.require_all_proxies must be true or false, got {value!r}")
    return value


def _analysis_dict(analysis: Analysis) -> dict[str, Any]:
    data = asdict(analysis)
    if analysis.prometheus is None:
        del data["prometheus"]  # specs stored before the Prometheus source look the same as before
    else:
        data["prometheus"]["queries"] = [asdict(q) for q in analysis.prometheus.queries]
    return data


def spec_to_dict(spec: DeploymentSpec) -> dict[str, Any]:
    """A JSON-ready form; parse_deployment_spec(spec_to_dict(s)) == s."""
    smoke = asdict(spec.smoke)
    smoke["checks"] = [dict(asdict(c), headers=dict(c.headers)) for c in spec.smoke.checks]
    smoke["commands"] = [list(c) for c in spec.smoke.commands]
    smoke["webhooks"] = [asdict(w) for w in spec.smoke.webhooks]
    strategy = asdict(spec.strategy)
    strategy["steps"] = list(spec.strategy.steps)
    return {
        "version": spec.version,
        "endpoints": [e.to_json() for e in spec.endpoints.endpoints],
        "strategy": strategy,
        "smoke": smoke,
        "analysis": _analysis_dict(spec.analysis) if spec.analysis else None,
        "decommission": {"webhooks": [asdict(w) for w in spec.decommission_webhooks]},
        "migrations": asdict(spec.migrations) if spec.migrations else None,
        "convergence": {"require_all_proxies": spec.require_all_proxies} if spec.require_all_proxies is not None else None,
        "affinity": affinity_to_dict(spec.affinity),
        "mirror": asdict(spec.mirror) if spec.mirror else None,
        "target": _targeting_to_dict(spec.target),
        # Only when set, so specs stored before the capacity guard read the same.
        **({"scale": _scale_to_dict(spec.scale)} if spec.scale is not None else {}),
    }


def _scale_to_dict(scale: Scale) -> dict[str, Any]:
    data = asdict(scale)
    data["webhooks"] = [asdict(w) for w in scale.webhooks]
    data["commands"] = [list(c) for c in scale.commands]
    # Written under the documented name; records stored with the older alias still parse.
    data["standby_capacity"] = data.pop("standby_capacity_percent")
    return data


def _targeting_to_dict(target: Targeting | None) -> dict[str, Any] | None:
    if target is None:
        return None
    rule = target.rule
    return {
        "headers": dict(rule.headers),
        "cookie": {"name": rule.cookie[0], "value": rule.cookie[1]} if rule.cookie else None,
        "seconds": target.seconds,
    }
