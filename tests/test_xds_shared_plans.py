"""SotW streams in the same state share one push plan per snapshot (SotwStream._shared_plan), and
an ACK shares the sent dict instead of copying it: per change, the planning runs once per state,
not once per stream. What each stream receives must not change: only its nonce is its own."""

from __future__ import annotations

import random

import pytest

from controlplane.typeurls import CLUSTER, ENDPOINT, ROUTE
from controlplane.xds import stream as stream_module
from controlplane.xds.stream import SotwStream
from tests.test_xds_protocol import SotwProxy, connected_proxy, names_of, snapshot


def _count_plans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    planned: list[str] = []
    original = SotwStream._plan

    def counting(self: SotwStream, state: stream_module.TypeState) -> object:
        planned.append(state.type_url)
        return original(self, state)

    monkeypatch.setattr(SotwStream, "_plan", counting)
    return planned


def test_streams_in_the_same_state_share_one_plan_per_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    first = snapshot(1, ["a", "b"])
    proxies = [connected_proxy(first) for _ in range(50)]
    planned = _count_plans(monkeypatch)
    # (As the publisher builds it: the pools that did not change are the previous objects.)
    change = snapshot(2, ["a", "b"], route_tag="-weights-2").with_generation(2, reuse=first)
    responses = [proxy.push(change) for proxy in proxies]
    assert planned == [ROUTE]  # once for 50 streams
    assert all([r.type_url for r in out] == [ROUTE] for out in responses)
    bodies = {out[0].SerializeToString().replace(out[0].nonce.encode(), b"") for out in responses}
    assert len(bodies) == 1
    for proxy in proxies:
        proxy.ack(ROUTE)
        state = proxy.stream.types[ROUTE]
        assert state.acked is state.sent  # no copy per ACK
        assert proxy.stream.converged()
    assert len({id(proxy.stream.types[ROUTE].sent) for proxy in proxies}) == 1


def test_a_stream_in_another_state_is_planned_for_its_own_state() -> None:
    first = snapshot(1, ["a"])
    ready, behind = connected_proxy(first), connected_proxy(first)
    change = snapshot(2, ["a", "b"])
    for proxy in (ready, behind):
        [cds] = proxy.push(change)
        assert names_of(cds) == ["a", "b"]
    ready.ack(CLUSTER)
    ready.subscribe(ENDPOINT, ["a", "b"])
    [rds] = ready.ack(ENDPOINT)
    assert rds.type_url == ROUTE
    # The other stream has not ACKed the new cluster: its route stays held back.
    assert behind.push(change) == []
    assert behind.stream.types[ROUTE].sent["rt"].version == first.of_type(ROUTE)["rt"].version


def test_streams_subscribed_alike_share_one_convergence_check_per_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    first = snapshot(1, ["a", "b"])
    proxies = [connected_proxy(first) for _ in range(20)]
    checked: list[int] = []
    original = SotwStream._needed_names

    def counting(self: SotwStream) -> dict[str, set[str]]:
        checked.append(self.stream_id)
        return original(self)

    monkeypatch.setattr(SotwStream, "_needed_names", counting)
    change = snapshot(2, ["a", "b"], route_tag="-weights-2").with_generation(2, reuse=first)
    for proxy in proxies:
        proxy.push(change)
        assert not proxy.stream.converged()  # (decided by the response in flight)
        proxy.ack(ROUTE)
        assert proxy.stream.converged()
    assert len(checked) == 1
    # Another subscription is checked on its own: one that lacks the endpoints is not converged.
    lacking = connected_proxy(first)
    lacking.subscribe(ENDPOINT, ["a"])
    lacking.push(change)
    lacking.settle()
    assert not lacking.stream.converged()


@pytest.mark.parametrize("seed", range(20))
def test_shared_plans_send_what_per_stream_plans_send(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random histories of several streams on the same snapshots (ACKs, NACKs, late ACKs,
    subscription changes): every response equals, nonce and all, what the same stream is sent
    when every plan is its own, and so does every answer of ``converged()``."""

    def play(shared: bool) -> list[bytes]:
        monkeypatch.setattr(stream_module, "MAX_SHARED_PLANS", 256 if shared else 0)
        rng = random.Random(seed)
        clusters = ["a", "b", "c", "d"]
        snap = snapshot(1, clusters[:2])
        proxies = [connected_proxy(snap) for _ in range(4)]
        sent: list[bytes] = []
        for generation in range(2, 40):
            if rng.random() < 0.3:
                snap = snapshot(generation, sorted(rng.sample(clusters, rng.randint(1, 4))),
                                route_tag=str(rng.randint(0, 2)), cla_tags={"a": str(rng.randint(0, 1))})
            for proxy in proxies:
                sent += [r.SerializeToString() for r in _step(proxy, snap, rng)]
                sent.append(b"converged" if proxy.stream.converged() else b"behind")
        return sent

    assert play(shared=True) == play(shared=False)


def _step(proxy: SotwProxy, snap: object, rng: random.Random) -> list[object]:
    action = rng.random()
    stream = proxy.stream
    if action < 0.3:
        return proxy.push(snap)  # type: ignore[arg-type]
    pending = [t for t in proxy.latest if stream.types[t].pending_nonce == proxy.latest[t].nonce]
    if pending and action < 0.8:
        type_url = rng.choice(pending)
        return proxy.ack(type_url)
    if pending and action < 0.85:
        return proxy.nack(rng.choice(pending), "rejected")
    if action < 0.95:
        return proxy.subscribe(ENDPOINT, sorted(stream.snapshot.of_type(ENDPOINT)))
    return proxy.subscribe(CLUSTER)
