"""A throwaway PostgreSQL server for tests (synchronous; psycopg 3).

:func:`run_postgres` runs ``initdb`` and ``postgres`` in a fresh temporary directory, on a free
port bound to 127.0.0.1 only (no Unix socket), with trust authentication for the superuser
``postgres``. It yields a :class:`PostgresServer` (``.url``, ``.create_database()``) and always
stops the server and deletes the directory on exit, also when the block raises.

How it is run:

* Binaries: ``$PG_BINDIR`` if set, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian
  and Ubuntu packages), else the directory of a ``pg_ctl`` on ``PATH``. Missing binaries fail the
  test with a message naming the Debian package (``apt-get install -y postgresql``).
* PostgreSQL refuses to run as root. Under root, ``initdb`` and ``postgres`` run as the ``postgres``
  system user (``subprocess`` ``user=``/``group=``: a setuid in the child, no ``runuser``/``su``
  process in between, so the pid we hold is the postmaster's). The temporary directory (under
  ``$BLUEGREEN_PG_TMPDIR`` or the system temp dir, normally ``/tmp``) is chowned to that user; a
  directory the user cannot reach is reported clearly. Not root: everything runs as the current
  user, still with the superuser role named ``postgres``.
* The postmaster is started directly (not through ``pg_ctl``), so it is our child: it gets
  ``PR_SET_PDEATHSIG=SIGKILL`` (dies with pytest), is stopped with SIGQUIT (what ``pg_ctl stop -m
  immediate`` sends) and SIGKILL after 10 s, and an ``atexit`` hook kills whatever is left.
* Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): this is a
  test server; a start takes about a second.
* Readiness is awaited by polling a psycopg connection, never by sleeping; a postmaster that exits
  early fails at once with the tail of its log. A port taken between :func:`free_port` and the
  bind is retried on another port.

Use the fixtures ``postgres_server`` (one server per test module) and ``pg_url`` (a fresh database
per test) by importing them into the test module: ``from tests.pg import pg_url, postgres_server``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.harness import LOCALHOST, free_port

SUPERUSER = "postgres"
DEFAULT_DATABASE = "bluegreen"
DEBIAN_PACKAGE = "postgresql"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------------
# Binaries and the user to run them as
# --------------------------------------------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); 9.6 -> (9, 6); unparsable names sort first.
    parts = re.findall(r"[0-9]+", path.parent.name)
    return tuple(int(p) for p in parts) if parts else (-1,)


def find_pg_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``; AssertionError naming the package if none."""
    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        bindir = Path(explicit)
        if not (bindir / "initdb").is_file() or not (bindir / "postgres").is_file():
            raise AssertionError(f"PG_BINDIR={explicit} does not contain initdb and postgres")
        return bindir
    candidates = [
        p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file() and (p / "postgres").is_file()
    ]
    if candidates:
        return max(candidates, key=_version_key)
    on_path = shutil.which("pg_ctl")
    if on_path:
        bindir = Path(on_path).resolve().parent
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise AssertionError(
        "PostgreSQL server binaries not found (looked in $PG_BINDIR, /usr/lib/postgresql/*/bin and "
        f"next to pg_ctl on PATH). On Debian/Ubuntu: `apt-get install -y {DEBIAN_PACKAGE}` (the "
        "package that provides /usr/lib/postgresql/<version>/bin/initdb, pg_ctl and postgres)."
    )


@dataclass(frozen=True)
class _RunAs:
    """Who runs initdb and postgres: ``user``/``group`` None means the current user."""

    user: str | None
    group: str | None

    def popen_kwargs(self) -> dict[str, object]:
        if self.user is None:
            return {}
        # extra_groups=[] drops root's supplementary groups; the setuid happens before
        # preexec_fn, so the PDEATHSIG set there survives (a uid change clears it).
        return {"user": self.user, "group": self.group, "extra_groups": []}


def _run_as() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(None, None)
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise AssertionError(
            f"running as root, and PostgreSQL refuses to run as root, but there is no {SUPERUSER!r} "
            f"system user to run it as (the Debian package {DEBIAN_PACKAGE!r} creates one), or run the "
            "tests as an unprivileged user"
        ) from None
    return _RunAs(entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name)


