"""Cutover under load: what clients see while traffic moves from blue to green and back.

    python bench/cutover.py --rate 500 --protocol both --step-seconds 5 --duration-per-phase 10

For each protocol (HTTP/1.1 keep-alive, then HTTP/2 with prior knowledge, h2c) it starts what
``bluegreen sandbox`` starts (control plane in this process, a real Envoy, blue v1 and green v2
demo apps), then an open-loop load generator in its own process: requests are scheduled by the
clock at ``--rate`` per second, never by earlier responses, and each one is recorded with its
scheduled start, send time, completion, status, the environment that answered and the kind of
error. Under that load it runs four scenarios, each its own phase with steady load before and
after the action:

1. atomic switch: a deployment of v2 to green with ``steps: [100]``;
2. rollback: ``POST /v1/services/demo/rollback?wait=converged`` (back to blue, during its drain or
   standby);
3. stepped: a deployment of v2 to green with ``steps: [10, 50, 100]`` and ``--step-seconds``;
4. drain and removal: after blue's ``drain_seconds``, ``POST /v1/deployments/<blue>/decommission``
   removes blue's endpoints, route entry and cluster from Envoy.

Just before each switch, ``--long-requests`` requests to ``/slow?seconds=--long-seconds`` are
started (and awaited in the app's log, so they are in flight on the old environment); one
long-lived request to blue starts before the stepped deployment and lasts until after blue's
decommission.

It prints a markdown table, writes every sample to ``bench/results/cutover-<UTC>.json`` and a
chart (share of responses per environment, failures and latency over time) to
``bench/results/cutover-<UTC>.png``. Every process it starts is stopped on exit, also on Ctrl-C,
SIGTERM or an error, and gets ``PR_SET_PDEATHSIG``. See bench/README.md.

``bench/filebased.py`` reuses the load generator, the analysis and the chart of this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import errno
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ENV_HEADER = "x-bluegreen-environment"
SLOW_STARTED = "slow request started"


# ================================================================================================
# Processes


def _pdeathsig() -> None:
    """Child side, between fork and exec: SIGKILL when the benchmark dies (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Proc:
    """A child process of ours (asyncio), output appended to a log file."""

    live: set["Proc"] = set()

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.process, self.log = name, process, log
        Proc.live.add(self)

    @classmethod
    async def start(cls, name: str, argv: list[str], log: Path, stdin: int | None = asyncio.subprocess.DEVNULL,
                    env: dict[str, str] | None = None) -> "Proc":
        with open(log, "ab") as out:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=stdin, stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True, preexec_fn=_pdeathsig)
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.text().splitlines():
                if line.startswith(prefix):
                    return line
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail(self.log)}")
            await asyncio.sleep(0.05)  # polling a log file: there is no event to await
        raise RuntimeError(f"{self.name}: no line starting with {prefix!r} within {timeout:g}s:\n{tail(self.log)}")

    async def stop(self, timeout: float = 10.0) -> None:
        try:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.process.wait(), timeout)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    await self.process.wait()
        finally:
            if self.process.returncode is None:  # cancelled half-way: never leave it running
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
            Proc.live.discard(self)

    @classmethod
    def kill_all(cls) -> None:
        for proc in list(cls.live):
            if proc.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        cls.live.clear()


def patch_sandbox_spawn() -> None:
    """sandbox() starts Envoy and the apps in their own sessions; give them PR_SET_PDEATHSIG as
    well, so they die with this process even if it is SIGKILLed (sandbox.py stops them on every
    other way out)."""
    import controlplane.sandbox as sb

    if not hasattr(sb, "_spawn") or not hasattr(sb, "Child"):
        return

    async def _spawn(name: str, argv: list[str], workdir: Path) -> Any:
        log = workdir / f"{name}.log"
        with open(log, "wb") as out:
            process = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=asyncio.subprocess.STDOUT,
                                                           stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                                                           preexec_fn=_pdeathsig)
        return sb.Child(name, process, log)

    sb._spawn = _spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path | str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # Envoy lists its compiled-in extensions at start-up; they would fill the tail.
    kept = [line for line in text if not re.search(r"\]\s{3}\S", line)]
    return "\n".join(kept[-lines:])


def count_slow_started(logs: list[Path]) -> int:
    n = 0
    for log in logs:
        with contextlib.suppress(OSError):
            n += log.read_text(errors="replace").count(SLOW_STARTED)
    return n


# ================================================================================================
# Load generator (child process: `python bench/cutover.py _loadgen ...`)


class Recorder:
    """Samples as columns (compact JSON). Times are CLOCK_MONOTONIC seconds, which is the same
    clock in every process of this machine, so the driver can relate them to its own events."""

    def __init__(self) -> None:
        self.sched: list[float] = []
        self.sent: list[float] = []
        self.done: list[float] = []
        self.status: list[int] = []
        self.env: list[int] = []
        self.err: list[int] = []
        self.conn: list[int] = []  # HTTP/1.1: the client's local port; HTTP/2: the connection's serial number
        self.env_names: list[str] = ["", "blue", "green"]
        self.err_names: list[str] = [""]
        self.failures: list[dict[str, Any]] = []
        self.extras: list[dict[str, Any]] = []
        self.goaway_retries = 0

    def _code(self, names: list[str], value: str | None) -> int:
        value = value or ""
        try:
            return names.index(value)
        except ValueError:
            names.append(value)
            return len(names) - 1

    def add(self, sched: float, sent: float, done: float, result: "Result") -> None:
        self.sched.append(sched)
        self.sent.append(sent)
        self.done.append(done)
        self.status.append(result.status)
        self.env.append(self._code(self.env_names, result.env))
        self.err.append(self._code(self.err_names, result.error))
        self.conn.append(result.conn)
        if result.error or not 200 <= result.status < 300:
            self.failures.append({"i": len(self.sched) - 1, "status": result.status, "error": result.error,
                                  "detail": result.detail, "sent": sent, "done": done})

    def to_json(self) -> dict[str, Any]:
        r = lambda xs: [round(x, 6) for x in xs]  # noqa: E731 - µs resolution is plenty
        return {"sched": r(self.sched), "sent": r(self.sent), "done": r(self.done), "status": self.status,
                "env": self.env, "env_names": self.env_names, "err": self.err, "err_names": self.err_names,
                "conn": self.conn, "failures": self.failures, "extras": self.extras, "goaway_retries": self.goaway_retries}


@dataclass
class Result:
    status: int = 0  # 0: no HTTP response
    env: str | None = None
    error: str | None = None  # kind of failure without a response (timeout, reset, ...)
    detail: str | None = None  # body of a non-2xx answer, or the exception text
    conn: int = 0  # which client connection carried it (0: unknown)


