"""A real etcd cluster for the tests: three members on loopback ports (Debian's ``etcd-server``,
installed by ``tests/install-system-deps.sh``).

One cluster serves the whole session (``tests/conftest.py``); each test takes its own key prefix
(:func:`etcd_prefix`), so tests never see each other's keys. Tests that stop members restart
them before they end; the ``etcd`` fixture also checks that every member is up before a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tests.harness import LOCALHOST, _PREEXEC, free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{LOCALHOST}:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOCALHOST}:{self.peer_port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False


@dataclass
class EtcdCluster:
    root: Path
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def url(self, prefix: str) -> str:
        """A ``--store`` URL naming every member."""
        return f"etcd://{','.join(self.endpoints)}/{prefix.strip('/')}"

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start_member(self, index: int) -> None:
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            return
        argv = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", self._initial_cluster(), "--initial-cluster-state", "new",
                "--initial-cluster-token", self.root.name]
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=_PREEXEC)

    def stop_member(self, index: int) -> None:
        m = self.members[index]
        if m.proc is None or m.proc.poll() is not None:
            return
        m.proc.send_signal(signal.SIGTERM)
        try:
            m.proc.wait(10)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()

    def running(self, index: int) -> bool:
        proc = self.members[index].proc
        return proc is not None and proc.poll() is None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member answers /health (a leader is elected)."""
        deadline = time.monotonic() + timeout
        while True:
            down = [m.name for i, m in enumerate(self.members) if self.running(i) and not m.healthy()]
            if not down:
                return
            dead = [m.name for m in self.members if m.proc is not None and m.proc.poll() is not None
                    and m.proc.returncode not in (0, -signal.SIGTERM)]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"etcd members not healthy: {down} (exited: {dead}); log tail:\n{self.log_tail()}")
            time.sleep(0.1)

    def ensure_all_running(self) -> None:
        for i in range(len(self.members)):
            self.start_member(i)
        self.wait_healthy()

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for m in self.members:
            with contextlib.suppress(OSError):
                out.append(f"--- {m.name} ---\n" + "\n".join(m.log_path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.stop_member(i)


@contextlib.contextmanager
def run_etcd_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    if not os.path.exists(ETCD):
        raise RuntimeError("etcd is not installed: run tests/install-system-deps.sh (Debian package etcd-server)")
    root = Path(tempfile.mkdtemp(prefix="bluegreen-etcd-"))
    cluster = EtcdCluster(root)
    for i in range(size):
        cluster.members.append(Member(f"m{i}", free_port(), free_port(), root / f"m{i}", root / f"m{i}.log"))
    try:
        for i in range(size):
            cluster.start_member(i)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def fresh_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/"
