"""Self-tests for tests/harness.py, with real processes (demo app and Envoy)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.harness import (
    GiveUp,
    ManagedProcess,
    binomial_band,
    free_port,
    run_envoy,
    run_upstream,
    sample_environments,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- pure helpers


def test_binomial_band_matches_known_values() -> None:
    # The normal approximation says ~(69, 131); the exact band is shifted by the right skew.
    assert binomial_band(1000, 0.1) == (70, 132)
    assert binomial_band(10, 0.0) == (0, 0)
    assert binomial_band(10, 1.0) == (10, 10)
    assert binomial_band(0, 0.3) == (0, 0)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 20000])
def test_binomial_band_symmetric_and_covering(n: int) -> None:
    lo, hi = binomial_band(n, 0.5)
    assert lo + hi == n
    assert 0 <= lo <= n / 2 <= hi <= n
    # p and 1-p mirror each other.
    lo3, hi3 = binomial_band(n, 0.3)
    lo7, hi7 = binomial_band(n, 0.7)
    assert (lo3, hi3) == (n - hi7, n - lo7)


@pytest.mark.parametrize(("n", "p", "confidence"), [(40, 0.1, 0.999), (60, 0.37, 0.99), (25, 0.5, 0.95), (80, 0.02, 0.999)])
def test_binomial_band_against_exact_fractions(n: int, p: float, confidence: float) -> None:
    from fractions import Fraction
    from math import comb

    fp, half_alpha = Fraction(p), (1 - Fraction(confidence)) / 2
    pmf = [comb(n, k) * fp**k * (1 - fp) ** (n - k) for k in range(n + 1)]
    lo, hi = binomial_band(n, p, confidence)
    # Each tail outside the band is within alpha/2, and the band cannot shrink on either side.
    assert sum(pmf[:lo]) <= half_alpha < sum(pmf[: lo + 1])
    assert sum(pmf[hi + 1 :]) <= half_alpha < sum(pmf[hi:])


def test_binomial_band_widens_with_confidence() -> None:
    narrow = binomial_band(500, 0.2, confidence=0.9)
    wide = binomial_band(500, 0.2, confidence=0.99999)
    assert wide[0] <= narrow[0] <= 100 <= narrow[1] <= wide[1]
    with pytest.raises(ValueError):
        binomial_band(10, 1.5)


async def test_wait_for_returns_value_and_reports_timeouts() -> None:
    calls = 0

    async def eventually() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("not yet")
        return calls

    assert await wait_for(eventually, timeout=5, interval=0.01) == 3
    with pytest.raises(AssertionError, match=r"never true \(waited 0\.1s; last value 0\)"):
        await wait_for(lambda: 0, timeout=0.1, message="never true")
    with pytest.raises(AssertionError, match="boom"):
        await wait_for(lambda: (_ for _ in ()).throw(ValueError("boom")), timeout=0.1)

    def give_up() -> bool:
        raise GiveUp("process died")

    with pytest.raises(AssertionError, match="gave up: process died"):
        await wait_for(give_up, timeout=30)  # must not take 30 s


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# ---------------------------------------------------------------- processes


async def test_managed_process_sigkill_and_log(tmp_path: Path) -> None:
    proc = await ManagedProcess.start(
        [sys.executable, "-u", "-c", "import time; print('hello', flush=True); time.sleep(60)"],
        name="sleeper",
        log_dir=tmp_path,
    )
    try:
        await proc.expect_log("hello", timeout=10)
        proc.kill(signal.SIGKILL)
        assert await proc.wait(timeout=10) == -signal.SIGKILL
        assert proc.log_text().strip() == "hello"
    finally:
        await proc.stop()


async def test_upstream_answers_with_environment_header() -> None:
    async with run_upstream("blue", "v1") as up:
        assert up.address == f"127.0.0.1:{up.port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{up.url}/some/path?q=1") as resp:
                assert resp.status == 200
                assert resp.headers["x-bluegreen-environment"] == "blue"
                assert resp.headers["x-bluegreen-version"] == "v1"
                assert await resp.json() == {"environment": "blue", "version": "v1", "method": "POST", "path": "/some/path"}
            async with session.get(f"{up.url}/healthz") as resp:
                assert (resp.status, await resp.text()) == (200, "ok")
        counts = await sample_environments(f"{up.url}/", 50)
        assert counts == {"blue": 50}
    assert up.process.returncode == 0  # stopped gracefully by the context manager


async def test_error_rate_one_gives_500s_but_healthz_stays_ok() -> None:
    async with run_upstream("green", "v2", error_rate=1.0) as up:
        counts = await sample_environments(f"{up.url}/x", 40, concurrency=4)
        assert counts == {("status", 500): 40}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{up.url}/x") as resp:
                assert resp.status == 500
                assert resp.headers["x-bluegreen-environment"] == "green"


async def test_sample_environments_counts_connection_errors() -> None:
    counts = await sample_environments(f"http://127.0.0.1:{free_port()}/", 5, request_timeout=2)
    assert counts == {"error": 5}


async def test_sample_environments_does_not_hide_dropped_connections() -> None:
    """aiohttp would re-send a GET whose connection was dropped; the sampler must count it."""
    drop_next = True

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal drop_next
        await reader.readuntil(b"\r\n\r\n")
        if drop_next:  # close without answering
            drop_next = False
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nx-bluegreen-environment: blue\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    async with server:
        assert await sample_environments(url, 1) == {"error": 1}
        drop_next = True
        assert await sample_environments(url, 1, client_retries=True) == {"blue": 1}
        assert not drop_next


async def test_upstream_that_dies_at_startup_fails_fast() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AssertionError, match="exited with code 2"):
        async with run_upstream("blue", "v1", error_rate=2.0):  # rejected by the argument parser
            pass
    assert loop.time() - started < 10


async def test_slow_request_in_flight_completes_on_sigterm() -> None:
    async with run_upstream("blue", "v1") as up:
        async with aiohttp.ClientSession() as session:

            async def slow() -> tuple[int, str]:
                async with session.get(f"{up.url}/slow?seconds=1") as resp:
                    return resp.status, resp.headers["x-bluegreen-environment"]

            request = asyncio.create_task(slow())
            await up.process.expect_log("slow request started", timeout=10)
            up.process.kill(signal.SIGTERM)
            # New connections are refused while the in-flight request is still being served.
            await wait_for(lambda: _refused(up.port), timeout=5, message="listener still open after SIGTERM")
            assert not request.done()
            assert await asyncio.wait_for(request, 10) == (200, "blue")
        assert await up.process.wait(timeout=10) == 0


async def test_shutdown_timeout_bounds_exit() -> None:
    async with run_upstream("blue", "v1", shutdown_timeout=0.5) as up:
        request = asyncio.create_task(sample_environments(f"{up.url}/slow?seconds=30", 1))
        await up.process.expect_log("slow request started", timeout=10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        up.process.kill(signal.SIGTERM)
        assert await up.process.wait(timeout=10) == 0
        assert loop.time() - started < 3
        assert await request == {"error": 1}


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# ---------------------------------------------------------------- envoy

STATIC_BOOTSTRAP = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: demo}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: demo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: demo
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}
"""


@pytest.mark.envoy
async def test_envoy_routes_to_upstream_and_reports_stats() -> None:
    admin_port, listener_port = free_port(), free_port()
    async with run_upstream("green", "v7") as up:
        bootstrap = STATIC_BOOTSTRAP.format(admin_port=admin_port, listener_port=listener_port, upstream_port=up.port)
        async with run_envoy(bootstrap, admin_port=admin_port) as envoy:
            await envoy.wait_ready()
            counts = await sample_environments(f"http://127.0.0.1:{listener_port}/hello", 30)
            assert counts == {"green": 30}

            stats = await envoy.stats()
            assert stats["cluster.demo.upstream_rq_total"] == 30
            assert stats["http.ingress.downstream_rq_2xx"] == 30
            dump = await envoy.config_dump()
            assert any("bootstrap" in c["@type"].lower() for c in dump["configs"])
            assert "starting main dispatch loop" in envoy.log_text()
        assert envoy.process.returncode is not None
