"""What a deployment may make the control plane run or call: the server config's allowlists.

The deployment spec parser is pure and knows nothing of the server; these checks run at the
API boundary, before anything is stored, and refuse with a ValidationError (HTTP 400) that
names the command or URL (password hidden) and the config key to change.

Rules for URLs (``webhooks.allowed``, ``migrations.databases_allowed``), each one of:

- ``127.0.0.0/8``, ``10.1.2.3``, ``::1``: the URL's host is an IP literal inside that network.
  Host *names* never match an IP rule: we do not resolve names, whose answers can change.
- ``hooks.example.com``, ``*.example.com``, optionally ``:PORT``: the URL's host name matches
  (``*`` is a shell-style wildcard, case-insensitive); with a port, the URL's port must be it.
- ``https://hooks.example.com/bluegreen/``: scheme, host and port equal, and the URL's path
  starts with this path. User and password in the URL are ignored for matching.

Smoke commands (``smoke.commands_allowed``): each entry is an argv prefix; a command is allowed
when its first arguments equal one entry's, element by element (no shell, no wildcards).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from urllib.parse import parse_qs, urlsplit

from ..config import Allowlists
from ..deploy.spec import DeploymentSpec, Migrations
from ..errors import ValidationError
from ..migrations.apply import redact

_DEFAULT_PORTS = {"http": 80, "https": 443, "postgres": 5432, "postgresql": 5432}


def check_rule(rule: str) -> str | None:
    """Why ``rule`` is malformed, or None."""
    if "://" in rule:
        parts = urlsplit(rule)
        if not parts.hostname:
            return f"URL rule {rule!r} has no host"
        return None
    try:
        ipaddress.ip_network(rule, strict=False)
        return None
    except ValueError:
        pass
    host, _, port = rule.rpartition(":") if rule.count(":") == 1 else (rule, "", "")
    if port and not port.isdigit():
        return f"rule {rule!r}: the port must be a number"
    if not host:
        return f"rule {rule!r} has no host"
    return None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _host_matches(rule: str, scheme: str, host: str, port: int | None) -> bool:
    effective_port = port if port is not None else _DEFAULT_PORTS.get(scheme)
    try:
        network = ipaddress.ip_network(rule, strict=False)
    except ValueError:
        network = None
    if network is not None:
        address = _ip(host)
        return address is not None and address in network
    name, _, rule_port = rule.rpartition(":") if rule.count(":") == 1 else (rule, "", "")
    if rule_port and int(rule_port) != effective_port:
        return False
    return _ip(host) is None and fnmatch.fnmatchcase(host.lower(), name.lower())


_POSTGRES = ("postgres", "postgresql")
# Path tricks a client normalises away before sending (yarl: "/a/../b" -> "/b", "%2e%2e" -> ".."):
# a path prefix rule could otherwise be escaped. Such URLs never match a prefix rule.
_ENCODED_PATH_TRICKS = ("%2e", "%2f", "%5c")


def _plain_path(path: str) -> bool:
    lowered = path.lower()
    return not any(t in lowered for t in _ENCODED_PATH_TRICKS) and not any(seg in (".", "..") for seg in path.split("/"))


def _url_prefix_matches(rule: str, url: str) -> bool:
    r, u = urlsplit(rule), urlsplit(url)
    scheme = u.scheme.lower()
    if r.scheme.lower() != scheme:
        return False
    try:
        rule_target = ((r.hostname or "").lower(), r.port or _DEFAULT_PORTS.get(scheme))
        if scheme in _POSTGRES:
            # Every host the driver would reach (netloc, ?host=, ?hostaddr=, ?port=) must be the rule's.
            targets = [(host, port or _DEFAULT_PORTS.get(scheme)) for _, host, port in _hosts(url)]
        else:
            targets = [((u.hostname or "").lower(), u.port or _DEFAULT_PORTS.get(scheme))]
    except (ValueError, ValidationError):
        return False  # an unparsable host or port matches no rule
    if any(target != rule_target for target in targets):
        return False
    return _plain_path(u.path or "/") and (u.path or "/").startswith(r.path or "/")


def _hosts(url: str) -> list[tuple[str, str, int | None]]:
    """(scheme, host, port) of every host a URL reaches. For PostgreSQL URLs this is what the
    driver itself will use (psycopg's own parsing: several hosts in the netloc, ``?host=``,
    ``?hostaddr=`` and ``?port=`` override it, percent-decoding); a host that is a directory
    (a Unix socket) or absent is this machine. ``?service=`` (a pg_service.conf entry, which
    could name any host) is refused."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _POSTGRES:
        from psycopg.conninfo import conninfo_to_dict

        try:
            info = conninfo_to_dict(url)
        except Exception:
            raise ValidationError(f"cannot parse the database URL {redact(url)}") from None
        if "service" in info:
            raise ValidationError(f"the database URL {redact(url)} names a service file entry; give its host instead")
        hosts = str(info.get("hostaddr") or info.get("host") or "").split(",")
        ports = str(info.get("port") or "").split(",")
        result: list[tuple[str, str, int | None]] = []
        for i, host in enumerate(hosts):
            raw_port = ports[i] if i < len(ports) else (ports[0] if len(ports) == 1 else "")
            if raw_port and not raw_port.isdigit():
                raise ValidationError(f"cannot parse the port {raw_port!r} of the database URL {redact(url)}")
            port = int(raw_port) if raw_port else None
            if not host or host.startswith(("/", "@")):
                result.append((scheme, "localhost", port))  # a Unix socket: this machine
            else:
                result.append((scheme, host.strip("[]").lower(), port))
        return result
    try:
        return [(scheme, (parts.hostname or "").lower(), parts.port)]
    except ValueError:
        raise ValidationError(f"cannot parse the port of {redact(url)}") from None


