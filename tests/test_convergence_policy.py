"""The convergence policy, pure: real snapshots and stream state machines, an injected clock, no
network. Which proxies a gate waits for (healthy ones), which it reports and skips (lagging,
rejecting), and which proxies still route to an environment (the decommission guard)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.fleet import Convergence, SnapshotBuilder
from controlplane.fleet.convergence import ProxyState
from controlplane.metrics import Metrics
from controlplane.model import DEFAULT_FLEET, Endpoint, Environment, EnvironmentState, Service, Traffic
from controlplane.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.xds.server import SnapshotCache
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.stream import SotwStream
from tests.test_xds_protocol import SotwProxy

FLEET = DEFAULT_FLEET.name
GRACE = 10.0

BLUE = EnvironmentState("v1", (Endpoint("127.0.0.1", 9001),))
GREEN = EnvironmentState("v2", (Endpoint("127.0.0.1", 9002),))
ON_BLUE = Service("shop", blue=BLUE, green=GREEN, traffic=Traffic(active=Environment.BLUE, blue=100, green=0))
ON_GREEN = Service("shop", blue=BLUE, green=GREEN,
                   traffic=Traffic(active=Environment.GREEN, previous=Environment.BLUE, blue=0, green=100))


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """One fleet's publisher, snapshot cache and convergence tracker, driven by hand."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.cache = SnapshotCache(lambda node: FLEET)
        self.convergence = Convergence(self.cache, self.metrics, self.clock, lagging_after=GRACE, timers=False)
        self.builder = SnapshotBuilder((DEFAULT_FLEET,))
        self.generation = 0
        self.proxies: list[SotwProxy] = []

    def publish(self, *services: Service) -> Snapshot:
        self.generation += 1
        snapshot = self.builder.build(self.generation, services, {FLEET: self.cache.get(FLEET)})[FLEET]
        self.cache.set(FLEET, snapshot)
        self.convergence.published(FLEET, snapshot, True, self.clock())
        return snapshot

    def connect(self, node_id: str) -> SotwProxy:
        snapshot = self.cache.get(FLEET)
        stream = SotwStream(len(self.proxies) + 1, node_id, FLEET, snapshot, self.clock())
        self.convergence.stream_opened(stream)
        proxy = SotwProxy(stream)
        self.proxies.append(proxy)
        for type_url, names in ((CLUSTER, []), (ENDPOINT, sorted(snapshot.of_type(ENDPOINT))), (LISTENER, []),
                                (ROUTE, sorted(snapshot.of_type(ROUTE)))):
            proxy.subscribe(type_url, names)
            proxy.ack(type_url)
        self.changed(proxy)
        assert self.convergence.state(proxy.stream) is ProxyState.CONVERGED
        return proxy

    def changed(self, proxy: SotwProxy) -> None:
        self.convergence.stream_changed(proxy.stream)

    def deliver(self, proxy: SotwProxy) -> None:
        """The server hands the proxy the fleet's newest snapshot (it has not answered yet)."""
        proxy.push(self.cache.get(FLEET))
        self.changed(proxy)

    def follow(self, proxy: SotwProxy, *, reject: str | None = None) -> None:
        """Deliver the newest snapshot and ACK everything, as Envoy would; with ``reject`` set,
        NACK every response of that type instead."""
        self.deliver(proxy)
        for _ in range(20):
            progressed = False
            for type_url, response in list(proxy.latest.items()):
                if proxy.stream.types[type_url].pending_nonce == response.nonce:
                    if type_url == reject:
                        proxy.nack(type_url, "rejected by test")
                    else:
                        proxy.ack(type_url)
                    progressed = True
            self.changed(proxy)
            if not progressed:
                return
        raise AssertionError("did not settle")

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.convergence.tick()

    def wait(self, *, require_all: bool = False) -> asyncio.Future:  # type: ignore[type-arg]
        return self.convergence.wait((FLEET,), self.generation, self.clock(), require_all=require_all)

    def gauge(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"fleet": FLEET})
        assert value is not None
        return value


@pytest.fixture
def fleet() -> Fleet:
    f = Fleet()
    f.publish(ON_BLUE)
    return f


async def test_a_proxy_that_never_acks_holds_a_gate_only_for_the_grace_period(fleet: Fleet) -> None:
    healthy, stuck = fleet.connect("edge-1"), fleet.connect("stuck")
    fleet.publish(ON_GREEN)
    waiter = fleet.wait()
    fleet.follow(healthy)
    fleet.deliver(stuck)  # sent, never answered
    fleet.advance(GRACE - 1)
    assert not waiter.done(), "a proxy within its grace period is waited for"
    assert fleet.convergence.state(stuck.stream) is ProxyState.PENDING
    fleet.advance(2)
    result = waiter.result()
    assert result.lagging == ("stuck",) and result.rejecting == ()
    assert fleet.convergence.state(stuck.stream) is ProxyState.LAGGING
    assert fleet.gauge("bluegreen_xds_lagging_proxies") == 1
    status = fleet.convergence.status(FLEET)
    assert status["lagging"] == ["stuck"] and status["converged"] and status["acked"] == 1


