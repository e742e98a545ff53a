"""Failures surface and nothing is lost: publisher retries, liveness vs readiness, 503 for a
change that is stored but not pushed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controlplane.admin import api as admin_api_module
from controlplane.config import Settings
from controlplane.fleet import Convergence, SnapshotBuilder, fleet_resolver
from controlplane.fleet.publisher import Backoff, Publisher
from controlplane.metrics import Metrics
from controlplane.store.repository import Repository
from controlplane.store.sqlite import open_sqlite_store
from controlplane.xds.server import SnapshotCache
from tests.harness import wait_for
from tests.test_admin_api import admin_api


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(initial=0.1, cap=1.0)
    assert [backoff.delay(n, lambda: 1.0) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.delay(3, lambda: 0.5) == pytest.approx(0.4)
    assert backoff.delay(10_000, lambda: 1.0) == 1.0  # no overflow after a long outage


async def test_publisher_retries_a_failed_build_without_waiting_for_another_write(tmp_path: Path) -> None:
    kv = await open_sqlite_store(tmp_path / "state.db")
    settings = Settings()
    repo = Repository(kv)
    builder = SnapshotBuilder(settings.fleets)
    cache = SnapshotCache(fleet_resolver(settings))
    metrics = Metrics()
    failures_left = 0
    real_build = builder.build

    def flaky_build(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures_left
        if failures_left:
            failures_left -= 1
            raise RuntimeError("simulated build failure")
        return real_build(*args, **kwargs)

    builder.build = flaky_build  # type: ignore[method-assign]
    slept: list[float] = []
    errors_seen: list[str | None] = []
    publisher: Publisher

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        errors_seen.append(publisher.last_error)

    publisher = Publisher(repo, builder, cache, Convergence(cache, metrics), metrics,
                          backoff=Backoff(initial=0.5, cap=1.5), sleep=fake_sleep, rand=lambda: 1.0)
    await publisher.publish_once()  # the empty state, as at start-up
    task = asyncio.create_task(publisher.run())
    try:
        failures_left = 3
        committed = await repo.mutate("shop", lambda s, d, now: _new_service("shop"), create=True)
        # One write only: the publisher must get it out by retrying, not by the next write.
        await asyncio.wait_for(publisher.wait_published(committed.revision), 10)
        assert slept == [0.5, 1.0, 1.5]
        assert all(e is not None and "simulated build failure" in e for e in errors_seen)
        assert publisher.last_error is None and publisher.failures == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kv.close()


def _new_service(name: str) -> Any:
    from controlplane.model import Change, Service

    return Change(Service(name=name), ())


async def test_unpublished_change_answers_503_and_readiness_fails_while_liveness_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_api_module, "PUBLISH_TIMEOUT", 0.5)
    async with admin_api(tmp_path) as api:
        await api.ok("PUT", "/v1/services/shop", {})
        ready = await api.call("GET", "/readyz")
        assert ready.status == 200 and ready.body["status"] == "ready"
        real_build = api.cp.builder.build
        broken = True

        def build(*args: Any, **kwargs: Any) -> Any:
            if broken:
                raise RuntimeError("simulated build failure")
            return real_build(*args, **kwargs)

        monkeypatch.setattr(api.cp.builder, "build", build)
        reply = await api.call("PUT", "/v1/services/shop", {"prefix": "/shop"})
        assert reply.status == 503, reply.text
        assert reply.body["stored"] is True
        assert "not yet pushed to the proxies" in reply.body["error"] and "simulated build failure" in reply.body["error"]
        assert f"stored at revision {reply.body['store_revision']}" in reply.body["error"]

        health = await api.call("GET", "/healthz")
        assert health.status == 200 and health.body == {"status": "ok"}
        ready = await api.call("GET", "/readyz")
        assert ready.status == 503 and "simulated build failure" in ready.body["error"]
        assert ready.body["store_revision"] == reply.body["store_revision"]

        # The change was stored, not lost; once building works again it goes out by itself.
        assert (await api.ok("GET", "/v1/services/shop"))["prefix"] == "/shop"
        broken = False
        await wait_for(lambda: api.cp.publisher.generation >= reply.body["store_revision"], timeout=60,
                       message="publisher recovered without another write")
        ready = await api.call("GET", "/readyz")
        assert ready.status == 200, ready.text


async def test_readiness_names_an_unreachable_store(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as api:
        await api.cp.kv.close()
        ready = await api.call("GET", "/readyz")
        assert ready.status == 503 and "state store unreachable" in ready.body["error"]
        assert (await api.call("GET", "/healthz")).status == 200
