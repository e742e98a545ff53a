"""Live terminal views for ``bluegreen status --watch`` and ``bluegreen deploy --watch``.

The frames are pure functions of API views and the time (tested with a fake terminal); the
loop redraws with plain ANSI escapes (cursor home, clear to the end), no curses. It re-reads the
API when the admin API's live feed (``GET /v1/events``) says something changed, and redraws
once a second in between for the countdowns, without a request.
"""

from __future__ import annotations

import threading
import urllib.request
from datetime import datetime
from typing import Any, Callable, Iterable, Sequence

CLEAR = "\x1b[H\x1b[J"  # cursor home, erase to the end of the screen
BAR_WIDTH = 20


def countdown(deadline: str | None, now: float) -> str:
    if not deadline:
        return ""
    left = int(round(datetime.fromisoformat(deadline.replace("Z", "+00:00")).timestamp() - now))
    if left <= 0:
        return "due"
    minutes, seconds = divmod(left, 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _running(view: dict[str, Any]) -> dict[str, Any] | None:
    for env in ("blue", "green"):
        d = view["environments"][env]["deployment"]
        if d and d.get("spec") and (d["status"] in ("deploying", "ready", "shifting") or (d["status"] == "active" and d.get("baking"))):
            return d
    return None


def phase(d: dict[str, Any] | None) -> str:
    if d is None:
        return "idle"
    steps = (d.get("spec") or {}).get("strategy", {}).get("steps", [])
    text = "baking" if d.get("baking") else d["status"]
    if d["status"] == "shifting" and d.get("step", -1) >= 0 and steps:
        text += f" {d['step'] + 1}/{len(steps)} ({steps[d['step']]}%)"
    if d.get("paused_remaining") is not None:
        text += " PAUSED"
    if d.get("awaiting_promote"):
        text += " awaiting promote"
    return text


def status_frame(views: Sequence[dict[str, Any]], now: float, width: int = 200) -> list[str]:
    """One line per service: weights as a bar, versions, phase and countdown, convergence."""
    if not views:
        return ["no services registered"]
    lines = []
    for view in views:
        weights = view["traffic"]["weights"]
        d = _running(view)
        conv = view["convergence"]
        left = countdown(d.get("deadline") if d and d.get("paused_remaining") is None else None, now)
        convergence = f"{conv['acked']}/{conv['proxies']} proxies"
        if conv.get("lagging"):
            convergence += f" lagging {len(conv['lagging'])}"
        if conv.get("rejecting"):
            convergence += f" REJECTING {len(conv['rejecting'])}"
        versions = " ".join(f"{env}={view['environments'][env]['version'] or '-'}" for env in ("blue", "green"))
        line = (f"{view['name']:<16} B{bar(weights['blue'] / 100)}G {weights['blue']:>3}/{weights['green']:<3} {versions}  "
                f"{phase(d)}{' ' + left if left else ''}  {convergence}")
        lines.append(line[:width])
    return lines


def deployment_frame(d: dict[str, Any], now: float) -> list[str]:
    """A progress bar per step: done, the current one filled by the time spent, pending."""
    spec = d.get("spec") or {}
    strategy = spec.get("strategy", {})
    steps = strategy.get("steps", [100])
    step_seconds = float(strategy.get("step_seconds", 0)) or 1.0
    lines = [f"{d['id']} {d['version']} -> {d['environment']}: {d['status']}" + (f"  reason: {d['reason']}" if d.get("reason") else "")]
    current = d.get("step", -1)
    settled = d["status"] in ("active", "failed", "rolled_back", "decommissioned") and not d.get("baking")
    for index, weight in enumerate(steps):
        if index < current or (settled and d["status"] == "active"):
            fraction, note = 1.0, "done"
        elif index == current and d["status"] in ("shifting", "active"):
            left = countdown(d.get("deadline"), now) if d.get("paused_remaining") is None else "paused"
            seconds_left = _seconds_left(d.get("deadline"), now)
            fraction = 1.0 - (seconds_left / step_seconds) if seconds_left is not None else 1.0
            note = ("baking " if d.get("baking") else "") + (left or "")
        else:
            fraction, note = 0.0, ""
        lines.append(f"  step {index + 1} {weight:>3}% {bar(max(0.0, min(1.0, fraction)))} {note}".rstrip())
    analysis = d.get("analysis") or {}
    if analysis:
        lines.append(f"  last interval: {analysis.get('requests', 0)} requests, error rate {analysis.get('error_rate', '-')}, "
                     f"p99 {analysis.get('p99_ms', '-')} ms, {analysis.get('verdict', '')}")
    return lines


def _seconds_left(deadline: str | None, now: float) -> float | None:
    if not deadline:
        return None
    return max(0.0, datetime.fromisoformat(deadline.replace("Z", "+00:00")).timestamp() - now)


def redraw(lines: Iterable[str], write: Callable[[str], Any]) -> None:
    write(CLEAR + "\n".join(lines) + "\n")


def follow_events(url: str, headers: dict[str, str], changed: threading.Event, context: Any = None) -> threading.Thread:
    """Set ``changed`` on each live-feed event (a daemon thread; it reconnects after errors)."""

    def run() -> None:
        import time

        while True:
            try:
                request = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(request, timeout=60, context=context) as response:
                    for raw in response:
                        if raw.startswith(b"event:"):
                            changed.set()
            except OSError:
                pass
            changed.set()  # re-read after a gap
            time.sleep(2)

    thread = threading.Thread(target=run, name="bluegreen-events", daemon=True)
    thread.start()
    return thread
