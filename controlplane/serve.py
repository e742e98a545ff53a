"""`bluegreen serve`: run the control plane until SIGTERM or SIGINT.

The admin API always authenticates. With no token in the config, the first start generates one
and stores it beside the state (``<state>.token``, mode 0600); later starts reuse it. The CLI,
``bluegreen sandbox`` and ``bluegreen demo`` find it there (see :func:`controlplane.cli.resolve_token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import resource
import secrets
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from .admin.api import build_admin_app, local_proxy_rows
from .app import ControlPlane
from .bootstrap import parse_host_port
from .admin.auth import Authenticator
from .config import MIN_TOKEN_LENGTH, Settings, TokenSpec
from .errors import ConfigError, ValidationError
from .store.url import EtcdURL, SQLiteURL, StoreURL, open_store
from .workers.serving import default_workers

log = logging.getLogger("bluegreen")


@dataclass(frozen=True)
class ServeOptions:
    settings: Settings
    state_path: Path
    xds: str = "127.0.0.1:18000"
    admin: str = "127.0.0.1:18001"
    token_path: Path | None = None  # where the generated token lives; default: <state>.token
    store: StoreURL | None = None  # --store; None: SQLite at state_path
    replica_id: str | None = None  # --replica-id; default: <host>:<admin port>
    lease_ttl: int = 5  # --lease-ttl: seconds a dead replica's leadership and proxies outlive it
    xds_workers: int | None = None  # --xds-workers; None: the config's xds.workers, else one per core

    @property
    def workers(self) -> int:
        """xDS worker processes to run (1: xDS served by the main process itself)."""
        return self.xds_workers or self.settings.xds.workers or default_workers()

    @property
    def store_url(self) -> StoreURL:
        return self.store if self.store is not None else SQLiteURL(self.state_path)

    @property
    def generated_token_path(self) -> Path:
        return self.token_path or token_path_for(self.state_path)


def token_path_for(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".token")


def ensure_token_file(path: Path) -> str:
    """The token stored at ``path``, generating it first if there is none. The file is created
    complete and with mode 0600 from its first byte (a temporary file linked into place), so a
    concurrent reader never sees half a token and two starts never overwrite each other."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = None
    if token is None:
        # A random name: one from the pid alone could be left over by a killed start and, in a
        # container where the pid is always 1, make every later start fail.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)
                log.info("generated an admin token (role admin) in %s; the CLI on this machine finds it there", path)
            except FileExistsError:
                pass  # another start won the race: use its token
        finally:
            tmp.unlink(missing_ok=True)
        token = path.read_text().strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"the token in {path} is shorter than {MIN_TOKEN_LENGTH} characters; delete the file to generate a new one")
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by group or others; chmod 600 it", path)
    return token


def authenticator_for(options: ServeOptions) -> Authenticator:
    """The configured tokens, or else the generated one (named "admin", role admin)."""
    tokens = options.settings.tokens()
    if not tokens:
        path = options.generated_token_path
        tokens = (TokenSpec("admin", ensure_token_file(path), "admin"),)
        log.info("admin API token: %s (no token in the config)", path)
    else:
        log.info("admin API tokens: %s", ", ".join(f"{t.name} ({t.role})" for t in tokens))
    return Authenticator.of(tokens)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    admin = settings.admin
    if admin.tls_cert is None or admin.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(admin.tls_cert, admin.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"admin.tls: cannot load {admin.tls_cert} / {admin.tls_key}: {exc}") from None
    return context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: ServeOptions) -> tuple[str, int]:
    """Validate before anything starts. Returns the admin (host, port)."""
    try:
        parse_host_port(options.xds, what="--xds")
        host, port = parse_host_port(options.admin, what="--admin")
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None
    if not _is_loopback(host) and not options.settings.tokens():
        # The generated token is for one machine: whoever binds beyond loopback chooses the
        # tokens (and their roles) deliberately, and hands them out.
        raise ConfigError(
            f"refusing to bind the admin API to {host} with only a generated token: anyone who can reach it "
            "could try to move traffic. Configure admin.tokens (or admin.token / admin.token_file), or bind 127.0.0.1"
        )
    if isinstance(options.store, EtcdURL) and not options.settings.tokens():
        log.warning("replicas on etcd with a generated admin token: each host generates its own; configure "
                    "admin.tokens so every replica accepts the same tokens")
    if options.xds_workers is not None and options.xds_workers < 1:
        raise ConfigError(f"--xds-workers must be at least 1, got {options.xds_workers}")
    if options.lease_ttl < 2:
        raise ConfigError(f"--lease-ttl must be at least 2 seconds, got {options.lease_ttl}")
    if not _is_loopback(host) and options.settings.admin.tls_cert is None:
        log.warning("the admin API on %s is plain HTTP: bearer tokens cross the network in clear; set admin.tls", host)
    return host, port


@contextlib.asynccontextmanager
async def running(options: ServeOptions) -> AsyncIterator[tuple[ControlPlane, int]]:
    """Start store, control plane and admin API; stop them in reverse order on exit."""
    host, port = check_options(options)
    auth = authenticator_for(options)
    tls = ssl_context(options.settings)
    kv = await open_store(options.store_url, lock=True)  # SQLite: one process per state file
    replica_id = options.replica_id or f"{socket.gethostname()}:{port}"
    cp = ControlPlane(options.settings, kv, replica_id=replica_id, lease_ttl=options.lease_ttl,
                      admin_address=options.admin, workers=options.workers)
    if cp.shared is not None:
        cp.shared.rows = lambda: local_proxy_rows(cp)
    try:
        await cp.start(options.xds)
        hosts = (*options.settings.admin.hosts, host)
        runner = web.AppRunner(build_admin_app(cp, auth, hosts=hosts), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=tls)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else port
            yield cp, bound
        finally:
            await runner.cleanup()
    finally:
        await cp.stop()


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit and return it. Each proxy holds one
    connection, and the usual soft default of 1024 would refuse proxies beyond about 1000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(options: ServeOptions) -> None:
    open_files = raise_open_files_limit()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(options) as (cp, admin_port):
        # Long-lived start-up objects (protobuf modules, the first snapshot) leave the collector's
        # view, and young collections run less often: measured in bench/ to remove ~40 ms of
        # collection per switch at 100 services and 1000 proxies.
        gc.freeze()
        gc.set_threshold(20_000, 10, 10)
        log.info(
            "serving xDS (ADS, SotW and Delta) on %s (%s), admin API on %s%s; state %s; replica %s; fleets: %s; open files limit %d",
            options.xds, f"{options.workers} worker processes" if cp.workers else "in this process", options.admin, " (TLS)" if options.settings.admin.tls_cert else "", options.store_url.describe(),
            cp.cluster.replica_id, ", ".join(f.name for f in options.settings.fleets), open_files,
        )
        await stop.wait()
        log.info("stopping: proxies keep their last configuration until a control plane is back")