class H1Client:
    """aiohttp over HTTP/1.1 with keep-alive: as many connections as requests in flight, reused.

    aiohttp silently re-sends an idempotent request once when its connection drops
    (ServerDisconnectedError, ECONNRESET). That is switched off here, so that every dropped
    request is counted; a client that retries would hide those (GETs only)."""

    def __init__(self, host: str, port: int) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.base = f"http://{host}:{port}"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                                             timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        if hasattr(self.session, "_retry_connection"):
            self.session._retry_connection = False  # private in aiohttp 3.x; see the class docstring

    async def get(self, path: str, timeout: float, recorder: Recorder, headers: dict[str, str] | None = None) -> Result:
        aiohttp = self.aiohttp
        try:
            async with asyncio.timeout(timeout):
                async with self.session.get(self.base + path, headers=headers) as response:
                    conn = 0
                    # The connection is released as soon as a small body is read; its protocol object
                    # stays (aiohttp private attribute, hence the guard).
                    with contextlib.suppress(Exception):
                        transport = response._protocol.transport  # type: ignore[union-attr]
                        if transport is not None:
                            conn = transport.get_extra_info("sockname")[1]
                    body = await response.read()
                    ok = 200 <= response.status < 300
                    return Result(response.status, response.headers.get(ENV_HEADER), None,
                                  None if ok else body[:300].decode(errors="replace"), conn)
        except TimeoutError:
            return Result(error="timeout")
        except aiohttp.ServerDisconnectedError as exc:
            return Result(error="server_disconnected", detail=str(exc))
        except aiohttp.ClientConnectorError as exc:
            return Result(error="connect_error", detail=str(exc))
        except aiohttp.ClientOSError as exc:
            kind = "reset" if exc.errno == errno.ECONNRESET else f"os_error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            return Result(error=kind, detail=str(exc))
        except aiohttp.ClientPayloadError as exc:
            return Result(error="payload_error", detail=str(exc))
        except aiohttp.ClientError as exc:
            return Result(error=type(exc).__name__, detail=str(exc))

    async def close(self) -> None:
        await self.session.close()


def _h2_connection_class() -> type:
    import h2.connection

    class GoawayTolerantConnection(h2.connection.H2Connection):  # type: ignore[misc]
        """h2's state machine closes the whole connection at the first GOAWAY, and then rejects the
        frames of streams the server still finishes. RFC 9113 §6.8: streams up to the GOAWAY's last
        stream id may complete (Envoy's drain sends a GOAWAY with 2^31-1 first, and the final one
        ~5 s later). Real clients (nghttp2, Go, gRPC) finish them; so does this one: the GOAWAY
        becomes an event, the connection stays open for those streams, and the client opens no
        new stream on it."""

        def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
            event = h2.events.ConnectionTerminated()
            event.error_code = h2.connection._error_code_from_int(frame.error_code)
            event.last_stream_id = frame.last_stream_id
            event.additional_data = frame.additional_data or None
            return [], [event]

    return GoawayTolerantConnection


class H2Stream:
    __slots__ = ("future", "status", "env", "body")

    def __init__(self, future: asyncio.Future[str | None]) -> None:
        self.future, self.status, self.env, self.body = future, 0, None, b""

    def finish(self, error: str | None) -> None:
        if not self.future.done():
            self.future.set_result(error)


class H2Protocol(asyncio.Protocol):
    """One HTTP/2 connection (h2c, prior knowledge): every request is a stream on it."""

    def __init__(self, client: "H2Client", conn_class: type) -> None:
        import h2.config

        self.client = client
        self.conn = conn_class(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.goaway: int | None = None  # last stream id of a received GOAWAY
        self.closed = False
        self.serial = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def usable(self) -> bool:
        return not self.closed and self.goaway is None

    def request(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, H2Stream]:
        sid = self.conn.get_next_available_stream_id()
        stream = H2Stream(asyncio.get_running_loop().create_future())
        self.streams[sid] = stream
        self.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", self.client.authority),
                                     (":path", path), ("user-agent", "bluegreen-bench-h2"), *(headers or {}).items()],
                               end_stream=True)
        self.flush()
        return sid, stream

    def cancel(self, sid: int) -> None:
        import h2.errors

        self.streams.pop(sid, None)
        with contextlib.suppress(Exception):
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self.flush()

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_all(f"h2_protocol_error:{type(exc).__name__}")
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    headers = dict(ev.headers)
                    st.status = int(headers.get(":status", "0"))
                    st.env = headers.get(ENV_HEADER)
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                st = self.streams.get(ev.stream_id)
                if st is not None and len(st.body) < 300:
                    st.body += ev.data
            elif isinstance(ev, h2.events.StreamEnded):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    st.finish(None)
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    st.finish(f"stream_reset:{getattr(ev.error_code, 'name', ev.error_code)}")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev.last_stream_id
                self.client.goaways.append({"at": time.monotonic(), "last_stream_id": ev.last_stream_id,
                                            "error_code": getattr(ev.error_code, "name", str(ev.error_code)),
                                            "open_streams": len(self.streams)})
                for sid in [s for s in self.streams if s > ev.last_stream_id]:
                    self.streams.pop(sid).finish("goaway_unprocessed")  # never processed: safe to retry
        self.flush()
        if self.goaway is not None and not self.streams and self.transport is not None:
            self.transport.close()

    def _fail_all(self, error: str) -> None:
        for st in self.streams.values():
            st.finish(error)
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all("connection_lost" if self.goaway is None else "connection_lost_after_goaway")


