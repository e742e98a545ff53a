"""Which notification events a deployment's history produces, and what their messages say.
Pure: no I/O. The history is the one source: a notification exists because an event was
stored, and a restart re-derives nothing (the outbox cursor says how far it got).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from ..model import Deployment, Event

EVENTS = ("started", "smoke_passed", "smoke_failed", "step", "paused", "promoted", "rolled_back", "failed", "active",
          "decommissioned")
FORMATS = ("json", "slack")


@dataclass(frozen=True)
class WebhookTarget:
    """One configured receiver: ``events`` empty means every event."""

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
    def from_dict(cls, data: dict[str, Any]) -> "WebhookTarget":
        return cls(data["url"], data.get("format", "json"), data.get("secret_file"), tuple(data.get("events", ())),
                   float(data.get("timeout_seconds", 5.0)))


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
