"""A control plane process for synchronous, module-scoped fixtures (browser and Prometheus
tests, which share one expensive client per module): started with named tokens of every role,
stopped (and its log shown on failure) by the context manager."""

from __future__ import annotations

import contextlib
import signal
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from harness import REPO_ROOT, free_port

TOKENS = {"viewer": "viewer-token-0123456789", "operator": "operator-token-0123456789", "admin": "admin-token-0123456789"}


@dataclass
class LiveControlPlane:
    admin_url: str
    xds_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    state_path: Path
    config_path: Path
    argv: list[str]

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process with ``sig`` (SIGKILL: a crash) and start a new one on the same ports."""
        self.process.send_signal(sig)
        self.process.wait(15)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        _wait_healthy(self)

    def call(self, method: str, path: str, body: Any = None, *, role: str = "admin", timeout: float = 15) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.admin_url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {TOKENS[role]}",
                                                  **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, reply = self.call(method, path, body, **kwargs)
        assert status < 300, f"{method} {path}: {status} {reply}"
        return reply

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(directory: Path, extra: dict[str, Any] | None = None) -> Path:
    config = {"admin": {"tokens": [{"name": role, "token": token, "role": role} for role, token in TOKENS.items()]}}
    config.update(extra or {})
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def live_control_plane(directory: Path, extra_config: dict[str, Any] | None = None,
                       admin_port: int | None = None, xds_port: int | None = None) -> Iterator[LiveControlPlane]:
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, extra_config)
    admin_port = admin_port or free_port()
    xds_port = xds_port or free_port()
    state = directory / "state.db"
    log_path = directory / f"controlplane-{admin_port}-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "controlplane", "serve", "--state", str(state), "--config", str(config),
            "--xds", f"127.0.0.1:{xds_port}", "--admin", f"127.0.0.1:{admin_port}"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    cp = LiveControlPlane(f"http://127.0.0.1:{admin_port}", xds_port, process, log_path, state, config, argv)
    try:
        _wait_healthy(cp)
        yield cp
    except BaseException:
        print(cp.log_text()[-4000:])
        raise
    finally:
        if cp.process.poll() is None:
            cp.process.terminate()
            try:
                cp.process.wait(10)
            except subprocess.TimeoutExpired:
                cp.process.kill()
                cp.process.wait()


def _wait_healthy(cp: LiveControlPlane) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert cp.process.poll() is None, f"control plane exited:\n{cp.log_text()[-3000:]}"
        try:
            with urllib.request.urlopen(cp.admin_url + "/healthz", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"control plane did not answer /healthz:\n{cp.log_text()[-3000:]}"
            time.sleep(0.1)


def wait_until(predicate: Any, *, timeout: float = 20.0, message: str = "condition not met") -> Any:
    """Poll ``predicate`` until truthy (exceptions count as "not yet"); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - "not yet"
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (waited {timeout}s; last {last!r})")
        time.sleep(0.05)