class H2Client:
    """HTTP/2 with prior knowledge over one connection at a time, like a browser or a gRPC
    channel: a new connection only when the current one got a GOAWAY or was closed. A request
    that a GOAWAY marks as never processed is retried once on a new connection (what real clients
    do); those retries are counted."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.authority = f"{host}:{port}"
        self.current: H2Protocol | None = None
        self.connecting: asyncio.Future[H2Protocol] | None = None
        self.connections = 0
        self.goaways: list[dict[str, Any]] = []
        self.conn_class = _h2_connection_class()

    async def _connection(self) -> H2Protocol:
        if self.current is not None and self.current.usable:
            return self.current
        if self.connecting is None:
            self.connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self.connecting)

    async def _open(self) -> H2Protocol:
        try:
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(lambda: H2Protocol(self, self.conn_class), self.host, self.port)
            self.current = proto
            self.connections += 1
            proto.serial = self.connections
            return proto
        finally:
            self.connecting = None

    async def get(self, path: str, timeout: float, recorder: Recorder, headers: dict[str, str] | None = None) -> Result:
        import h2.exceptions

        conn: H2Protocol | None = None
        sid = 0
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(2):
                    conn = await self._connection()
                    sid, stream = conn.request(path, headers)
                    error = await stream.future
                    if error == "goaway_unprocessed" and attempt == 0:
                        recorder.goaway_retries += 1
                        continue
                    break
                serial = conn.serial if conn is not None else 0
                if error:
                    return Result(stream.status, stream.env, error, None, serial)
                ok = 200 <= stream.status < 300
                return Result(stream.status, stream.env, None, None if ok else stream.body.decode(errors="replace"), serial)
        except TimeoutError:
            if conn is not None and sid:
                conn.cancel(sid)
            return Result(error="timeout")
        except OSError as exc:
            return Result(error="connect_error", detail=str(exc))
        except h2.exceptions.H2Error as exc:
            return Result(error=f"h2_error:{type(exc).__name__}", detail=str(exc))

    async def close(self) -> None:
        if self.current is not None and self.current.transport is not None:
            self.current.transport.close()


async def loadgen_main(args: argparse.Namespace) -> int:
    """The child: open-loop load until told to stop on stdin (or stdin closes), then write the
    samples to --out. Commands are JSON lines: {"op": "extra", "path", "tag", "timeout"} starts one
    extra request now; {"op": "stop"} ends the run."""
    client: H1Client | H2Client = H1Client(args.host, args.port) if args.protocol == "http1" else H2Client(args.host, args.port)
    rec = Recorder()
    warm = await client.get("/", args.timeout, rec)
    if warm.status != 200:
        print(f"warm-up request failed: {warm}", flush=True)
        return 1
    rec = Recorder()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    load_tasks: set[asyncio.Task[None]] = set()
    extra_tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        sent = time.monotonic()
        result = await client.get(args.path, args.timeout, rec)
        rec.add(scheduled, sent, time.monotonic(), result)

    async def extra(cmd: dict[str, Any]) -> None:
        sent = time.monotonic()
        result = await client.get(cmd["path"], float(cmd.get("timeout", 130.0)), rec, cmd.get("headers"))
        rec.extras.append({"tag": cmd.get("tag"), "kind": cmd.get("kind", "long"), "path": cmd["path"],
                           "headers": cmd.get("headers"), "conn": result.conn, "sent": sent,
                           "done": time.monotonic(), "status": result.status, "env": result.env,
                           "error": result.error, "detail": result.detail})

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:  # the driver is gone
                break
            cmd = json.loads(line)
            if cmd["op"] == "extra":
                task = asyncio.create_task(extra(cmd))
                extra_tasks.add(task)
                task.add_done_callback(extra_tasks.discard)
            elif cmd["op"] == "stop":
                break
        stop.set()

    command_task = asyncio.create_task(commands())
    interval = 1.0 / args.rate
    began = time.monotonic()
    print(f"ready {began:.6f}", flush=True)
    n = 0
    while not stop.is_set():
        scheduled = began + n * interval
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # the clock paces the load
            continue
        task = asyncio.create_task(one(scheduled))
        load_tasks.add(task)
        task.add_done_callback(load_tasks.discard)
        n += 1
    command_task.cancel()
    # Every request has its own timeout, so this ends.
    await asyncio.gather(*load_tasks, *extra_tasks, return_exceptions=True)
    out = rec.to_json()
    t = os.times()
    out["cpu_seconds"] = round(t.user + t.system, 3)
    out["wall_seconds"] = round(time.monotonic() - began, 3)
    out["began"] = began
    out["protocol"] = args.protocol
    out["rate"] = args.rate
    if isinstance(client, H2Client):
        out["h2"] = {"connections": client.connections, "goaways": client.goaways}
    await client.close()
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(args.out)
    print("done", flush=True)
    return 0


class LoadGen:
    """Driver side of the load generator process."""

    def __init__(self, proc: Proc, out: Path, began: float) -> None:
        self.proc, self.out, self.began = proc, out, began
        self.longest_extra = 0.0

    @classmethod
    async def start(cls, host: str, port: int, protocol: str, rate: float, timeout: float, workdir: Path,
                    path: str = "/") -> "LoadGen":
        out = workdir / f"load-{protocol}.json"
        log = workdir / f"loadgen-{protocol}.log"
        proc = await Proc.start(f"loadgen-{protocol}", [sys.executable, str(Path(__file__).resolve()), "_loadgen",
                                                        "--host", host, "--port", str(port), "--protocol", protocol,
                                                        "--rate", str(rate), "--timeout", str(timeout), "--path", path,
                                                        "--out", str(out)], log, stdin=asyncio.subprocess.PIPE)
        line = await proc.wait_line("ready ", timeout=30)
        return cls(proc, out, float(line.split()[1]))

    def _send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.process.stdin is not None
        self.proc.process.stdin.write((json.dumps(cmd) + "\n").encode())

    def extra(self, path: str, tag: str, kind: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.longest_extra = max(self.longest_extra, timeout)
        self._send({"op": "extra", "path": path, "tag": tag, "kind": kind, "timeout": timeout, "headers": headers})

    async def stop(self, request_timeout: float) -> dict[str, Any]:
        self._send({"op": "stop"})
        with contextlib.suppress(Exception):
            await self.proc.process.stdin.drain()  # type: ignore[union-attr]
        try:
            await asyncio.wait_for(self.proc.process.wait(), self.longest_extra + request_timeout + 30)
        finally:
            await self.proc.stop()
        if not self.out.exists():
            raise RuntimeError(f"load generator wrote no results:\n{tail(self.proc.log)}")
        return json.loads(self.out.read_text())


async def launch_long(load: LoadGen, app_logs: list[Path], n: int, seconds: float, tag: str, timeout: float,
                      kind: str = "long", headers: list[dict[str, str] | None] | None = None) -> bool:
    """Start ``n`` slow requests and wait until the apps log them as started (in flight).
    ``headers``: request headers per request (or None)."""
    if n <= 0:
        return True
    before = count_slow_started(app_logs)
    for i in range(n):
        load.extra(f"/slow?seconds={seconds:g}", f"{tag}-{i + 1}", kind, seconds + timeout,
                   headers[i] if headers else None)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if count_slow_started(app_logs) >= before + n:
            return True
        await asyncio.sleep(0.01)
    return False


# ================================================================================================
# Phases and their analysis


@dataclass
class Phase:
    """One scenario. Times are CLOCK_MONOTONIC seconds; the report makes them relative."""

    name: str
    old_env: str | None  # environment the traffic leaves (None: no move)
    new_env: str | None
    t_start: float
    t_action: float | None = None  # the API call (or file rename) that moves traffic
    t_action_done: float | None = None  # the call returned / the change was seen applied
    t_final_weight: float | None = None  # the server's 100 % weight change (deployments)
    t_end: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Samples:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.sched, self.sent, self.done = raw["sched"], raw["sent"], raw["done"]
        self.status = raw["status"]
        self.env = [raw["env_names"][e] or None for e in raw["env"]]
        self.err = [raw["err_names"][e] or None for e in raw["err"]]
        self.conn = raw.get("conn") or [0] * len(self.sent)
        self.n = len(self.sent)

    def ok(self, i: int) -> bool:
        return self.err[i] is None and 200 <= self.status[i] < 300

    def failure_kind(self, i: int) -> str:
        return self.err[i] if self.err[i] else f"HTTP {self.status[i]}"


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def latency_stats(s: Samples, idx: list[int]) -> dict[str, Any] | None:
    """Latency from the *scheduled* start (open loop: waiting in the client counts)."""
    if not idx:
        return None
    lat = [(s.done[i] - s.sched[i]) * 1000 for i in idx]
    lag = [(s.sent[i] - s.sched[i]) * 1000 for i in idx]
    return {"n": len(idx), "p50_ms": round(percentile(lat, 50), 3), "p99_ms": round(percentile(lat, 99), 3),
            "max_ms": round(max(lat), 3), "client_lag_max_ms": round(max(lag), 3)}


def analyze_phase(s: Samples, ph: Phase) -> dict[str, Any]:
    """Failures, latency before / during / after, and when 100 % came from the new environment."""
    assert ph.t_end is not None
    idx = [i for i in range(s.n) if ph.t_start <= s.sent[i] < ph.t_end]
    out: dict[str, Any] = {"requests": len(idx)}
    failures = [i for i in idx if not s.ok(i)]
    out["failed"] = len(failures)
    out["failed_by_kind"] = dict(Counter(s.failure_kind(i) for i in failures))
    out["answered_by"] = dict(Counter(s.env[i] or "none" for i in idx if s.ok(i)))
    t_action = ph.t_action
    t_all_new = None
    if t_action is not None and ph.new_env is not None:
        after_idx = [i for i in idx if s.sent[i] >= t_action]
        not_new = [i for i in after_idx if not (s.ok(i) and s.env[i] == ph.new_env)]
        first_new = next((i for i in after_idx if s.ok(i) and s.env[i] == ph.new_env), None)
        out["first_new_ms"] = round((s.sent[first_new] - t_action) * 1000, 3) if first_new is not None else None
        if not not_new:
            t_all_new = t_action
        else:
            last_bad = max(not_new, key=lambda i: s.sent[i])
            later = [i for i in after_idx if s.sent[i] > s.sent[last_bad]]
            t_all_new = min(s.sent[i] for i in later) if later else None
            out["last_not_new"] = {"at_s": round(s.sent[last_bad] - t_action, 4), "env": s.env[last_bad],
                                   "failure": None if s.ok(last_bad) else s.failure_kind(last_bad)}
        old_after = [i for i in after_idx if s.ok(i) and s.env[i] == ph.old_env]
        out["old_env_responses_after_action"] = len(old_after)
        # Which client connections carried them, and whether those were opened before the action
        # (seen carrying a request sent before it).
        conns = {s.conn[i] for i in old_after if s.conn[i]}
        seen_before = {s.conn[i] for i in range(s.n) if s.sent[i] < t_action and s.conn[i]}
        out["old_env_after_action_connections"] = {"count": len(conns), "opened_before_action": len(conns & seen_before)}
        out["all_new_s"] = round(t_all_new - t_action, 4) if t_all_new is not None else None
        if ph.t_final_weight is not None and t_all_new is not None:
            out["all_new_after_final_weight_s"] = round(max(0.0, t_all_new - ph.t_final_weight), 4)
    # Windows: before the action; during (action .. switch complete, as the server and the
    # clients see it); after.
    if t_action is not None:
        settled = max(x for x in (t_action, ph.t_action_done, t_all_new) if x is not None)
        out["settled_s"] = round(settled - t_action, 4)
        windows = {"before": lambda t: t < t_action, "during": lambda t: t_action <= t <= settled,
                   "after": lambda t: t > settled}
    else:
        windows = {"steady": lambda t: True}
    out["latency"] = {}
    out["failed_by_window"] = {}
    out["answered_by_window"] = {}
    for name, inside in windows.items():
        w = [i for i in idx if inside(s.sent[i])]
        out["latency"][name] = latency_stats(s, w)
        out["failed_by_window"][name] = sum(1 for i in w if not s.ok(i))
        out["answered_by_window"][name] = dict(Counter(s.env[i] or "none" for i in w if s.ok(i)))
    out["failures"] = [{"at_s": round(s.sent[i] - (t_action or ph.t_start), 4), "kind": s.failure_kind(i),
                        "latency_ms": round((s.done[i] - s.sched[i]) * 1000, 1)} for i in failures[:200]]
    return out


def analyze_extras(raw: dict[str, Any], phases: list[Phase], t0: float) -> list[dict[str, Any]]:
    out = []
    for e in raw.get("extras", []):
        ph = next((p for p in phases if p.t_start <= e["sent"] < (p.t_end or math.inf)), None)
        row = {"tag": e["tag"], "kind": e["kind"], "path": e["path"], "headers": e.get("headers"), "conn": e.get("conn"),
               "phase": ph.name if ph else None,
               "sent_s": round(e["sent"] - t0, 4), "seconds": round(e["done"] - e["sent"], 3), "status": e["status"],
               "env": e["env"], "error": e["error"], "detail": e.get("detail")}
        spanned = []
        for p in phases:
            for at, label in p.events:
                if e["sent"] < at < e["done"]:
                    spanned.append(label)
        row["spanned"] = spanned
        out.append(row)
    return out


def relative(ph: Phase, t0: float) -> dict[str, Any]:
    rel = lambda t: None if t is None else round(t - t0, 4)  # noqa: E731
    return {"name": ph.name, "old_env": ph.old_env, "new_env": ph.new_env, "t_start": rel(ph.t_start),
            "t_action": rel(ph.t_action), "t_action_done": rel(ph.t_action_done),
            "t_final_weight": rel(ph.t_final_weight), "t_end": rel(ph.t_end),
            "events": [(rel(t), label) for t, label in ph.events], "server": ph.server, "notes": ph.notes}


def run_report(raw: dict[str, Any], phases: list[Phase], extra: dict[str, Any]) -> dict[str, Any]:
    """Everything about one run (one protocol, or one file-based variant) for the JSON."""
    s = Samples(raw)
    t0 = raw["began"]
    report = {**extra, "t0_monotonic": t0, "phases": []}
    for ph in phases:
        report["phases"].append({**relative(ph, t0), "figures": analyze_phase(s, ph)})
    report["extras"] = analyze_extras(raw, phases, t0)
    lag = [s.sent[i] - s.sched[i] for i in range(s.n)]
    report["client"] = {"requests": s.n, "goaway_retries": raw.get("goaway_retries", 0),
                        "cpu_percent_of_one_core": round(100 * raw["cpu_seconds"] / raw["wall_seconds"], 1) if raw.get("wall_seconds") else None,
                        "client_lag_max_ms": round(max(lag) * 1000, 2) if lag else None,
                        "client_lag_p99_ms": round(percentile(lag, 99) * 1000, 2) if lag else None,
                        **({"h2": raw["h2"]} if "h2" in raw else {})}
    # Raw samples, times relative to t0.
    rel = lambda xs: [round(x - t0, 5) for x in xs]  # noqa: E731
    report["samples"] = {"sched": rel(raw["sched"]), "sent": rel(raw["sent"]), "done": rel(raw["done"]),
                         "status": raw["status"], "env": raw["env"], "env_names": raw["env_names"],
                         "err": raw["err"], "err_names": raw["err_names"], "conn": raw.get("conn")}
    report["failure_details"] = [{**f, "sent": round(f["sent"] - t0, 5), "done": round(f["done"] - t0, 5)}
                                 for f in raw["failures"][:1000]]
    return report


# ================================================================================================
# Envoy admin


async def envoy_stats(session: Any, admin_port: int, pattern: str = "") -> dict[str, int]:
    """Counters and gauges from Envoy's admin /stats (text format), optionally filtered (regex)."""
    params = {"filter": pattern} if pattern else {}
    async with session.get(f"http://127.0.0.1:{admin_port}/stats", params=params) as response:
        text = await response.text()
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


