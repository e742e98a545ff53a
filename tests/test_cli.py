"""The `bluegreen` command line, as a user runs it: real subprocesses, real Envoy."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, ManagedProcess, envoy_binary, free_port, sample_environments, settle_on, wait_for


PYTHON_ENV = {"PYTHONPATH": str(REPO_ROOT)}


def bluegreen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
    return subprocess.run([sys.executable, "-m", "controlplane", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**env, **PYTHON_ENV})


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_bootstrap_is_accepted_by_envoy(tmp_path: Path, delta: bool) -> None:
    out = tmp_path / "bootstrap.yaml"
    args = ["envoy-bootstrap", "--node-id", "edge-1", "--fleet", "edge", "--xds", "127.0.0.1:18000", "--admin-port", "9911", "-o", str(out)]
    result = bluegreen(*(args + ["--delta"] if delta else args))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert ("DELTA_GRPC" in text) == delta
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "OK" in check.stdout + check.stderr, check.stdout + check.stderr


def test_envoy_bootstrap_lists_every_replica_and_envoy_accepts_it(tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "bootstrap.yaml"
    replicas = ["127.0.0.1:18000", "127.0.0.1:18010", "127.0.0.2:18020"]
    result = bluegreen("envoy-bootstrap", "--node-id", "edge-1", *[a for r in replicas for a in ("--xds", r)], "-o", str(out))
    assert result.returncode == 0, result.stderr
    cluster = yaml.safe_load(out.read_text())["static_resources"]["clusters"][0]
    endpoints = [e["endpoint"]["address"]["socket_address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [f"{e['address']}:{e['port_value']}" for e in endpoints] == replicas
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "OK" in check.stdout + check.stderr, check.stdout + check.stderr
    twice = bluegreen("envoy-bootstrap", "--node-id", "n", "--xds", replicas[0], "--xds", replicas[0])
    assert twice.returncode != 0 and "named twice" in twice.stderr


def test_envoy_bootstrap_for_a_dns_named_control_plane_uses_strict_dns(tmp_path: Path) -> None:
    result = bluegreen("envoy-bootstrap", "--node-id", "n", "--xds", "controlplane:18000")
    assert result.returncode == 0, result.stderr
    assert "STRICT_DNS" in result.stdout and 'address: "controlplane"' in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["envoy-bootstrap", "--node-id", "bad id"], "invalid node id"),
        (["envoy-bootstrap", "--node-id", "n", "--xds", "nohost"], "--xds"),
        (["serve", "--admin", "0.0.0.0:18001", "--state", "/nonexistent/x.db"], "refusing to bind the admin API"),
        (["traffic", "shop"], "exactly one of --green"),
    ],
)
def test_bad_usage_exits_2_with_a_message(args: list[str], message: str) -> None:
    result = bluegreen(*args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert message in result.stderr


def test_serve_refuses_a_broken_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("fleets:\n  edge:\n    listeners: []\n")
    result = bluegreen("serve", "--config", str(config), "--state", str(tmp_path / "s.db"))
    assert result.returncode == 2
    assert "fleets.edge.listeners" in result.stderr


def test_client_commands_report_an_unreachable_api() -> None:
    result = bluegreen("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 4 and "cannot reach the admin API" in result.stderr


async def test_sandbox_then_move_traffic_with_the_cli(tmp_path: Path) -> None:
    """The README's quick start: `bluegreen sandbox`, then curl and the CLI."""
    port, preview, xds, admin, envoy_admin = (free_port() for _ in range(5))
    admin_url = f"http://127.0.0.1:{admin}"
    proc = await ManagedProcess.start(
        [sys.executable, "-m", "controlplane", "sandbox", "--port", str(port), "--preview-port", str(preview),
         "--xds", f"127.0.0.1:{xds}", "--admin", f"127.0.0.1:{admin}", "--envoy-admin-port", str(envoy_admin)],
        name="sandbox", log_dir=tmp_path, cwd=tmp_path, env=PYTHON_ENV,
    )
    try:
        await proc.expect_log("bluegreen sandbox is up", timeout=60)
        url = f"http://127.0.0.1:{port}/"
        assert await sample_environments(url, 20) == {"blue": 20}
        assert await sample_environments(f"http://127.0.0.1:{preview}/", 5) == {"green": 5}

        # The user never handles the token: the sandbox wrote it where the CLI looks by default.
        assert (tmp_path / "bluegreen.db.token").stat().st_mode & 0o777 == 0o600
        assert "Admin token         bluegreen.db.token" in proc.log_text()

        async def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(bluegreen, *args, "--admin", admin_url, cwd=tmp_path)

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        refused = await asyncio.to_thread(bluegreen, "switch", "demo", "--admin", admin_url, cwd=elsewhere)
        assert refused.returncode == 1 and "error (401)" in refused.stderr

        result = await cli("switch", "demo")
        assert result.returncode == 0, result.stderr
        assert "1/1 proxies on the current config, converged in" in result.stdout
        await settle_on(url, "green")
        assert await sample_environments(url, 20) == {"green": 20}

        result = await cli("rollback", "demo")
        assert result.returncode == 0, result.stderr
        await settle_on(url, "blue")
        assert await sample_environments(url, 20) == {"blue": 20}

        result = await cli("traffic", "demo", "--green", "101")
        assert result.returncode == 2 and "--green must be between 0 and 100, got 101" in result.stderr
        result = await cli("switch", "demo", "--to", "blue")  # already at 100 %: the API refuses
        assert result.returncode == 1 and "blue already takes 100% of traffic" in result.stderr

        result = await cli("status")
        assert result.returncode == 0, result.stderr
        assert "sandbox-envoy fleet=default sotw converged" in result.stdout
        assert "blue  100%  active version=v1" in result.stdout

        proc.kill(signal.SIGINT)  # Ctrl-C
        assert await proc.wait(timeout=30) == 0
        log = proc.log_text()
        assert "stopping the sandbox" in log

        async def envoy_gone() -> bool:
            return subprocess.run(["pgrep", "-f", f"--envoy-admin-port {envoy_admin}|sandbox-envoy"], capture_output=True).returncode != 0

        await wait_for(envoy_gone, timeout=10, message="sandbox children stopped")
        gone = await sample_environments(url, 1)
        assert gone == {"error": 1}, "Envoy still answering after the sandbox stopped"
    finally:
        await proc.stop()


def test_serve_raises_the_open_files_limit_to_the_hard_limit() -> None:
    """One connection per proxy: a soft limit of 1024 would refuse proxies beyond about 1000.
    Run in a child process so this test's own limits stay as they are."""
    script = (
        "import resource\n"
        "from controlplane.serve import raise_open_files_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "low = min(256, hard)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))\n"
        "raised = raise_open_files_limit()\n"
        "print(low, raised, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    low, raised, now, hard = (int(x) for x in out.stdout.split())
    assert raised == now
    assert now == hard or (hard == -1 and now >= 1 << 20), out.stdout  # RLIM_INFINITY is -1
    assert now >= low
