"""What grpc.aio itself costs per stream per push: the floor under bench/convergence.py.

    python bench/grpc_floor.py --streams 1000 --pushes 20

A do-nothing bidirectional-streaming server on loopback, with no xDS, no state and no callbacks:
each stream's task waits for a push signal, writes one 621-byte message (the size of an RDS
response at S = 1) and reads the client's one reply (its "ACK"). The client is one separate
process holding ``--streams`` channels, each its own HTTP/2 connection, that answers every
message at once. The server times each push from the signal to the last reply and reads its
own CPU time (all threads).

This is what any Python control plane on grpc.aio pays before doing anything; the difference
between it and bench/convergence.py at S = 1 is our own per-stream work. BDP pings are off on
both sides, as in the control plane and in the simulated Envoys (``--bdp`` turns them on).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import grpc

METHOD = ("floor.Floor", "Push")
PAYLOAD = b"x" * 621


def _identity(data: bytes) -> bytes:
    return data


def _options(bdp: bool) -> list[tuple[str, int]]:
    return [("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 1 if bdp else 0)]


async def serve(streams: int, pushes: int, bdp: bool) -> dict[str, object]:
    signals: list[asyncio.Event] = []
    replies = 0
    all_replied = asyncio.Event()

    async def handler(requests, context):  # type: ignore[no-untyped-def]
        nonlocal replies
        iterator = requests.__aiter__()
        await iterator.__anext__()  # hello
        signal_ = asyncio.Event()
        signals.append(signal_)
        while True:
            await signal_.wait()
            signal_.clear()
            await context.write(PAYLOAD)
            await iterator.__anext__()
            replies += 1
            if replies == streams:
                all_replied.set()

    server = grpc.aio.server(options=_options(bdp))
    handlers = {METHOD[1]: grpc.stream_stream_rpc_method_handler(handler, request_deserializer=_identity, response_serializer=_identity)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(METHOD[0], handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = subprocess.Popen([sys.executable, __file__, "_client", str(port), str(streams), "1" if bdp else "0"],
                              preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + 120
        while len(signals) < streams:
            if client.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"only {len(signals)} of {streams} streams connected")
            await asyncio.sleep(0.05)
        seconds = []
        cpu0 = time.process_time()
        for _ in range(pushes):
            replies = 0
            all_replied.clear()
            started = time.perf_counter()
            for signal_ in signals:
                signal_.set()
            await asyncio.wait_for(all_replied.wait(), 60)
            seconds.append(time.perf_counter() - started)
        cpu = (time.process_time() - cpu0) / pushes
    finally:
        client.kill()
        client.wait()
        await server.stop(0)
    seconds.sort()
    return {"streams": streams, "pushes": pushes, "bdp_probe": bdp, "p50_seconds": statistics.median(seconds),
            "max_seconds": seconds[-1], "server_cpu_seconds_per_push": cpu}


async def client(port: int, streams: int, bdp: bool) -> None:
    async def one() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1), *_options(bdp)[1:]])
        call = channel.stream_stream(f"/{METHOD[0]}/{METHOD[1]}", request_serializer=_identity, response_deserializer=_identity)()
        await call.write(b"hello")
        async for _ in call:
            await call.write(b"ack" * 20)

    await asyncio.gather(*(one() for _ in range(streams)))


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        asyncio.run(client(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1000])
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--bdp", action="store_true", help="leave grpc's BDP pings on (both sides)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs")
    print("| streams | pushes | BDP pings | p50 s | max s | server CPU s/push |\n|---:|---:|---|---:|---:|---:|")
    for streams in args.streams:
        r = asyncio.run(serve(streams, args.pushes, args.bdp))
        print(f"| {streams} | {args.pushes} | {'on' if args.bdp else 'off'} | {r['p50_seconds']:.3f} | {r['max_seconds']:.3f} "
              f"| {r['server_cpu_seconds_per_push']:.3f} |")
        print(json.dumps(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
