"""Which notification events a deployment's history produces, and what their messages say.
Pure: no I/O. The history is the one source: a notification exists because an event was
stored, and a restart re-derives nothing (the outbox cursor says how far it got).
"""

from __future__ import annotations

import json
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from ..model import Deployment, Event, Webhook

EVENTS = ("started", "smoke_passed", "smoke_failed", "step", "paused", "promoted", "rolled_back", "failed", "active",
          "decommissioned")
FORMATS = ("json", "slack")


WebhookTarget = Webhook  # one receiver (defined in the model: a service's settings hold them)


MAX_SECRET_BYTES = 4096


def read_secret(path: str) -> bytes:
    """The HMAC key in ``path``: a regular file of at most 4 KiB, stripped, not empty (a device
    or a FIFO named by mistake must not hang or exhaust the process). OSError or ValueError."""
    file = Path(path)
    info = file.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_size > MAX_SECRET_BYTES:
        raise ValueError(f"{path} is larger than {MAX_SECRET_BYTES} bytes")
    secret = file.read_bytes().strip()
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def parse_webhook(where: str, raw: object, allowed: Callable[[str], bool], allowed_key: str = "webhooks.allowed") -> WebhookTarget:
    """One webhook from the config file or a service's settings; ValueError naming the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object like {{url: https://...}}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"url", "secret_file", "format", "events", "timeout_seconds"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: url, secret_file, format, events, timeout_seconds")
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}.url: expected an http:// or https:// URL, got {url!r}")
    if not allowed(url):
        raise ValueError(f"{where}.url: {url} is not allowed by {allowed_key}")
    fmt = raw.get("format", "json")
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    events = raw.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ValueError(f"{where}.events: expected a list of event names")
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise ValueError(f"{where}.events: unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}")
    secret_file = raw.get("secret_file")
    if secret_file is not None:
        try:
            read_secret(str(secret_file))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}.secret_file: {exc}") from None
    timeout = raw.get("timeout_seconds", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        raise ValueError(f"{where}.timeout_seconds: expected a number of seconds in (0, 60], got {timeout!r}")
    return WebhookTarget(url, fmt, str(secret_file) if secret_file is not None else None, tuple(events), float(timeout))


def events_of(previous: Event | None, event: Event) -> tuple[str, ...]:
    """The notification events that history ``event`` (after ``previous``, None for the first)
    stands for; most history events (analysis figures, notes, drain, standby) stand for none."""
    status, reason = event.status, event.reason
    before = previous.status if previous is not None else None
    if before is None:
        return ("started",)
    if status == "failed":
        return ("smoke_failed",) if reason.startswith("smoke tests failed") else ("failed",)
    if status in ("rolled_back", "decommissioned") and before != status:
        return (status,)
    if reason == "paused":
        return ("paused",)
    if status == "ready" and before == "deploying":
        return ("smoke_passed",)
    found: list[str] = []
    if status in ("shifting", "active") and reason.startswith("promoted to"):
        found.append("promoted")
    elif status == "shifting" and (before != "shifting" or reason.startswith("step ")):
        found.append("step")
    if status == "active" and before != "active":
        found.append("active")
    return tuple(found)


def new_events(record: Deployment, seen: int) -> list[tuple[int, str, Event]]:
    """(history index, event name, history event) for the history entries from ``seen`` on."""
    found = []
    for index in range(seen, len(record.history)):
        previous = record.history[index - 1] if index > 0 else None
        for name in events_of(previous, record.history[index]):
            found.append((index, name, record.history[index]))
    return found


def message(record: Deployment, event: str, at: float, reason: str | None) -> dict[str, Any]:
    """The ``json`` format: what every receiver gets (the Slack format is built from it)."""
    return {
        "event": event,
        "deployment": record.id,
        "service": record.service,
        "version": record.version,
        "environment": record.environment.value,
        "at": datetime.fromtimestamp(at, timezone.utc).isoformat(),
        "reason": reason,
    }


_EMOJI = {"rolled_back": ":rewind:", "failed": ":x:", "smoke_failed": ":x:", "active": ":white_check_mark:",
          "paused": ":double_vertical_bar:"}


def body(target_format: str, payload: dict[str, Any]) -> bytes:
    """The request body for a receiver of ``target_format``."""
    if target_format == "slack":
        text = (f"{_EMOJI.get(payload['event'], ':large_blue_circle:')} *{payload['service']}* {payload['version']} "
                f"({payload['environment']}): {payload['event'].replace('_', ' ')}")
        if payload.get("reason"):
            text += f" ({payload['reason']})"
        return json.dumps({"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}).encode()
    return json.dumps(payload, separators=(",", ":")).encode()


def targets_for(event: str, targets: Sequence[WebhookTarget]) -> list[WebhookTarget]:
    return [t for t in targets if t.wants(event)]