def url_allowed(url: str, rules: tuple[str, ...]) -> bool:
    prefix_rules = [r for r in rules if "://" in r]
    host_rules = [r for r in rules if "://" not in r]
    if any(_url_prefix_matches(r, url) for r in prefix_rules):
        return True
    return all(any(_host_matches(r, scheme, host, port) for r in host_rules) for scheme, host, port in _hosts(url))


def _refuse_url(what: str, url: str, key: str, rules: tuple[str, ...]) -> ValidationError:
    return ValidationError(
        f"{what} {redact(url)} is not allowed by the server config's {key} ({', '.join(rules) or 'empty'}); "
        f"add a rule there to allow it"
    )


def command_allowed(argv: tuple[str, ...], allowed: tuple[tuple[str, ...], ...]) -> bool:
    return any(argv[: len(prefix)] == prefix for prefix in allowed)


def check_migrations(spec: Migrations, allow: Allowlists) -> None:
    if not url_allowed(spec.database, allow.databases):
        raise _refuse_url("migrations.database", spec.database, "migrations.databases_allowed", allow.databases)


def check_deployment(spec: DeploymentSpec, allow: Allowlists) -> None:
    """Raise ValidationError for the first command or URL the allowlists do not allow."""
    for i, argv in enumerate(spec.smoke.commands):
        if not command_allowed(argv, allow.smoke_commands):
            configured = "; ".join(" ".join(p) for p in allow.smoke_commands) or "empty: no command may run"
            raise ValidationError(
                f"smoke.commands[{i}] {list(argv)!r} is not allowed by the server config's smoke.commands_allowed "
                f"({configured}); a command must start with one of its argv prefixes"
            )
    scale_commands = spec.scale.commands if spec.scale is not None else ()
    for i, argv in enumerate(scale_commands):
        if not command_allowed(argv, allow.smoke_commands):
            configured = "; ".join(" ".join(p) for p in allow.smoke_commands) or "empty: no command may run"
            raise ValidationError(
                f"scale.commands[{i}] {list(argv)!r} is not allowed by the server config's smoke.commands_allowed "
                f"({configured}); a command must start with one of its argv prefixes"
            )
    hooks = [(f"smoke.webhooks[{i}].url", w.url) for i, w in enumerate(spec.smoke.webhooks)]
    hooks += [(f"scale.webhooks[{i}].url", w.url) for i, w in enumerate(spec.scale.webhooks if spec.scale is not None else ())]
    hooks += [(f"decommission.webhooks[{i}].url", w.url) for i, w in enumerate(spec.decommission_webhooks)]
    for where, url in hooks:
        if not url_allowed(url, allow.webhooks):
            raise _refuse_url(where, url, "webhooks.allowed", allow.webhooks)
    if spec.analysis is not None and spec.analysis.prometheus is not None:
        url = spec.analysis.prometheus.url
        if not url_allowed(url, allow.prometheus):
            raise _refuse_url("analysis.prometheus.url", url, "analysis.prometheus_allowed", allow.prometheus)
    if spec.migrations is not None:
        check_migrations(spec.migrations, allow)


def check_service_notifications(body: object, allow: Allowlists) -> None:
    """A service's own webhooks (``notifications.webhooks`` of PUT /v1/services/{name}) must be
    well-formed and allowed by ``webhooks.allowed``, like the config file's (400 otherwise)."""
    from ..notify.events import parse_webhook

    if not isinstance(body, dict) or not isinstance(body.get("notifications"), dict):
        return  # absent, or malformed: the model's parser names the problem
    hooks = body["notifications"].get("webhooks", [])
    if not isinstance(hooks, list):
        return
    for i, hook in enumerate(hooks):
        try:
            parse_webhook(f"notifications.webhooks[{i}]", hook, lambda url: url_allowed(url, allow.webhooks))
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