def _pdeathsig() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(1, sigkill, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


_PREEXEC = _pdeathsig()
_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()
_DIRS: set[str] = set()


@atexit.register
def _cleanup_leftovers() -> None:
    # Backstop for a run torn down without the context manager's finally (e.g. os._exit paths
    # aside, a KeyboardInterrupt during teardown).
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)
    for directory in list(_DIRS):
        shutil.rmtree(directory, ignore_errors=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "<no log>"


@dataclass
class PostgresServer:
    port: int
    data_dir: Path
    log_path: Path
    bindir: Path
    process: subprocess.Popen[bytes]
    database: str = DEFAULT_DATABASE
    _counter: int = field(default=0, repr=False)

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{LOCALHOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The database created at start (``bluegreen``)."""
        return self.url_for(self.database)

    @property
    def admin_url(self) -> str:
        """The maintenance database ``postgres`` (for CREATE/DROP DATABASE)."""
        return self.url_for("postgres")

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a fresh unique name unless given); return its URL."""
        if name is None:
            self._counter += 1
            name = f"t{self._counter}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its sessions (PostgreSQL 13+)."""
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _check_reachable(directory: Path, run_as: _RunAs) -> None:
    if run_as.user is None:
        return
    probe = subprocess.run(
        ["test", "-w", str(directory), "-a", "-x", str(directory)],
        env=_ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        **run_as.popen_kwargs(),  # type: ignore[arg-type]
    )
    if probe.returncode != 0:
        raise AssertionError(
            f"the {run_as.user!r} user cannot reach {directory} (a parent directory is not searchable "
            "by it?); set BLUEGREEN_PG_TMPDIR to a directory under /tmp"
        )


def _initdb(bindir: Path, data_dir: Path, log_path: Path, run_as: _RunAs) -> None:
    argv = [
        str(bindir / "initdb"),
        "-D", str(data_dir),
        "-U", SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        try:
            result = subprocess.run(
                argv,
                env=_ENV,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
                preexec_fn=_PREEXEC,
                **run_as.popen_kwargs(),  # type: ignore[arg-type]
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"initdb took over 120 s; log:\n{_tail(log_path)}") from None
    if result.returncode != 0:
        raise AssertionError(f"initdb failed with exit code {result.returncode}; log:\n{_tail(log_path)}")


def _start_postmaster(
    bindir: Path, data_dir: Path, log_path: Path, run_as: _RunAs, port: int
) -> subprocess.Popen[bytes]:
    argv = [
        str(bindir / "postgres"),
        "-D", str(data_dir),
        "-p", str(port),
        "-c", f"listen_addresses={LOCALHOST}",
        "-c", "unix_socket_directories=",  # TCP only: no dependency on /var/run/postgresql
        "-c", "fsync=off",
        "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
        "-c", "shared_buffers=32MB",
        "-c", "max_connections=50",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=_ENV,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_PREEXEC,
            **run_as.popen_kwargs(),  # type: ignore[arg-type]
        )
    _LIVE.add(proc)
    return proc


def _wait_accepting(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> bool:
    """Poll until a connection succeeds: True; False if the postmaster exited (e.g. port taken)."""
    deadline = time.monotonic() + timeout
    last = "<never tried>"
    while True:
        if proc.poll() is not None:
            return False
        try:
            with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"PostgreSQL did not accept connections within {timeout:.0f}s (last {last}); log:\n{_tail(log_path)}"
            )
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGQUIT)  # immediate shutdown, like pg_ctl stop -m immediate
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"[pg] postmaster {proc.pid} ignored SIGQUIT for {_STOP_TIMEOUT}s; sending SIGKILL")
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        _LIVE.discard(proc)


@contextlib.contextmanager
def run_postgres(tmp: Path | str | None = None, *, keep_log: Path | None = None) -> Iterator[PostgresServer]:
    """Run a PostgreSQL server until the block exits; yields a :class:`PostgresServer`.

    ``tmp``: parent of the temporary directory (default ``$BLUEGREEN_PG_TMPDIR`` or the system
    temp dir); the directory itself is always created fresh and deleted on exit. It must be
    reachable by the ``postgres`` user when running as root, which pytest's ``tmp_path`` (under
    a 0700 root-owned directory) is not, hence a separate directory. ``keep_log``: copy the
    server log there on exit. If the block raises, the log tail is printed.
    """
    bindir = find_pg_bindir()
    run_as = _run_as()
    parent = str(tmp) if tmp is not None else os.environ.get("BLUEGREEN_PG_TMPDIR") or tempfile.gettempdir()
    root = Path(tempfile.mkdtemp(prefix="bluegreen-pg-", dir=parent))
    _DIRS.add(str(root))
    proc: subprocess.Popen[bytes] | None = None
    log_path = root / "postgres.log"
    try:
        if run_as.user is not None:
            shutil.chown(root, run_as.user, run_as.group)
        _check_reachable(root, run_as)
        data_dir = root / "data"
        _initdb(bindir, data_dir, log_path, run_as)
        for _attempt in range(5):
            port = free_port()
            proc = _start_postmaster(bindir, data_dir, log_path, run_as, port)
            admin_url = f"postgresql://{SUPERUSER}@{LOCALHOST}:{port}/postgres"
            if _wait_accepting(proc, admin_url, log_path, _START_TIMEOUT):
                break
            _stop(proc)  # exited already (most likely the port was taken meanwhile): try another
        else:
            raise AssertionError(f"PostgreSQL exited at start 5 times; log:\n{_tail(log_path)}")
        server = PostgresServer(port, data_dir, log_path, bindir, proc)
        server.create_database(DEFAULT_DATABASE)
        try:
            yield server
        except BaseException:
            print(f"[pg] last lines of the PostgreSQL log ({log_path}):\n{_tail(log_path)}")
            raise
    finally:
        try:
            if proc is not None:
                _stop(proc)
        finally:
            if keep_log is not None and log_path.exists():
                with contextlib.suppress(OSError):
                    keep_log.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(log_path, keep_log)
            shutil.rmtree(root, ignore_errors=True)
            _DIRS.discard(str(root))


# --------------------------------------------------------------------------------------------
# pytest fixtures (import them into the test module)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server shared by the tests of a module."""
    with run_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the module's server, as a URL; dropped after the test."""
    url = postgres_server.create_database()
    yield url
    name = url.rsplit("/", 1)[1]
    with contextlib.suppress(psycopg.Error):
        postgres_server.drop_database(name)
