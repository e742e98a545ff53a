"""xDS worker processes (``serve --xds-workers 2``) with real Envoys, real upstreams, under load.

1. Four Envoys (one fleet each) spread over two workers on one port: ``/v1/proxies`` names the
   worker of each; a weight change with ``?wait=converged`` returns once all four hold it (the
   next requests through every Envoy obey it); one worker SIGKILLed under load: zero failed
   requests, it is restarted, its Envoys reconnect and converge on the next change; the stream
   metrics add up over workers; SIGKILL of the main process leaves no worker behind.
2. The deployment analysis reads what Envoys connected to the workers report (metrics service
   on the same port).
3. Under mTLS, a node id belongs to one certificate across workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.typeurls import CLUSTER

from controlplane.bootstrap import render_bootstrap
from tests.harness import ControlPlane, Envoy, free_port, run_control_plane, run_envoy, run_upstream, sample_environments, wait_for
from tests.test_envoy import Api
from tests.test_ha import write_fleets
from tests.test_workflow import steady_load

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(400)]

FLEETS = ("a", "b", "c", "d")
WORKERS = ("--xds-workers", "2")


class Fleet:
    """One Envoy per fleet, each restartable on its own (a new xDS connection)."""

    def __init__(self, cp: ControlPlane, tmp_path: Path) -> None:
        self.cp = cp
        self.tmp_path = tmp_path
        self.stacks: dict[str, contextlib.AsyncExitStack] = {}
        self.envoys: dict[str, Envoy] = {}
        self.admin_ports = {f: free_port() for f in FLEETS}

    async def start(self, fleet: str) -> None:
        stack = contextlib.AsyncExitStack()
        port = self.admin_ports[fleet]
        text = render_bootstrap(node_id=f"edge-{fleet}", fleet=fleet, xds=self.cp.xds_address, admin_port=port)
        self.envoys[fleet] = await stack.enter_async_context(run_envoy(text, admin_port=port, log_dir=self.tmp_path))
        self.stacks[fleet] = stack
        await self.envoys[fleet].wait_ready()

    async def restart(self, fleet: str) -> None:
        await self.stacks.pop(fleet).aclose()
        await self.start(fleet)

    async def close(self) -> None:
        for stack in self.stacks.values():
            await stack.aclose()


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, *, fleets: tuple[str, ...] = FLEETS) -> AsyncIterator[tuple[ControlPlane, Api, Fleet, dict[str, str], Any]]:
    ports = {f: (free_port(), free_port()) for f in fleets}
    config = write_fleets(tmp_path / "config.yaml", ports)
    async with run_upstream("blue", "v1") as blue, run_upstream("green", "v2") as green, \
            run_control_plane(state_path=tmp_path / "state.db", config_path=config, extra_args=WORKERS, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session:
        api = Api(session, cp.admin_url)
        await api.call("PUT", "/v1/services/shop", {"drain_seconds": 1, "standby_seconds": 300})
        await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
        envoys = Fleet(cp, tmp_path)
        try:
            for fleet in fleets:
                await envoys.start(fleet)
            await spread(api, envoys, fleets)
            yield cp, api, envoys, {f: f"http://127.0.0.1:{ports[f][0]}/" for f in fleets}, green
        finally:
            await envoys.close()


async def placement(api: Api, count: int) -> dict[str, int] | None:
    """node id -> worker index, once ``count`` proxies are listed."""
    proxies = await api.proxies()
    placed = {p["node_id"]: p["worker"] for p in proxies}
    return placed if len(placed) == count == len(proxies) else None


async def spread(api: Api, envoys: Fleet, fleets: tuple[str, ...]) -> dict[str, int]:
    """Wait until every Envoy is listed; if the kernel's SO_REUSEPORT hashing put them all on
    one worker, reconnect Envoys (a new connection is hashed anew) until two workers serve."""
    for _ in range(12):
        placed = await wait_for(lambda: placement(api, len(fleets)), timeout=60, message="every Envoy listed")
        if len(set(placed.values())) > 1:
            return placed
        await envoys.restart(fleets[0])
    raise AssertionError(f"the Envoys never spread over two workers: {placed}")


async def workers(cp: ControlPlane, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with session.get(cp.admin_url + "/v1/cluster", headers=cp.headers) as response:
        view = await response.json()
    [replica] = view["replicas"]
    return replica["workers"]  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_workers_serve_the_fleet_converge_survive_a_worker_sigkill_and_die_with_main(tmp_path: Path) -> None:
    async with stack(tmp_path) as (cp, api, envoys, urls, green), aiohttp.ClientSession() as session:
        await api.call("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": [green.address]})
        # ?wait=converged waits for the proxies of every worker: the next requests obey it.
        view = await api.call("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 0, "green": 100}},
                              wait="converged", timeout="60")
        assert view["convergence"]["converged"] and view["convergence"]["proxies"] == 4, view["convergence"]
        assert view["convergence"]["acked"] == 4, view["convergence"]
        for url in urls.values():
            assert await sample_environments(url, 10) == {"green": 10}

        before = await workers(cp, session)
        assert [w["ready"] for w in before] == [True, True], before
        placed = await wait_for(lambda: placement(api, 4), timeout=30, message="every Envoy listed")
        victim_index = max((0, 1), key=lambda i: list(placed.values()).count(i))
        victim = before[victim_index]
        moved = sorted(node for node, w in placed.items() if w == victim_index)

        async with contextlib.AsyncExitStack() as loads:
            load = [await loads.enter_async_context(steady_load(url)) for url in urls.values()]
            await wait_for(lambda: all(x.total > 20 for x in load), timeout=30, message="load flowing")
            os.kill(victim["pid"], signal.SIGKILL)

            async def restarted() -> bool:
                now = (await workers(cp, session))[victim_index]
                return now["ready"] and now["pid"] != victim["pid"] and now["restarts"] == 1

            await wait_for(restarted, timeout=60, message=f"worker {victim_index} restarted")
            # Its Envoys reconnected (to either worker) and every proxy is listed again.
            await wait_for(lambda: placement(api, 4), timeout=60, message=f"{moved} reconnected")
            view = await api.call("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100, "green": 0}},
                                  wait="converged", timeout="60")
            assert view["convergence"]["converged"] and view["convergence"]["acked"] == 4, view["convergence"]
            before_stop = [x.total for x in load]
            await wait_for(lambda: all(x.total > t + 20 for x, t in zip(load, before_stop)), timeout=30,
                           message="load flowing after the restart")
        for x in load:
            assert set(x.statuses) == {200}, (dict(x.statuses), x.errors[:5])
        for url in urls.values():
            assert await sample_environments(url, 10) == {"blue": 10}

        # A write that changes no snapshot (pausing a deployment writes its record only) moves
        # every worker's convergence too: ?wait=converged for that revision answers.
        created = await api.call("POST", "/v1/services/shop/deployments", {
            "version": "v3", "endpoints": [green.address], "strategy": {"steps": [50, 100], "step_seconds": 3600}}, expect=202)

        async def shifting() -> bool:
            return (await api.call("GET", f"/v1/deployments/{created['id']}"))["status"] == "shifting"

        await wait_for(shifting, timeout=60, message="deployment shifting")
        await api.call("POST", f"/v1/deployments/{created['id']}/pause")
        view = await api.call("GET", "/v1/services/shop", wait="converged", timeout="30")
        assert view["convergence"]["converged"] and view["convergence"]["acked"] == 4, view["convergence"]

        # Metrics add up over workers: one connected proxy per fleet, one restart.
        async with session.get(cp.admin_url + "/metrics", headers=cp.headers) as response:
            metrics = await response.text()
        for fleet in FLEETS:
            assert f'bluegreen_xds_connected_proxies{{fleet="{fleet}"}} 1.0' in metrics, metrics
        assert "bluegreen_xds_worker_restarts_total 1.0" in metrics
        assert "bluegreen_xds_workers_ready 2.0" in metrics

        # The main process dies (SIGKILL, no clean-up of its own): no worker outlives it.
        pids = [w["pid"] for w in await workers(cp, session)]
        assert all(alive(pid) for pid in pids)
        cp.process.kill(signal.SIGKILL)
        await cp.process.wait()
        await wait_for(lambda: not any(alive(pid) for pid in pids), timeout=30, message=f"workers {pids} gone")


async def test_analysis_reads_reports_from_envoys_on_the_workers(tmp_path: Path) -> None:
    async with stack(tmp_path, fleets=("a", "b", "c")) as (cp, api, envoys, urls, green):
        async with contextlib.AsyncExitStack() as loads:
            load = [await loads.enter_async_context(steady_load(url)) for url in urls.values()]
            created = await api.call("POST", "/v1/services/shop/deployments", {
                "version": "v2", "endpoints": [green.address],
                "strategy": {"steps": [50, 100], "step_seconds": 600, "bake_seconds": 600},
                "analysis": {"interval_seconds": 1, "max_error_rate": 0.05, "max_p99_ms": None, "min_requests": 5,
                             "failure_limit": 1},
            }, expect=202)

            async def judged() -> dict[str, Any] | None:
                d = await api.call("GET", f"/v1/deployments/{created['id']}")
                a = d["analysis"] or {}
                return d if a.get("verdict") == "ok" and a.get("requests", 0) >= 5 else None

            d = await wait_for(judged, timeout=90, message="an analysis interval judged on the workers' reports")
            assert d["status"] == "shifting" and d["failures"] == 0, d
        for x in load:
            assert set(x.statuses) == {200}, (dict(x.statuses), x.errors[:5])


async def test_under_mtls_a_node_id_belongs_to_one_certificate_across_workers(tmp_path: Path) -> None:
    """The node-id ownership check (test_telemetry_security) holds when the owner's stream and
    the impostor's land on different workers: several impostor connections, each hashed anew by
    the kernel, are all refused (with one worker not knowing the other's streams, about half
    would be admitted). Telemetry for the node from the owner's certificate is believed on any
    worker."""
    from controlplane.app import ControlPlane as InProcess
    from controlplane.config import load_settings
    from controlplane.store.sqlite import open_sqlite_store
    from controlplane.bootstrap import XDS_CLUSTER
    from tests.test_telemetry_security import credentials, make_pki, report
    from tests.test_xds_tls import tls_config

    pki = make_pki(tmp_path / "pki")
    other_edge = pki.ca.client("edge-2", "spiffe://example.org/edge/envoy-2")
    cp = InProcess(load_settings(tls_config(tmp_path / "config.yaml", pki)), await open_sqlite_store(tmp_path / "state.db"),
                   workers=2)
    await cp.start("127.0.0.1:0")
    assert cp.workers is not None
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", credentials(pki, pki.edge)) as owner_channel:
            held = asyncio.Event()

            async def owner_requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                yield discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="edge-1", cluster="edge"))
                await held.wait()

            owner = ads_pb2_grpc.AggregatedDiscoveryServiceStub(owner_channel).StreamAggregatedResources(owner_requests())
            await asyncio.wait_for(owner.read(), 30)
            await wait_for(lambda: "edge-1" in cp.workers._nodes, timeout=30, message="edge-1's holder relayed")
            # Frames on a pipe are ordered: once every worker has answered this, each has the holder.
            assert len(await cp.workers.rows()) == 1
            attempts = 8
            for _ in range(attempts):
                async with grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", credentials(pki, other_edge),
                                                   options=[("grpc.use_local_subchannel_pool", 1)]) as other_channel:
                    impostor = ads_pb2_grpc.AggregatedDiscoveryServiceStub(other_channel).StreamAggregatedResources(
                        iter([discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="edge-1", cluster="edge"))]))
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await asyncio.wait_for(impostor.read(), 30)
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
            # The owner's telemetry, on connections hashed to either worker, is believed on each.
            # The kernel picks the worker per connection: report until both have one (8 tries
            # all landing on one worker happened about once in 128 runs).
            reported: set[Any] = set()
            for _ in range(64):
                async with grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", credentials(pki, pki.edge),
                                                   options=[("grpc.use_local_subchannel_pool", 1)]) as report_channel:
                    await report(report_channel, "edge-1", {XDS_CLUSTER: {"completed": 5}})
                await cp.workers.refresh_stats()
                reported = {key for key in cp.workers.remote_totals().get(XDS_CLUSTER, {})}
                if len(reported) == 2:
                    break
            sample = cp.metrics.registry.get_sample_value
            assert sample("bluegreen_xds_streams_refused_total", {"reason": "node_id_in_use"}) == attempts
            assert not sample("bluegreen_telemetry_dropped_total", {"reason": "node_mismatch"})
            assert len(reported) == 2, f"reports believed on both workers: {reported}"
            held.set()
            owner.cancel()
    finally:
        await cp.stop()


async def test_a_stopped_control_plane_stops_its_workers(tmp_path: Path) -> None:
    """SIGTERM (how the harness, systemd and `docker stop` end it): the main process stops its
    workers and exits 0; none is left."""
    async with run_control_plane(state_path=tmp_path / "state.db", extra_args=WORKERS, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session:
        pids = [w["pid"] for w in await workers(cp, session)]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        assert await cp.process.stop() == 0
        await wait_for(lambda: not any(alive(pid) for pid in pids), timeout=30, message=f"workers {pids} gone")
        assert "restarting it" not in cp.log_text(), "a worker stopped on purpose is not restarted"


async def test_a_worker_that_stops_reading_is_restarted(tmp_path: Path) -> None:
    """A hung worker (SIGSTOP) does not make the main process buffer snapshots without bound:
    past the backlog limit it is killed and restarted with the current snapshots."""
    from controlplane.app import ControlPlane as InProcess
    from controlplane.config import Settings
    from controlplane.store.sqlite import open_sqlite_store

    cp = InProcess(Settings(), await open_sqlite_store(tmp_path / "state.db"), workers=2)
    await cp.start("127.0.0.1:0")
    assert cp.workers is not None
    cp.workers.max_backlog = 64 * 1024
    try:
        [hung, _] = cp.workers.workers()
        os.kill(hung["pid"], signal.SIGSTOP)
        await cp.operations.put_service("shop", {})
        endpoints = [f"10.0.{i // 250}.{i % 250 + 1}:8080" for i in range(500)]  # a few KB per change
        for k in range(2000):
            if cp.workers.workers()[0]["pid"] != hung["pid"]:
                break
            committed = await cp.operations.put_environment("shop", "green", {"version": f"v{k}", "endpoints": endpoints[k % 2:]})
            await cp.publisher.wait_published(committed.revision)
        await wait_for(lambda: cp.workers.workers()[0]["ready"] and cp.workers.workers()[0]["restarts"] == 1,
                       timeout=60, message="the hung worker killed and restarted")
        assert not alive(hung["pid"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung["pid"], signal.SIGCONT)
        await cp.stop()


async def test_a_release_under_workers_asks_them_for_the_decommission_guard_and_shifts(tmp_path: Path) -> None:
    """A release checks that no proxy still routes to each member's idle environment, which with
    workers is asked of every worker (awaited): the release starts and reaches shifting. (The
    guard's coroutine was once taken for a non-empty list: every release was refused.)"""
    async with run_control_plane(state_path=tmp_path / "state.db", extra_args=WORKERS, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session:
        async def call(method: str, path: str, body: Any = None, expect: int = 200) -> Any:
            async with session.request(method, cp.admin_url + path, json=body, headers=cp.headers) as response:
                data = await response.json()
                assert response.status == expect, (method, path, response.status, data)
                return data

        assert len(await workers(cp, session)) == 2
        for name, port in (("web", 9001), ("api", 9002)):
            await call("PUT", f"/v1/services/{name}", {"domains": [f"{name}.example"]})
            await call("PUT", f"/v1/services/{name}/environments/blue", {"version": "v1", "endpoints": [f"127.0.0.1:{port}"]})
        created = await call("POST", "/v1/releases", {
            "services": {"web": {"version": "v2", "endpoints": ["127.0.0.1:9101"]},
                         "api": {"version": "v2", "endpoints": ["127.0.0.1:9102"]}},
            "strategy": {"steps": [50, 100], "step_seconds": 3600}}, expect=202)

        async def shifting() -> bool:
            return (await call("GET", f"/v1/releases/{created['id']}"))["phase"] == "shifting"
        await wait_for(shifting, timeout=60, message="release shifting")
