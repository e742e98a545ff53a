"""The xDS side of a process: the gRPC server options, the listening port, and the parts that
serve proxies (snapshot cache, ADS server, convergence tracking, telemetry sink, stream caps).

The single-process control plane (``app.ControlPlane``) and every xDS worker build their gRPC
server here, so keepalive, connection age, message limits and mTLS are the same everywhere.
"""

from __future__ import annotations

import math
import os

import grpc

from ..config import Settings
from ..xds.peer import StreamLimits
from ..xds.server import server_options

# The stream metrics (attributes of Metrics) each worker counts and reports to the main process,
# which exposes their sum over workers instead of its own (workers/pool.py).
FORWARDED_METRICS = ("connected_proxies", "converged_proxies", "lagging_proxies", "responses", "response_bytes",
                     "nacks", "proxy_rejecting", "streams_refused", "telemetry_dropped")


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def grpc_server(settings: Settings, *, reuseport: bool) -> grpc.aio.Server:
    """A grpc.aio server with the ``xds:`` section's limits and liveness settings.

    ``reuseport``: only xDS workers share their port (SO_REUSEPORT). A single process keeps it
    off, because grpcio turns it on by default and a second control plane could then bind the
    same port silently and split the fleet between two processes.
    """
    xds = settings.xds
    return grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", xds.max_request_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 1 if reuseport else 0),
            *server_options(
                keepalive_seconds=xds.keepalive_seconds,
                keepalive_timeout_seconds=xds.keepalive_timeout_seconds,
                max_connection_age_seconds=xds.max_connection_age_seconds,
                max_connection_age_grace_seconds=xds.max_connection_age_grace_seconds,
            ),
            # No bandwidth-delay-product pings: they size the window for data we receive,
            # and ADS requests are small. With them on, every ACK costs an extra PING round
            # trip: bench/grpc_floor.py measured about a third more server CPU per push.
            ("grpc.http2.bdp_probe", 0),
        ]
    )


def listen(server: grpc.aio.Server, settings: Settings, address: str) -> int:
    """Add the xDS port (mTLS when ``xds.tls`` is set); the bound port, 0 if binding failed."""
    tls = settings.xds.tls
    if tls is None:
        return server.add_insecure_port(address)
    # Read at start: a certificate rotation takes a restart (see docs/security.md).
    credentials = grpc.ssl_server_credentials(
        ((tls.key.read_bytes(), tls.cert.read_bytes()),),
        root_certificates=tls.client_ca.read_bytes(),
        require_client_auth=True,  # no client certificate signed by client_ca: handshake refused
    )
    return server.add_secure_port(address, credentials)


def worker_limits(settings: Settings, workers: int) -> StreamLimits:
    """The stream caps one of ``workers`` processes enforces. ``xds.max_streams`` is a budget
    for the host, so each worker gets an equal share (rounded up); ``max_streams_per_identity``
    applies per worker, because the kernel, not the client, picks the worker of a connection
    (so a client may hold up to ``workers`` times the cap in all; see docs/workers.md)."""
    xds = settings.xds
    total = None if xds.max_streams is None else max(1, math.ceil(xds.max_streams / workers))
    return StreamLimits(total, xds.max_streams_per_identity)