INTERESTING = re.compile(
    r"(upstream_rq_(2xx|3xx|4xx|5xx|503|retry|retry_success|retry_overflow|timeout|per_try_timeout|rx_reset|tx_reset|"
    r"cancelled|pending_overflow|maintenance_mode|total)"
    r"|upstream_cx_(total|destroy|destroy_local|destroy_remote|destroy_with_active_rq|destroy_local_with_active_rq|"
    r"destroy_remote_with_active_rq|connect_fail|close_notify|protocol_error|overflow)"
    r"|downstream_rq_(2xx|4xx|5xx|rx_reset|tx_reset|total|completed)|downstream_cx_(total|http1_total|http2_total|"
    r"destroy_remote_active_rq|destroy_local_active_rq|drain_close|idle_timeout)|no_route|no_cluster|rq_direct_response"
    r"|update_success|update_rejected|update_failure|update_attempt|config_reload|listener_modified|listener_in_place_updated"
    r"|listener_removed|listener_added|cluster_removed|cluster_added|cluster_modified|active_clusters|total_listeners_draining"
    r"|total_filter_chains_draining|upstream_rq_active|downstream_rq_active|upstream_cx_active)$")


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {}
    for name in sorted(set(before) | set(after)):
        if not INTERESTING.search(name) or name.startswith("cluster.bluegreen_xds"):
            continue
        d = after.get(name, 0) - before.get(name, 0)
        if d:
            out[name] = d
    return out


