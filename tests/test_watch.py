"""The terminal frames of `bluegreen status --watch` and `deploy --watch` (pure: API views and
the time in, lines out), and the redraw, with a fake terminal."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any

from controlplane.watch import CLEAR, bar, countdown, deployment_frame, redraw, status_frame

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc).timestamp()


def iso(seconds_from_now: float) -> str:
    return datetime.fromtimestamp(NOW + seconds_from_now, timezone.utc).isoformat()


def deployment(**fields: Any) -> dict[str, Any]:
    base = {"id": "shop-3", "version": "v3", "environment": "green", "status": "shifting", "step": 1, "baking": False,
            "paused_remaining": None, "awaiting_promote": False, "deadline": iso(15), "reason": None, "analysis": None,
            "spec": {"strategy": {"steps": [10, 50, 100], "step_seconds": 60}}}
    return {**base, **fields}


def service(d: dict[str, Any] | None = None, blue: int = 50) -> dict[str, Any]:
    return {"name": "shop", "traffic": {"weights": {"blue": blue, "green": 100 - blue}},
            "environments": {"blue": {"version": "v2", "deployment": None}, "green": {"version": "v3", "deployment": d}},
            "convergence": {"acked": 2, "proxies": 3, "lagging": ["edge-3"], "rejecting": []}}


def test_status_frame() -> None:
    (line,) = status_frame([service(deployment())], NOW)
    assert line == ("shop             B[##########..........]G  50/50  blue=v2 green=v3  shifting 2/3 (50%) 15s  "
                    "2/3 proxies lagging 1")
    assert status_frame([], NOW) == ["no services registered"]
    (idle,) = status_frame([service(None, blue=100)], NOW)
    assert "idle" in idle and "B[####################]G 100/0" in idle


def test_deployment_frame_has_a_bar_per_step() -> None:
    lines = deployment_frame(deployment(deadline=iso(45)), NOW)
    assert lines == [
        "shop-3 v3 -> green: shifting",
        "  step 1  10% [####################] done",
        "  step 2  50% [#####...............] 45s",
        "  step 3 100% [....................]",
    ]
    done = deployment_frame(deployment(status="active", step=2, baking=False, deadline=None), NOW)
    assert all("[####################] done" in line for line in done[1:])
    rolled = deployment_frame(deployment(status="rolled_back", reason="analysis: error rate 0.2 > 0.05"), NOW)
    assert rolled[0] == "shop-3 v3 -> green: rolled_back  reason: analysis: error rate 0.2 > 0.05"


def test_countdown_and_bar() -> None:
    assert countdown(iso(125), NOW) == "2m05s"
    assert countdown(iso(-1), NOW) == "due"
    assert countdown(None, NOW) == ""
    assert bar(0.0, 4) == "[....]" and bar(1.5, 4) == "[####]"


def test_redraw_clears_and_writes_the_frame() -> None:
    terminal = io.StringIO()
    redraw(["a", "b"], terminal.write)
    redraw(["c"], terminal.write)
    assert terminal.getvalue() == f"{CLEAR}a\nb\n{CLEAR}c\n"
