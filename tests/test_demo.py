"""`bluegreen demo`, run as a user runs it: a short scripted release under open-loop load."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.harness import ManagedProcess, free_port, sample_environments, wait_for


def demo_argv(tmp_path: Path, chart: Path) -> list[str]:
    port, preview, xds, admin, envoy_admin = (free_port() for _ in range(5))
    return [sys.executable, "-m", "controlplane", "demo", "--rate", "50", "--step-seconds", "1", "--drain-seconds", "1",
            "--chart", str(chart), "--port", str(port), "--preview-port", str(preview), "--xds", f"127.0.0.1:{xds}",
            "--admin", f"127.0.0.1:{admin}", "--envoy-admin-port", str(envoy_admin)]


async def test_demo_runs_the_whole_story_without_a_failed_request(tmp_path: Path) -> None:
    chart = tmp_path / "demo.png"
    proc = await ManagedProcess.start(demo_argv(tmp_path, chart), name="demo", log_dir=tmp_path)
    try:
        code = await proc.wait(timeout=120)
        log = proc.log_text()
        assert code == 0, log
        for line in ("non-2xx          0", "connection errors/timeouts 0", "stepped cutover", "rollback ", "atomic cutover"):
            assert line in log, (line, log)
        assert "rollback to v1" in log and "answered by: blue" in log
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    finally:
        await proc.stop()


async def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    argv = demo_argv(tmp_path, tmp_path / "demo.png")
    port = argv[argv.index("--port") + 1]
    proc = await ManagedProcess.start(argv, name="demo", log_dir=tmp_path)
    try:
        await proc.expect_log("deploy v2, 10 -> 50 -> 100", timeout=60)
        proc.kill(signal.SIGINT)
        assert await proc.wait(timeout=30) == 130, proc.log_text()

        def envoy_gone() -> bool:
            return subprocess.run(["pgrep", "-f", "sandbox-envoy|bluegreen-demo-"], capture_output=True).returncode != 0

        await wait_for(envoy_gone, timeout=15, message="the demo's children stopped")
        assert await sample_environments(f"http://127.0.0.1:{port}/", 1) == {"error": 1}
    finally:
        await proc.stop()