# ================================================================================================
# Report helpers


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("aiohttp", "h2", "grpc", "google.protobuf"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
    envoy_version = None
    with contextlib.suppress(Exception):
        from controlplane.sandbox import find_envoy

        text = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, timeout=20).stdout
        m = re.search(r"version: (\S+)", text)
        envoy_version = m.group(1) if m else text.strip()
    load = None
    with contextlib.suppress(OSError):
        load = Path("/proc/loadavg").read_text().split()[:3]
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "loadavg_at_start": load, "packages": versions, "envoy": envoy_version}


def machine_line(m: dict[str, Any]) -> str:
    envoy = (m.get("envoy") or "").split("/")
    envoy_v = envoy[1] if len(envoy) > 1 else (m.get("envoy") or "?")
    return (f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, Envoy {envoy_v}, {m['date_utc']}, "
            f"load average at start {' '.join(m.get('loadavg_at_start') or [])}.")


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def fmt_lat(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    return f"{fmt_ms(stats['p50_ms'])} / {fmt_ms(stats['p99_ms'])} / {fmt_ms(stats['max_ms'])}"


def fmt_failed(fig: dict[str, Any]) -> str:
    if not fig["failed"]:
        return "0"
    kinds = ", ".join(f"{n}× {k}" for k, n in sorted(fig["failed_by_kind"].items(), key=lambda kv: -kv[1]))
    return f"**{fig['failed']}** ({kinds})"


def fmt_share(fig: dict[str, Any], env: str | None, window: str) -> str:
    counts = fig.get("answered_by_window", {}).get(window) or {}
    total = sum(counts.values())
    if not total or env is None:
        return "–"
    pct = 100 * counts.get(env, 0) / total
    return f"{pct:.0f}" if pct in (0, 100) or 1 <= pct <= 99 else f"{pct:.2f}"


def fmt_s(x: float | None, unit: str = "s") -> str:
    if x is None:
        return "–"
    if unit == "ms":
        return f"{x * 1000:.0f} ms" if x >= 0.1 else f"{x * 1000:.1f} ms"
    return f"{x:.3f} s"


def extras_table(runs: list[dict[str, Any]], label_key: str) -> list[str]:
    lines = ["| run | phase | request | answered by | result | took s | spanned |", "|---|---|---|---|---|---:|---|"]
    for run in runs:
        for e in run.get("extras", []):
            result = e["error"] or (f"HTTP {e['status']}" if e["status"] else "no response")
            hdrs = "".join(f" `{k}: {v}`" for k, v in (e.get("headers") or {}).items())
            lines.append(f"| {run[label_key]} | {e['phase']} | {e['kind']} `{e['path']}`{hdrs} | {e['env'] or '–'} | {result} "
                         f"| {e['seconds']:.2f} | {'; '.join(e['spanned']) or '–'} |")
    return lines


def write_chart(runs: list[dict[str, Any]], path: Path, title: str, label_key: str, bucket: float = 0.25) -> None:
    """Per run: share of responses per environment, failed requests, and latency p50/p99 per
    time bucket, with the phases' events marked (after controlplane/demo.py's write_chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(3 * len(runs), 1, figsize=(12, 6.2 * len(runs)), squeeze=False,
                             height_ratios=[3, 1, 1.4] * len(runs))
    for r, run in enumerate(runs):
        share_ax, err_ax, lat_ax = (axes[3 * r + k][0] for k in range(3))
        smp = run["samples"]
        env_names, err_names = smp["env_names"], smp["err_names"]
        counts: dict[int, Counter[str]] = defaultdict(Counter)
        lats: dict[int, list[float]] = defaultdict(list)
        for sent, done, sched, status, env, err in zip(smp["sent"], smp["done"], smp["sched"], smp["status"], smp["env"], smp["err"]):
            key = int(sent / bucket)
            ok = not err_names[err] and 200 <= status < 300
            counts[key]["error" if not ok else (env_names[env] or "unknown")] += 1
            lats[key].append((done - sched) * 1000)
        xs = sorted(counts)
        secs = [x * bucket for x in xs]
        totals = [sum(v for k, v in counts[x].items() if k != "error") for x in xs]
        # Step plots: a bucket's value holds over [start, start + bucket).
        for env, colour in (("blue", "#1f77b4"), ("green", "#2ca02c")):
            share_ax.step(secs, [100 * counts[x][env] / t if t else float("nan") for x, t in zip(xs, totals)],
                          where="post", label=env, color=colour, linewidth=1.2)
        share_ax.set_ylabel("% of responses")
        share_ax.set_ylim(-3, 103)
        share_ax.legend(loc="center right")
        share_ax.set_title(f"{title}: {run[label_key]} ({run.get('rate', '?')} req/s open loop, {bucket:g} s buckets)")
        err_ax.bar(secs, [counts[x]["error"] for x in xs], width=bucket, color="#d62728", align="edge")
        err_ax.set_ylabel("failed")
        p50 = [percentile(lats[x], 50) for x in xs]
        p99 = [percentile(lats[x], 99) for x in xs]
        lat_ax.step(secs, p50, where="post", color="#7f7f7f", linewidth=1, label="p50")
        lat_ax.step(secs, p99, where="post", color="#ff7f0e", linewidth=1, label="p99")
        lat_ax.set_yscale("log")
        lat_ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        lat_ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        lat_ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        lat_ax.set_ylabel("latency ms")
        lat_ax.legend(loc="upper right", fontsize=8)
        lat_ax.set_xlabel("seconds since the load began")
        index = 0
        for ph in run["phases"]:
            for at, label in ph["events"]:
                if at is None:
                    continue
                for ax in (share_ax, err_ax, lat_ax):
                    ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
                share_ax.annotate(" " + label, (at, 90 - 10 * (index % 4)), fontsize=7, ha="left", va="center",
                                  bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
                index += 1
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def install_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: main.cancel() if main else None)


def stamp_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def rel_path(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


# ================================================================================================
# The control-plane scenarios


class Admin:
    def __init__(self, session: Any, base: str) -> None:
        self.session, self.base = session, base

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, json=body) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.call(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path} -> {status}: {data}")
        return data

    async def cutover_histogram(self) -> tuple[float, float]:
        """(sum, count) of bluegreen_cutover_seconds for service demo."""
        _, text = await self.call("GET", "/metrics")
        total = count = 0.0
        for line in str(text).splitlines():
            if line.startswith('bluegreen_cutover_seconds_sum{service="demo"}'):
                total = float(line.split()[-1])
            elif line.startswith('bluegreen_cutover_seconds_count{service="demo"}'):
                count = float(line.split()[-1])
        return total, count


ROUTE_TIMEOUT = 15.0  # Envoy's default route timeout; the control plane's routes set none


def spanning_plan(steps: list[int], step_seconds: float, drain: int, standby: int) -> dict[str, Any]:
    """When to send the requests that must be in flight on blue at its decommission, and finish
    ~2.5 s after it, within Envoy's 15 s route timeout. As early as possible (blue's share is then
    the largest): before the API call (-1), else at a step below 100 %; with enough requests
    that at least one lands on blue with 99 % probability."""
    below = [w for w in steps if w < 100]
    for k in [-1, *range(len(below))]:
        remaining = len(below) - max(k, 0)
        to_decommission = (1.0 if k == -1 else 0.0) + remaining * step_seconds + drain + standby + 0.5
        seconds = to_decommission + 2.5
        if seconds <= ROUTE_TIMEOUT - 1:
            green = 0 if k == -1 else below[k]
            n = 1 if green == 0 else min(8, math.ceil(math.log(0.01) / math.log(green / 100)))
            return {"launch_at_step": k, "seconds": round(seconds, 1), "requests": n, "green_share_at_launch": green}
    return {"launch_at_step": None, "seconds": None, "requests": 0,
            "note": "no request can be in flight on blue at its decommission and end within Envoy's 15 s route timeout: "
                    "lower --step-seconds, --drain-seconds or --standby-seconds"}


def wall_to_mono(iso: str, offset: float) -> float:
    return dt.datetime.fromisoformat(iso).timestamp() - offset


async def wait_deployment(admin: Admin, dep_id: str, until: set[str], timeout: float,
                          on_poll: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], float]:
    """Poll (every 20 ms) until the deployment's status is in ``until``; returns it and when seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = await admin.ok("GET", f"/v1/deployments/{dep_id}")
        if on_poll is not None:
            on_poll(d)
        if d["status"] in until:
            return d, time.monotonic()
        await asyncio.sleep(0.02)
    raise RuntimeError(f"deployment {dep_id} did not reach {sorted(until)} within {timeout:g}s")


