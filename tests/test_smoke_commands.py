"""Smoke commands run in their own process group and leave nothing behind on timeout or shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from controlplane.deploy import smoke as smoke_module
from controlplane.deploy.smoke import PreviewTarget, run_smoke
from controlplane.deploy.spec import Smoke
from tests.harness import wait_for

TARGET = PreviewTarget("http://127.0.0.1:9", ())


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not us counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _outliving_command(pidfile: Path) -> tuple[str, ...]:
    # A background child that ignores SIGTERM and would outlive the command: only killing the
    # whole group, with SIGKILL after the grace period, stops it.
    return ("sh", "-c", f'(trap "" TERM; sleep 300) & echo $! > {pidfile}; sleep 300')


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smoke_module, "KILL_GRACE_SECONDS", 0.5, raising=False)


async def test_timed_out_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    smoke = Smoke(commands=(_outliving_command(pidfile),), command_timeout_seconds=5)
    async with aiohttp.ClientSession() as session:
        passed, summary = await asyncio.wait_for(run_smoke(session, smoke, TARGET, {}), 60)
    assert not passed and "timed out after 5s" in summary
    child = int(pidfile.read_text())
    await wait_for(lambda: not _alive(child), timeout=10, message=f"background child {child} killed")


async def test_cancelled_smoke_run_kills_the_command_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    smoke = Smoke(commands=(_outliving_command(pidfile),), command_timeout_seconds=300)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(run_smoke(session, smoke, TARGET, {}))
        await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "", timeout=20, message="command started")
        child = int(pidfile.read_text())
        task.cancel()  # what the driver's shutdown does to a smoke run in progress
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 60)
    await wait_for(lambda: not _alive(child), timeout=10, message=f"background child {child} killed")


async def test_background_leftovers_of_a_finished_command_are_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # Exits at once, leaving a child that no longer holds our output pipe.
    command = ("sh", "-c", f'(trap "" TERM; exec sleep 300) >/dev/null 2>&1 & echo $! > {pidfile}')
    async with aiohttp.ClientSession() as session:
        passed, _ = await asyncio.wait_for(run_smoke(session, Smoke(commands=(command,)), TARGET, {}), 60)
    assert passed
    child = int(pidfile.read_text())
    await wait_for(lambda: not _alive(child), timeout=10, message=f"background child {child} killed")
