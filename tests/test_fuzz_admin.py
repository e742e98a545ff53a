"""Schemathesis against /v1/openapi.json on a live `bluegreen serve`, bounded in time.

For every documented operation, generated requests (valid and invalid) must never get a 5xx,
every response must match its documented status, content type and schema, and a refused
request (4xx) must leave the stored state as it was. Bounded: a few examples per operation,
no deadline, no example database; about 20 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import run_control_plane  # noqa: E402

EXAMPLES_PER_OPERATION = 12
KNOWN = {"name": "shop", "id": "shop-1"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def state(session: requests.Session, base: str) -> tuple[int, frozenset[tuple[str, int, str]]]:
    """The store revision and every history event (deployment id, index, actor)."""
    listing = session.get(base + "/v1/services", timeout=10).json()
    events = set()
    for service in listing["services"]:
        for d in session.get(f"{base}/v1/services/{service['name']}/deployments", timeout=10).json()["deployments"]:
            events |= {(d["id"], i, e["actor"]) for i, e in enumerate(d["history"])}
    return listing["store_revision"], frozenset(events)


def quiet_state(session: requests.Session, base: str) -> tuple[int, frozenset[tuple[str, int, str]]]:
    """The state once the rollout driver has stopped changing it (it works in the background)."""
    previous = state(session, base)
    for _ in range(50):
        time.sleep(0.05)  # two equal reads a moment apart; the driver has no "idle" event to await
        current = state(session, base)
        if current == previous:
            return current
        previous = current
    return previous


def refused_changed_nothing(before: Any, after: Any) -> bool:
    """Unchanged, or changed only by the driver (every new history event is "automatic")."""
    if before == after:
        return True
    return all(actor == "automatic" for _, _, actor in after[1] - before[1]) and bool(after[1] - before[1])


def fuzz(base: str, token: str, document: dict[str, Any]) -> list[str]:
    schema = schemathesis.openapi.from_dict(document)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/v1/events":
            continue  # an endless stream without parameters: tests/test_ui.py and test_ui_events.py cover it

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(), known=st.booleans())
        def run(case: Any, known: bool) -> None:
            if known:  # half the examples aim at the seeded service and deployment instead of random names
                for key, value in KNOWN.items():
                    if key in (case.path_parameters or {}):
                        case.path_parameters[key] = value
            before = quiet_state(session, base)
            response = case.call(base_url=base, session=session)
            case.validate_response(response, checks=CHECKS)
            if 400 <= response.status_code < 500:
                after = state(session, base)
                assert refused_changed_nothing(before, after), (
                    f"{case.method} {case.formatted_path} -> {response.status_code} changed the state: {before} -> {after}")

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them all
            problems.append(f"{operation.label}: {exc}")
    return problems


async def test_fuzz_the_admin_api(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"fleets": {"default": {"listeners": [{"name": "http", "address": "127.0.0.1", "port": 1,
                                                                            "preview_port": 2}]}}}))
    async with run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path / "logs") as cp:
        async with cp.session() as session:
            async with session.put(cp.admin_url + "/v1/services/shop", json={}) as r:
                assert r.status == 200
            async with session.put(cp.admin_url + "/v1/services/shop/environments/blue",
                                   json={"version": "v1", "endpoints": ["127.0.0.1:9"]}) as r:
                assert r.status == 200
            async with session.get(cp.admin_url + "/v1/openapi.json") as r:
                document = await r.json()
        problems = await asyncio.to_thread(fuzz, cp.admin_url, cp.token, document)
        assert "Traceback" not in cp.log_text()
    assert not problems, "\n\n".join(problems)