async def server_cutover(admin: Admin, before: tuple[float, float], timeout: float = 10.0) -> float | None:
    """The bluegreen_cutover_seconds observation of this deployment (observed after the ACKs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total, count = await admin.cutover_histogram()
        if count > before[1]:
            return (total - before[0]) / (count - before[1])
        await asyncio.sleep(0.05)
    return None


async def run_protocol(protocol: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import aiohttp

    from controlplane.sandbox import SandboxOptions, sandbox

    listener, preview = free_port(), free_port()
    envoy_admin = free_port()
    opts = SandboxOptions(listener_port=listener, preview_port=preview, xds=f"127.0.0.1:{free_port()}",
                          admin=f"127.0.0.1:{free_port()}", envoy_admin_port=envoy_admin, delta=args.delta)
    offset = time.time() - time.monotonic()  # wall-clock event times -> this machine's monotonic clock
    D = args.duration_per_phase
    phases: list[Phase] = []
    async with sandbox(opts, workdir) as info, aiohttp.ClientSession() as http:
        admin = Admin(http, f"http://{opts.admin}")
        app_logs = [workdir / "app-blue.log", workdir / "app-green.log"]
        await admin.ok("PUT", "/v1/services/demo", {"drain_seconds": args.drain_seconds, "standby_seconds": 3600})
        print(f"[{protocol}] sandbox up: Envoy :{listener}, blue {info['blue']}, green {info['green']}", file=sys.stderr, flush=True)
        stats0 = await envoy_stats(http, envoy_admin)
        load = await LoadGen.start("127.0.0.1", listener, protocol, args.rate, args.timeout, workdir)
        raw: dict[str, Any] | None = None
        try:
            warm = Phase("warm-up", None, None, load.began)
            warm.notes.append("connections opening; not a scenario")
            phases.append(warm)
            await asyncio.sleep(args.warmup)

            async def begin(name: str, old: str | None, new: str | None) -> Phase:
                now = time.monotonic()
                phases[-1].t_end = now
                ph = Phase(name, old, new, now)
                phases.append(ph)
                print(f"[{protocol}] {name}", file=sys.stderr, flush=True)
                ph.server["envoy_stats_before"] = await envoy_stats(http, envoy_admin)
                return ph

            async def long_requests(ph: Phase) -> None:
                if not await launch_long(load, app_logs, args.long_requests, args.long_seconds, f"{ph.name}-long", args.timeout):
                    ph.notes.append("long requests not seen in the app logs within 5 s; switched anyway")

            deploy_body = lambda steps: {"version": "v2", "endpoints": [info["green"]],  # noqa: E731
                                         "strategy": {"steps": steps, "step_seconds": args.step_seconds, "bake_seconds": 0}}

            async def deployment(ph: Phase, steps: list[int], on_poll: Callable[[dict[str, Any]], None] | None = None) -> None:
                hist0 = await admin.cutover_histogram()
                await long_requests(ph)
                ph.t_action = time.monotonic()
                created = await admin.ok("POST", "/v1/services/demo/deployments", deploy_body(steps))
                ph.events.append((ph.t_action, f"{ph.name}: deploy API call"))
                ph.server["api_seconds"] = round(time.monotonic() - ph.t_action, 4)
                d, seen = await wait_deployment(admin, created["id"], {"active", "failed", "rolled_back"},
                                                timeout=30 + len(steps) * args.step_seconds, on_poll=on_poll)
                if d["status"] != "active":
                    raise RuntimeError(f"deployment {created['id']} ended {d['status']}: {d.get('reason')}")
                ph.t_action_done = seen
                ph.server["deployment"] = created["id"]
                ph.server["history"] = [{"status": e["status"], "reason": e.get("reason"),
                                         "after_api_s": round(wall_to_mono(e["at"], offset) - ph.t_action, 4)} for e in d["history"]]
                # The weight changes: one shifting event per step below 100, then the first
                # "active" event (the 100 % step; a later "active" event is the end of the bake).
                weights = iter(steps)
                for e in d["history"]:
                    if e["status"] in ("shifting", "active") and ph.t_final_weight is None:
                        t = wall_to_mono(e["at"], offset)
                        ph.events.append((t, f"{ph.name}: green {next(weights, '?')} %"))
                        if e["status"] == "active":
                            ph.t_final_weight = t
                ph.server["cutover_seconds"] = await server_cutover(admin, hist0)

            # 1. atomic
            ph = await begin("atomic", "blue", "green")
            await asyncio.sleep(D)
            await deployment(ph, [100])
            await asyncio.sleep(D)
            ph.server["envoy_stats"] = stats_delta(ph.server.pop("envoy_stats_before"), await envoy_stats(http, envoy_admin))

            # 2. rollback (blue is draining or on standby)
            ph = await begin("rollback", "green", "blue")
            await asyncio.sleep(D)
            await long_requests(ph)
            ph.t_action = time.monotonic()
            status, view = await admin.call("POST", "/v1/services/demo/rollback?wait=converged&timeout=10")
            ph.t_action_done = time.monotonic()
            if status != 200:
                raise RuntimeError(f"rollback -> {status}: {view}")
            ph.events.append((ph.t_action, "rollback: API call"))
            ph.server["rollback_convergence_seconds"] = view["convergence"]["seconds"]
            ph.server["rollback_wall_seconds"] = round(ph.t_action_done - ph.t_action, 4)
            ph.server["acked"] = f"{view['convergence']['acked']}/{view['convergence']['proxies']}"
            await asyncio.sleep(D)
            ph.server["envoy_stats"] = stats_delta(ph.server.pop("envoy_stats_before"), await envoy_stats(http, envoy_admin))

            # 3. stepped, and 4. drain and removal of blue, which begins at the stepped
            # deployment's 100 % step (blue drains, goes on standby for --standby-seconds and is
            # decommissioned automatically): phase 4 overlaps phase 3's after window.
            await admin.ok("PUT", "/v1/services/demo", {"standby_seconds": args.standby_seconds})
            blue_id = (await admin.ok("GET", "/v1/services/demo"))["environments"]["blue"]["deployment"]["id"]
            ph = await begin("stepped", "blue", "green")
            await asyncio.sleep(D)
            steps = [int(x) for x in args.steps.split(",")]
            plan = spanning_plan(steps, args.step_seconds, args.drain_seconds, args.standby_seconds)
            ph.server["spanning_plan"] = plan
            if plan["launch_at_step"] is None:
                ph.notes.append(plan["note"])
            # One request beyond Envoy's default route timeout (the routes set none).
            await launch_long(load, app_logs, 1, ROUTE_TIMEOUT + 5, "beyond-route-timeout", args.timeout, kind="beyond-15s")
            launched: list[asyncio.Task[bool]] = []

            def on_poll(d: dict[str, Any]) -> None:
                at = plan["launch_at_step"]
                if at is None or at == -1 or launched or d["status"] not in ("shifting", "active"):
                    return
                if d.get("step", -1) >= at:
                    launched.append(asyncio.create_task(launch_long(
                        load, app_logs, plan["requests"], plan["seconds"], "across-decommission", args.timeout,
                        kind="across-decommission")))
                    ph.events.append((time.monotonic(), "spanning requests sent"))

            if plan["launch_at_step"] == -1:  # before the API call: blue has 100 %
                await launch_long(load, app_logs, plan["requests"], plan["seconds"], "across-decommission", args.timeout,
                                  kind="across-decommission")
            await deployment(ph, steps, on_poll)
            await asyncio.gather(*launched)
            assert ph.t_final_weight is not None

            ph4 = Phase("drain+removal", "blue", None, ph.t_final_weight)
            ph4.notes.append("starts at the stepped deployment's 100 % step, so it overlaps the stepped phase's after window")
            phases.append(ph4)
            print(f"[{protocol}] drain+removal", file=sys.stderr, flush=True)
            ph4.server["envoy_stats_before"] = await envoy_stats(http, envoy_admin)
            active_clusters = lambda: envoy_stats(http, envoy_admin, r"^cluster_manager\.active_clusters$")  # noqa: E731
            clusters0 = (await active_clusters())["cluster_manager.active_clusters"]
            removed = None
            deadline = time.monotonic() + args.drain_seconds + args.standby_seconds + 20
            while time.monotonic() < deadline:
                if (await active_clusters())["cluster_manager.active_clusters"] < clusters0:
                    removed = time.monotonic()
                    break
                await asyncio.sleep(0.005)
            if removed is None:
                raise RuntimeError("blue's cluster was not removed from Envoy")
            d = await admin.ok("GET", f"/v1/deployments/{blue_id}")
            for e in d["history"]:
                t = wall_to_mono(e["at"], offset)
                if e["status"] == "standby" and t >= ph4.t_start:
                    ph4.events.append((t, "blue standby"))
                elif e["status"] == "decommissioned" and ph4.t_action is None:
                    ph4.t_action = t
                    ph4.events.append((t, "blue decommissioned"))
            ph4.t_action_done = removed
            ph4.events.append((removed, "blue cluster removed"))
            ph4.server["decommissioned_after_100_s"] = round(ph4.t_action - ph4.t_start, 4) if ph4.t_action else None
            ph4.server["cluster_removed_after_s"] = round(removed - ph4.t_action, 4) if ph4.t_action else None
            ph.t_end = max(ph.t_final_weight, ph.t_action_done or 0.0) + D
            ph4.t_end = removed + D
            await asyncio.sleep(max(ph.t_end, ph4.t_end) - time.monotonic())
            for p_ in (ph, ph4):
                p_.server["envoy_stats"] = stats_delta(p_.server.pop("envoy_stats_before"), await envoy_stats(http, envoy_admin))
            print(f"[{protocol}] stopping the load (waiting for the long-lived request)", file=sys.stderr, flush=True)
            raw = await load.stop(args.timeout)
        finally:
            if raw is None:
                await load.proc.stop()
        stats1 = await envoy_stats(http, envoy_admin)
    downstream = {k.split(".")[-1]: stats1.get(k, 0) - stats0.get(k, 0) for k in
                  ("http.http.downstream_cx_http1_total", "http.http.downstream_cx_http2_total", "http.http.downstream_rq_total")}
    report = run_report(raw, phases, {"protocol": protocol, "rate": args.rate, "envoy_downstream": downstream,
                                      "envoy_stats_whole_run": stats_delta(stats0, stats1)})
    return report


def cutover_markdown(report: dict[str, Any]) -> str:
    lines = [machine_line(report["machine"]) + " Control plane (with this driver), Envoy (--concurrency 1), both apps "
             "and the load generator share these CPUs.", ""]
    p = report["parameters"]
    lines.append(f"Open loop at {p['rate']:g} req/s; {p['duration_per_phase']:g} s of steady load before and after each action; "
                 f"steps {p['steps']} at {p['step_seconds']:g} s; drain {p['drain_seconds']} s; "
                 f"{p['long_requests']} × /slow?seconds={p['long_seconds']:g} before each switch. Latency in ms from the "
                 "scheduled start, p50 / p99 / max.")
    lines.append("")
    lines.append("| protocol | scenario | requests | failed | before | during | after | % new env before → after "
                 "| first new env | 100 % new env after API call | 100 % new env after 100 % weight | server-measured |")
    lines.append("|---|---|---:|---|---|---|---|---:|---:|---:|---:|---|")
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['protocol']} | failed: {run['error']} ||||||||||")
            continue
        for ph in run["phases"]:
            f = ph["figures"]
            lat = f["latency"]
            server = ph["server"]
            if ph["name"] == "warm-up":
                continue
            if ph["name"] in ("atomic", "stepped"):
                cut = server.get("cutover_seconds")
                srv = f"cutover (first weight change → all ACKed) {fmt_s(cut, 'ms') if cut is not None and cut < 1 else fmt_s(cut)}"
            elif ph["name"] == "rollback":
                srv = (f"API → all ACKed {fmt_s(server.get('rollback_convergence_seconds'), 'ms')} "
                       f"(HTTP call {fmt_s(server.get('rollback_wall_seconds'), 'ms')}, {server.get('acked')})")
            else:
                srv = (f"100 % → automatic decommission {fmt_s(server.get('decommissioned_after_100_s'))}; decommission → "
                       f"blue cluster gone from Envoy {fmt_s(server.get('cluster_removed_after_s'), 'ms')}")
            first = f.get("first_new_ms")
            lines.append(
                f"| {run['protocol']} | {ph['name']} | {f['requests']} | {fmt_failed(f)} | {fmt_lat(lat.get('before'))} "
                f"| {fmt_lat(lat.get('during'))} | {fmt_lat(lat.get('after'))} "
                f"| {fmt_share(f, ph['new_env'], 'before')} → {fmt_share(f, ph['new_env'], 'after')} "
                f"| {fmt_ms(first) + ' ms' if first is not None else '–'} "
                f"| {fmt_s(f.get('all_new_s'))} | {fmt_s(f.get('all_new_after_final_weight_s'))} | {srv} |")
    lines += ["", "Long requests: `long` ones start just before each switch (awaited in the app's log); `beyond-15s` "
              "outlasts Envoy's default 15 s route timeout; `across-decommission` ones are in flight on blue when it is "
              "decommissioned (sent at the step given in the JSON's spanning_plan; at a split some land on green):", ""]
    lines += extras_table([r for r in report["runs"] if "error" not in r], "protocol")
    for run in report["runs"]:
        if "error" in run:
            continue
        ds = run["envoy_downstream"]
        c = run["client"]
        extra = ""
        if "h2" in c:
            extra = (f"; h2 connections opened by the client {c['h2']['connections']}, GOAWAYs received {len(c['h2']['goaways'])}, "
                     f"requests retried because a GOAWAY marked them unprocessed {c['goaway_retries']}")
        lines.append("")
        lines.append(f"{run['protocol']}: Envoy counted {ds.get('downstream_cx_http1_total', 0)} HTTP/1.1 and "
                     f"{ds.get('downstream_cx_http2_total', 0)} HTTP/2 downstream connections{extra}; client lag (send − "
                     f"scheduled) p99 {c['client_lag_p99_ms']} ms, max {c['client_lag_max_ms']} ms; load generator CPU "
                     f"{c.get('cpu_percent_of_one_core')} % of one core.")
        errors = {k: v for k, v in run["envoy_stats_whole_run"].items()
                  if re.search(r"(5xx|503|reset|retry|timeout|overflow|with_active_rq|connect_fail|no_route|no_cluster|protocol_error)", k)}
        if errors:
            extra_5xx = sum(1 for e in run.get("extras", []) if e["status"] >= 500)
            lines.append("Envoy error-type counters over the run: " + ", ".join(f"`{k}` {v}" for k, v in errors.items())
                         + (f" (they include the {extra_5xx} long request(s) answered 5xx in the table above)" if extra_5xx else ""))
        for ph in run["phases"]:
            for note in ph.get("notes", []):
                if ph["name"] != "warm-up":
                    lines.append(f"Note ({ph['name']}): {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Blue/green cutover under open-loop load through a real Envoy (see bench/README.md).")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second, open loop (default 500)")
    parser.add_argument("--protocol", choices=["http1", "http2", "both"], default="both")
    parser.add_argument("--duration-per-phase", type=float, default=10.0,
                        help="seconds of steady load before and again after each scenario's action (default 10)")
    parser.add_argument("--step-seconds", type=float, default=5.0, help="hold per step of the stepped deployment (default 5)")
    parser.add_argument("--steps", default="10,50,100", help="steps of the stepped deployment (default 10,50,100)")
    parser.add_argument("--drain-seconds", type=int, default=2, help="service drain_seconds (default 2)")
    parser.add_argument("--standby-seconds", type=int, default=1,
                        help="service standby_seconds for the stepped deployment's old environment, after which it is "
                             "decommissioned automatically (default 1; the atomic one's standby is 3600 s, for the rollback)")
    parser.add_argument("--long-requests", type=int, default=2, help="slow requests started just before each switch (default 2)")
    parser.add_argument("--long-seconds", type=float, default=3.0, help="their duration (/slow?seconds=, default 3)")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout per request, s (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the first phase (default 2)")
    parser.add_argument("--delta", action="store_true", help="Envoy uses Delta ADS instead of State of the World")
    parser.add_argument("--bucket", type=float, default=0.25, help="chart time bucket, s (default 0.25)")
    parser.add_argument("--results-dir", default=str(BENCH / "results"))
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration_per_phase < 0:
        parser.error("--rate must be > 0 and --duration-per-phase >= 0")
    if args.steps.split(",")[-1] != "100":
        parser.error("--steps must end with 100")
    require_h2(parser, args.protocol)
    return args


def require_h2(parser: argparse.ArgumentParser, protocol: str) -> None:
    """The HTTP/2 client is built on the `h2` package (a bench-only dependency)."""
    if protocol in ("http2", "both"):
        try:
            import h2  # noqa: F401
        except ImportError:
            parser.error("--protocol http2/both needs the h2 package: pip install h2 (or use --protocol http1)")


async def amain(args: argparse.Namespace, argv: list[str]) -> int:
    install_signal_handlers()
    patch_sandbox_spawn()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = stamp_now()
    report: dict[str, Any] = {"command": ["bench/cutover.py", *argv], "machine": machine(),
                              "parameters": {k: v for k, v in vars(args).items() if k != "results_dir"}, "runs": []}
    protocols = ["http1", "http2"] if args.protocol == "both" else [args.protocol]
    workdir = Path(tempfile.mkdtemp(prefix="bluegreen-cutover-"))
    interrupted = False
    try:
        for protocol in protocols:
            run_dir = workdir / protocol
            run_dir.mkdir()
            try:
                report["runs"].append(await run_protocol(protocol, args, run_dir))
            except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
                print(f"[{protocol}] failed: {exc}", file=sys.stderr)
                for log in sorted(run_dir.glob("*.log")):
                    print(f"--- {log.name}:\n{tail(log, 15)}", file=sys.stderr)
                report["runs"].append({"protocol": protocol, "error": str(exc)[:500]})
    except asyncio.CancelledError:
        interrupted = True
        report["interrupted"] = True
        print("interrupted; every process started was stopped", file=sys.stderr)
    finally:
        Proc.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
    out = results / f"cutover-{stamp}.json"
    out.write_text(json.dumps(report))
    done = [r for r in report["runs"] if "error" not in r]
    if done:
        chart = results / f"cutover-{stamp}.png"
        write_chart(done, chart, "bluegreen cutover", "protocol", args.bucket)
        print(cutover_markdown(report))
        print(f"\nraw results: {rel_path(out)}\nchart: {rel_path(chart)}")
    else:
        print(f"no run completed; raw results: {rel_path(out)}")
    if interrupted:
        return 130
    return 0 if done and len(done) == len(report["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_loadgen":
        p = argparse.ArgumentParser()
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--protocol", choices=["http1", "http2"], required=True)
        p.add_argument("--rate", type=float, required=True)
        p.add_argument("--timeout", type=float, default=10.0)
        p.add_argument("--path", default="/")
        p.add_argument("--out", required=True)
        return asyncio.run(loadgen_main(p.parse_args(argv[1:])))
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args, argv))
    except KeyboardInterrupt:
        Proc.kill_all()
        return 130


if __name__ == "__main__":
    sys.exit(main())