async def test_with_require_all_the_gate_waits_for_a_lagging_proxy(fleet: Fleet) -> None:
    healthy, stuck = fleet.connect("edge-1"), fleet.connect("stuck")
    fleet.publish(ON_GREEN)
    waiter = fleet.wait(require_all=True)
    fleet.follow(healthy)
    fleet.advance(GRACE * 10)
    assert not waiter.done()
    assert not fleet.convergence.status(FLEET, require_all=True)["converged"]
    fleet.follow(stuck)
    assert waiter.result().lagging == ()
    assert fleet.gauge("bluegreen_xds_lagging_proxies") == 0


async def test_a_fresh_change_waits_for_a_slow_healthy_proxy(fleet: Fleet) -> None:
    fast, slow = fleet.connect("edge-1"), fleet.connect("edge-2")
    fleet.publish(ON_GREEN)
    waiter = fleet.wait()
    fleet.follow(fast)
    fleet.deliver(slow)
    fleet.advance(GRACE / 2)
    assert not waiter.done()
    fleet.follow(slow)
    assert waiter.result().skipped == ()


async def test_a_proxy_that_keeps_applying_back_to_back_changes_is_not_lagging(fleet: Fleet) -> None:
    """Changes faster than a proxy answers: it is never converged at any one moment, but it
    keeps applying, so it is slow, not stuck. Lagging counts from its last progress."""
    busy = fleet.connect("edge-1")
    fleet.publish(ON_GREEN)
    fleet.deliver(busy)
    for i in range(6):  # 3.6 grace periods in all
        fleet.advance(GRACE * 0.6)
        fleet.publish(ON_BLUE if i % 2 == 0 else ON_GREEN)  # the next change lands first...
        for type_url, response in list(busy.latest.items()):  # ...then the proxy applies the older one
            if busy.stream.types[type_url].pending_nonce == response.nonce:
                busy.ack(type_url)
        fleet.changed(busy)
        fleet.deliver(busy)
        assert fleet.convergence.state(busy.stream) is ProxyState.PENDING, i
    assert fleet.gauge("bluegreen_xds_lagging_proxies") == 0
    fleet.advance(GRACE + 1)  # and once it stops answering, it is lagging
    assert fleet.convergence.state(busy.stream) is ProxyState.LAGGING
    assert fleet.gauge("bluegreen_xds_lagging_proxies") == 1


async def test_a_rejecting_proxy_does_not_hold_the_gate(fleet: Fleet) -> None:
    healthy, rejecting = fleet.connect("edge-1"), fleet.connect("edge-2")
    fleet.publish(ON_GREEN)
    waiter = fleet.wait()
    fleet.follow(healthy)
    fleet.follow(rejecting, reject=ROUTE)
    result = waiter.result()  # no clock movement needed: a NACK is an answer
    assert result.rejecting == ("edge-2",) and result.lagging == ()
    assert fleet.convergence.state(rejecting.stream) is ProxyState.REJECTING
    assert fleet.convergence.status(FLEET)["rejecting"] == ["edge-2"]


async def test_a_lagging_proxy_does_not_hold_the_next_change_but_a_healthy_one_does(fleet: Fleet) -> None:
    healthy, stuck = fleet.connect("edge-1"), fleet.connect("stuck")
    fleet.publish(ON_GREEN)
    fleet.follow(healthy)
    fleet.advance(GRACE + 1)
    assert fleet.convergence.state(stuck.stream) is ProxyState.LAGGING
    fleet.publish(ON_BLUE)
    waiter = fleet.wait()
    fleet.convergence.tick()
    assert not waiter.done(), "the healthy proxy has not taken the new change yet"
    fleet.follow(healthy)
    assert waiter.result().lagging == ("stuck",)
    # Once the lagging proxy catches up it is healthy again, and waited for.
    fleet.follow(stuck)
    assert fleet.convergence.state(stuck.stream) is ProxyState.CONVERGED
    fleet.publish(ON_GREEN)
    again = fleet.wait()
    fleet.follow(healthy)
    fleet.convergence.tick()
    assert not again.done()
    fleet.follow(stuck)
    assert again.result().skipped == ()


async def test_a_waiter_that_times_out_is_dropped_at_once(fleet: Fleet) -> None:
    fleet.connect("stuck")
    fleet.publish(ON_GREEN)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(fleet.wait(require_all=True), 0.01)
    assert fleet.convergence.waiting == 0


async def test_proxies_still_routing_to_an_environment(fleet: Fleet) -> None:
    moved, rejecting = fleet.connect("edge-1"), fleet.connect("edge-2")
    assert fleet.convergence.routing_to((FLEET,), "shop-blue") == ("edge-1", "edge-2")
    assert fleet.convergence.routing_to((FLEET,), "shop-green") == ()
    fleet.publish(ON_GREEN)
    fleet.follow(moved)
    fleet.follow(rejecting, reject=ROUTE)
    # edge-1 holds the cutover route (blue at weight 0, green as preview target does not count);
    # edge-2 NACKed it and keeps sending production traffic to blue.
    assert fleet.convergence.routing_to((FLEET,), "shop-blue") == ("edge-2",)
    assert fleet.convergence.routing_to((FLEET,), "shop-green") == ("edge-1",)
    assert fleet.convergence.routing_to(("other",), "shop-blue") == ()


def test_cli_status_names_lagging_and_rejecting_proxies() -> None:
    from controlplane.cli import _convergence_line

    view = {"convergence": {"acked": 1, "proxies": 3, "lagging": ["stuck"], "rejecting": ["edge-2"]}}
    assert _convergence_line(view) == "1/3 proxies on the current config; lagging: stuck; rejecting: edge-2"
