"""Proxyless gRPC: grpcio's own xDS client (no Envoy anywhere) dials ``xds:///shop`` with the
bootstrap ``bluegreen grpc-bootstrap`` renders, and follows the control plane's blue/green
split, switch and rollback. The servers and the client are tests/fixtures/grpc_color.py: a
small service of the tests' own, and a client in a process of its own (grpc reads
``GRPC_XDS_BOOTSTRAP`` once per process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from controlplane.bootstrap import render_grpc_bootstrap
from controlplane.cli import main as cli_main
from tests.fixtures import grpc_color
from tests.harness import REPO_ROOT, ManagedProcess, _python_env, binomial_band, free_port, run_control_plane, wait_for
from tests.test_envoy import Api, write_config

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(180)]

SPLIT_RPCS = 1000


@contextlib.asynccontextmanager
async def grpc_server(color: str, log_dir: Path) -> AsyncIterator[str]:
    """A grpc_color server; yields its address."""
    argv = [sys.executable, "-m", "tests.fixtures.grpc_color", "serve", "--color", color]
    proc = await ManagedProcess.start(argv, name=f"grpc-{color}", log_dir=log_dir, env=_python_env(), cwd=REPO_ROOT)
    try:
        line = await proc.expect_log("listening on ", timeout=30)
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        await proc.stop()


class GrpcClient:
    """The grpc_color client process: one JSON command in, one JSON answer out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=120)
        assert line, f"the gRPC client exited (code {self.proc.returncode})"
        return json.loads(line)  # type: ignore[no-any-return]

    async def sample(self, n: int) -> dict[str, int]:
        answer = await self.ask("sample", n=n)
        assert not answer["errors"], answer
        return answer["counts"]  # type: ignore[no-any-return]

    async def settle_on(self, color: str) -> None:
        """Wait until the client's config says ``color`` only (applying an ACKed update is
        asynchronous inside the client), then it must stay so."""
        async def only() -> bool:
            return set(await self.sample(20)) == {color}

        await wait_for(only, timeout=30, interval=0.1, message=f"gRPC RPCs all on {color}")


@contextlib.asynccontextmanager
async def grpc_client(bootstrap: Path, target: str, log_dir: Path) -> AsyncIterator[GrpcClient]:
    env = {**_python_env(), "GRPC_XDS_BOOTSTRAP": str(bootstrap)}
    with open(log_dir / "grpc-client.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.fixtures.grpc_color", "client", "--target", target,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            env={**os.environ, **env}, cwd=str(REPO_ROOT),
        )  # fmt: skip
    try:
        yield GrpcClient(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def test_grpc_bootstrap_command_prints_the_client_bootstrap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["grpc-bootstrap", "--node-id", "orders-1", "--fleet", "edge", "--xds", "10.0.0.5:18000"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "xds_servers": [{"server_uri": "10.0.0.5:18000", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
        "node": {"id": "orders-1", "cluster": "edge"},
    }
    out = tmp_path / "b.json"
    assert cli_main(["grpc-bootstrap", "--node-id", "n", "--xds", "cp:18000", "--ca", "/ca.pem", "--tls-cert", "/c.pem",
                     "--tls-key", "/k.pem", "-o", str(out)]) == 0
    [server] = json.loads(out.read_text())["xds_servers"]
    assert server["channel_creds"] == [{"type": "tls", "config": {"ca_certificate_file": "/ca.pem", "certificate_file": "/c.pem",
                                                                  "private_key_file": "/k.pem"}}]
    assert cli_main(["grpc-bootstrap", "--node-id", "bad id"]) == 2
    assert "invalid node id" in capsys.readouterr().err


async def test_grpc_client_follows_split_switch_and_rollback_and_a_stream_stays_on_blue(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", free_port(), None)
    async with grpc_server("blue", tmp_path) as blue, grpc_server("green", tmp_path) as green, \
            run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session:
        api = Api(session, cp.admin_url)
        await api.call("PUT", "/v1/services/shop", {"domains": ["*"], "prefix": "/"})
        await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue]})
        await api.call("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": [green]})
        bootstrap = tmp_path / "grpc-bootstrap.json"
        bootstrap.write_text(render_grpc_bootstrap(node_id="grpc-client-1", fleet="default", xds=cp.xds_address))

        async with grpc_client(bootstrap, "xds:///shop", tmp_path) as client:
            assert await client.sample(50) == {"blue": 50}

            # The client is a proxy of the fleet like an Envoy: listed, converged, no NACKs.
            async def listed() -> dict[str, Any] | None:
                proxies = await api.proxies()
                return next((p for p in proxies if p["node_id"] == "grpc-client-1" and p["converged"]), None)

            proxy = await wait_for(listed, timeout=30, message="the gRPC client converged in /v1/proxies")
            assert proxy["fleet"] == "default" and proxy["protocol"] == "sotw"
            assert all(t["nacks"] == 0 for t in proxy["types"].values()), proxy["types"]
            assert proxy["types"]["lds"]["subscribed"] == ["shop"]
            assert proxy["types"]["rds"]["subscribed"] == ["grpc/shop"]
            assert proxy["types"]["cds"]["subscribed"] == ["shop-blue", "shop-green"]

            stream = await client.ask("open_stream")
            assert stream == {"first": "blue"}

            # 20/80: the split is per RPC, within a binomial band. The traffic call returns once
            # every proxy of the fleet (this client included) ACKed.
            view = await api.converged("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 20, "green": 80}})
            assert (view["convergence"]["proxies"], view["convergence"]["acked"]) == (1, 1)  # the gRPC client
            await wait_for(lambda: _both(client), timeout=30, interval=0.1, message="RPCs on both colors")
            counts = await client.sample(SPLIT_RPCS)
            assert counts.get("blue", 0) + counts.get("green", 0) == SPLIT_RPCS, counts
            lo, hi = binomial_band(SPLIT_RPCS, 0.8)
            assert lo <= counts.get("green", 0) <= hi, f"80% green: saw {counts}, 99.9% band [{lo}, {hi}]"

            # The switch: every new RPC goes to green.
            view = await api.converged("POST", "/v1/services/shop/switch")
            assert view["traffic"]["active"] == "green"
            await client.settle_on("green")
            assert await client.sample(200) == {"green": 200}

            # The stream opened before the switch is still on blue, and ends normally there.
            await asyncio.to_thread(grpc_color.release, blue)
            finished = await client.ask("finish_stream")
            assert finished["status"] == "OK" and set(finished["colors"]) == {"blue"} and finished["colors"]["blue"] > 1, finished

            # The rollback: every new RPC goes back to blue.
            await api.converged("POST", "/v1/services/shop/rollback")
            await client.settle_on("blue")
            assert await client.sample(200) == {"blue": 200}


async def _both(client: GrpcClient) -> bool:
    return set(await client.sample(50)) == {"blue", "green"}
