"""The publisher builds and pushes only for writes that change what proxies get (services);
other writes (deployment records, history, the notification outbox) only move the published
revision and the fleets' convergence generation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import typeurls
from controlplane.config import Settings
from controlplane.fleet import Convergence, SnapshotBuilder, fleet_resolver
from controlplane.fleet.publisher import Publisher
from controlplane.metrics import Metrics
from controlplane.model import Change, Service
from controlplane.store.base import Txn
from controlplane.store.repository import Repository
from controlplane.store.sqlite import SQLiteStore, open_sqlite_store
from controlplane.xds.server import SnapshotCache, _StreamSlot
from controlplane.xds.stream import SotwStream

FLEET = "default"


class Setup:
    def __init__(self, kv: SQLiteStore) -> None:
        settings = Settings()
        self.kv = kv
        self.repo = Repository(kv)
        self.builder = SnapshotBuilder(settings.fleets)
        self.builds = 0
        real_build = self.builder.build

        def counting_build(*args: Any, **kwargs: Any) -> Any:
            self.builds += 1
            return real_build(*args, **kwargs)

        self.builder.build = counting_build  # type: ignore[method-assign]
        self.cache = SnapshotCache(fleet_resolver(settings))
        self.metrics = Metrics()
        self.convergence = Convergence(self.cache, self.metrics)
        self.publisher = Publisher(self.repo, self.builder, self.cache, self.convergence, self.metrics)

    def connect_converged_proxy(self) -> SotwStream:
        """A SotW stream that subscribed to everything and ACKed it, as Envoy does."""
        stream = SotwStream(1, "edge-1", FLEET, self.cache.get(FLEET), 0.0)
        self.convergence.stream_opened(stream)
        for type_url in typeurls.PUSH_ORDER:
            names = sorted(self.cache.get(FLEET).of_type(type_url)) if type_url not in typeurls.WILDCARD_TYPES else []
            out = stream.on_request(discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names), 0.0)
            while out:
                response = out.pop(0)
                out += stream.on_request(discovery_pb2.DiscoveryRequest(
                    type_url=response.type_url, version_info=response.version, response_nonce=response.nonce,
                    resource_names=sorted(stream.types[response.type_url].names)), 0.0)
        self.convergence.stream_changed(stream)
        assert self.convergence.status(FLEET)["acked"] == 1
        return stream


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    kv = await open_sqlite_store(tmp_path / "state.db")
    try:
        yield Setup(kv)
    finally:
        await kv.close()


async def _put_service(setup: Setup, name: str) -> int:
    committed = await setup.repo.mutate(name, lambda s, d, now: Change(Service(name=name), ()), create=True)
    return committed.revision


async def test_a_write_outside_services_is_published_without_a_build_or_a_push(setup: Setup) -> None:
    await _put_service(setup, "shop")
    await setup.publisher.publish_once()
    stream = setup.connect_converged_proxy()
    snapshot = setup.cache.get(FLEET)
    slot = _StreamSlot(stream.stream_id)
    setup.cache._watch(FLEET, slot)
    builds = setup.builds

    revision = await setup.kv.commit(Txn().put("deployments/shop/d-1", {"history": []}))
    assert await setup.publisher.publish_once() == revision

    assert setup.builds == builds
    assert setup.cache.get(FLEET) is snapshot and not slot.dirty  # no stream is handed anything
    assert setup.publisher.generation == revision
    await asyncio.wait_for(setup.publisher.wait_published(revision), 5)
    status = setup.convergence.status(FLEET)
    assert status["generation"] == revision and status["converged"] and status["acked"] == 1
    result = await asyncio.wait_for(setup.convergence.wait((FLEET,), revision, 0.0), 5)
    assert result.skipped == ()


async def test_a_service_write_after_one_outside_services_is_built_and_pushed(setup: Setup) -> None:
    await _put_service(setup, "shop")
    await setup.publisher.publish_once()
    setup.connect_converged_proxy()
    await setup.kv.commit(Txn().put("notifications/outbox/x", {"attempts": 0}))
    await setup.publisher.publish_once()
    builds = setup.builds

    revision = await _put_service(setup, "cart")
    await setup.publisher.publish_once()

    assert setup.builds == builds + 1
    assert setup.cache.get(FLEET).generation == revision
    status = setup.convergence.status(FLEET)
    assert status["generation"] == revision and status["acked"] == 0 and not status["converged"]
