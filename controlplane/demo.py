"""`bluegreen demo`: the whole story in about a minute, under load, with a chart at the end.

It starts what ``bluegreen sandbox`` starts (control plane, a real Envoy, blue v1 and green v2),
then keeps an open-loop load running: requests are scheduled by the clock at a fixed rate, not
by the previous response, so a stall shows up as latency instead of hiding. Meanwhile it
deploys v2 with smoke tests and steps (10 -> 50 -> 100), rolls back, deploys forward again,
and waits for the old environment's drain. It prints live progress, a summary, writes a PNG chart
of the share per environment and the errors over time, and exits non-zero if any request failed.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .sandbox import SandboxOptions, sandbox

ENVIRONMENT_HEADER = "x-bluegreen-environment"


@dataclass(frozen=True)
class DemoOptions:
    rate: float = 100.0  # requests per second, open loop
    steps: tuple[int, ...] = (10, 50, 100)
    step_seconds: float = 5.0
    drain_seconds: int = 5
    chart: Path = Path("bluegreen-demo.png")
    sandbox: SandboxOptions = field(default_factory=SandboxOptions)


@dataclass
class Sample:
    start: float  # seconds since the load began
    latency: float
    status: int  # -1: connection error or timeout
    environment: str | None


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)


async def open_loop(url: str, rate: float, stop: asyncio.Event, load: Load, began: float) -> None:
    """Fire a request every 1/rate seconds until ``stop``; never wait for responses to send more."""
    interval = 1.0 / rate
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks: set[asyncio.Task[None]] = set()

        async def one(scheduled: float) -> None:
            try:
                async with session.get(url) as response:
                    await response.read()
                    load.samples.append(Sample(scheduled - began, time.monotonic() - scheduled, response.status,
                                               response.headers.get(ENVIRONMENT_HEADER)))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                load.samples.append(Sample(scheduled - began, time.monotonic() - scheduled, -1, None))

        n = 0
        while not stop.is_set():
            scheduled = began + n * interval
            delay = scheduled - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)  # the clock paces the load
                    break
                except asyncio.TimeoutError:
                    pass
            task = asyncio.create_task(one(scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)


class Admin:
    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None, **query: str) -> Any:
        async with self.session.request(method, self.base + path, json=body, params=query or None, headers=self.headers) as response:
            data = await response.json()
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {data.get('error')}")
            return data


def _progress(load: Load, since: float, phase: str, weights: dict[str, int]) -> str:
    recent = [s for s in load.samples if s.start >= since]
    window = max(1e-9, (recent[-1].start - since) if recent else 1.0)
    shares = Counter(s.environment for s in recent if 200 <= s.status < 300)
    ok = sum(shares.values())
    errors = sum(1 for s in load.samples if not 200 <= s.status < 300)
    share = " ".join(f"{env} {100 * shares[env] / ok:5.1f}%" for env in ("blue", "green")) if ok else "-"
    return (f"{phase:<28} weights blue {weights['blue']:>3} / green {weights['green']:>3}   "
            f"{len(recent) / window:6.0f} req/s   answered by: {share}   errors so far: {errors}")


async def _watch(admin: Admin, load: Load, began: float, stop: asyncio.Event, phase: list[str]) -> None:
    while not stop.is_set():
        view = await admin.call("GET", "/v1/services/demo")
        since = time.monotonic() - began - 1.0
        print(_progress(load, since, phase[0], view["traffic"]["weights"]), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def _wait_deployment(admin: Admin, deployment_id: str, until: set[str], timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = await admin.call("GET", f"/v1/deployments/{deployment_id}")
        if d["status"] in until and not d.get("baking"):
            return d
        await asyncio.sleep(0.2)  # polling the API: a person is watching, not a test
    raise RuntimeError(f"deployment {deployment_id} did not reach {sorted(until)} within {timeout:g}s")


def _cutover_seconds(d: dict[str, Any]) -> float:
    """From the first weight change of the shift to the event that reached 100 %."""
    from datetime import datetime

    times = [datetime.fromisoformat(e["at"]).timestamp() for e in d["history"] if e["status"] in ("shifting", "active")]
    return times[-1] - times[0] if len(times) >= 2 else 0.0


async def scenario(options: DemoOptions, admin: Admin, green: str, phase: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    await admin.call("PUT", "/v1/services/demo", {"drain_seconds": options.drain_seconds, "standby_seconds": 3600})
    deploy = {
        "version": "v2", "endpoints": [green],
        "strategy": {"steps": list(options.steps), "step_seconds": options.step_seconds, "bake_seconds": 0},
        "smoke": {"checks": [{"path": "/healthz", "body_contains": "ok"}]},
    }
    phase[0] = "deploy v2, 10 -> 50 -> 100"
    first = await admin.call("POST", "/v1/services/demo/deployments", deploy)
    d = await _wait_deployment(admin, first["id"], {"active", "failed", "rolled_back"})
    if d["status"] != "active":
        raise RuntimeError(f"deployment {first['id']} ended {d['status']}: {d.get('reason')}")
    results["cutover_seconds"] = _cutover_seconds(d)

    phase[0] = "rollback to v1"
    rolled = await admin.call("POST", "/v1/services/demo/rollback", wait="converged", timeout="10")
    results["rollback_seconds"] = rolled["convergence"]["seconds"]
    results["rollback_proxies"] = f"{rolled['convergence']['acked']}/{rolled['convergence']['proxies']}"
    await asyncio.sleep(options.step_seconds)  # let the chart show blue again for a moment

    phase[0] = "deploy v2 again (atomic)"
    again = await admin.call("POST", "/v1/services/demo/deployments", dict(deploy, strategy={"steps": [100], "bake_seconds": 0}))
    d = await _wait_deployment(admin, again["id"], {"active", "failed", "rolled_back"})
    if d["status"] != "active":
        raise RuntimeError(f"deployment {again['id']} ended {d['status']}: {d.get('reason')}")
    results["atomic_cutover_seconds"] = _cutover_seconds(d)

    phase[0] = f"blue draining ({options.drain_seconds}s)"
    records = (await admin.call("GET", "/v1/services/demo/deployments"))["deployments"]
    old = next(r for r in records if r["environment"] == "blue" and r["status"] in ("draining", "standby"))
    await _wait_deployment(admin, old["id"], {"standby", "decommissioned"}, timeout=options.drain_seconds + 60)
    return results


def write_chart(load: Load, path: Path, events: list[tuple[float, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets: dict[int, Counter[str]] = defaultdict(Counter)
    for s in load.samples:
        key = "error" if not 200 <= s.status < 300 else (s.environment or "unknown")
        buckets[int(s.start * 2)][key] += 1  # half-second buckets
    xs = sorted(buckets)
    totals = [sum(buckets[x].values()) for x in xs]
    seconds = [x / 2 for x in xs]
    fig, (share_ax, err_ax) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, height_ratios=[3, 1])
    for env, colour in (("blue", "#1f77b4"), ("green", "#2ca02c")):
        share_ax.plot(seconds, [100 * buckets[x][env] / t if t else 0 for x, t in zip(xs, totals)], label=env, color=colour)
    share_ax.set_ylabel("% of responses")
    share_ax.set_ylim(-3, 103)
    share_ax.legend(loc="center right")
    share_ax.set_title("bluegreen demo: share of responses per environment under open-loop load")
    err_ax.bar(seconds, [buckets[x]["error"] for x in xs], width=0.5, color="#d62728")
    err_ax.set_ylabel("failed requests")
    err_ax.set_xlabel("seconds")
    for index, (at, label) in enumerate(events):
        for ax in (share_ax, err_ax):
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
        # Staggered heights: phases can be a fraction of a second apart.
        share_ax.annotate(" " + label, (at, 92 - 9 * (index % 3)), fontsize=8, ha="left", va="center",
                          bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run_demo(options: DemoOptions) -> int:
    stop_demo = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: main_task.cancel() if main_task else None)
    with tempfile.TemporaryDirectory(prefix="bluegreen-demo-") as tmp:
        async with sandbox(options.sandbox, Path(tmp)) as info, aiohttp.ClientSession() as session:
            admin = Admin(session, f"http://{options.sandbox.admin}", info["token"])
            load = Load()
            began = time.monotonic()
            phase = ["steady: v1 on blue"]
            events: list[tuple[float, str]] = []
            url = f"http://127.0.0.1:{options.sandbox.listener_port}/"
            load_task = asyncio.create_task(open_loop(url, options.rate, stop_demo, load, began))
            watch_stop = asyncio.Event()
            watch_task = asyncio.create_task(_watch(admin, load, began, watch_stop, phase))
            results: dict[str, Any] = {}
            failure: str | None = None
            try:
                await asyncio.sleep(2.0)  # a baseline on blue for the chart

                async def track() -> None:
                    last = phase[0]  # the steady start needs no marker
                    while True:
                        if phase[0] != last:
                            events.append((time.monotonic() - began, phase[0].split(" (")[0]))
                            last = phase[0]
                        await asyncio.sleep(0.1)

                tracker = asyncio.create_task(track())
                try:
                    results = await scenario(options, admin, info["green"], phase)
                except RuntimeError as exc:
                    failure = str(exc)
                finally:
                    tracker.cancel()
                await asyncio.sleep(2.0)
            finally:
                stop_demo.set()
                watch_stop.set()
                await asyncio.gather(load_task, watch_task, return_exceptions=True)
            samples = load.samples
            failed = [s for s in samples if not 200 <= s.status < 300]
            resets = sum(1 for s in failed if s.status == -1)
            latencies = sorted(s.latency for s in samples)
            p = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000) if latencies else (lambda q: 0.0)
            write_chart(load, options.chart, events)
            print()
            print("summary")
            print(f"  requests         {len(samples)} at {options.rate:g}/s (open loop)")
            print(f"  non-2xx          {len(failed) - resets}")
            print(f"  connection errors/timeouts {resets}")
            print(f"  latency          p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {p(1.0):.1f} ms")
            if "cutover_seconds" in results:
                print(f"  stepped cutover  {results['cutover_seconds']:.1f} s ({'/'.join(map(str, options.steps))}, {options.step_seconds:g}s per step)")
                print(f"  rollback         {results['rollback_seconds'] * 1000:.1f} ms until {results['rollback_proxies']} proxies ACKed")
                print(f"  atomic cutover   {results['atomic_cutover_seconds'] * 1000:.1f} ms (decision to 100 %)")
            print(f"  chart            {options.chart.resolve()}")
            if failure:
                print(f"  FAILED: {failure}")
            return 1 if failed or failure else 0
