"""The SQLite store under bad conditions: disk full, a cancelled caller, a second process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest

from controlplane.errors import StoreError
from controlplane.store.base import Txn
from controlplane.store.sqlite import open_sqlite_store
from tests.harness import REPO_ROOT, free_port, run_control_plane

# Runs in a child process: RLIMIT_FSIZE would otherwise cap every file pytest writes. SIGXFSZ
# is ignored so that crossing the limit makes write() fail with EFBIG, as a full disk does.
DISK_FULL_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    from controlplane.errors import StoreError
    from controlplane.store.base import Txn
    from controlplane.store.sqlite import open_sqlite_store

    async def main(directory):
        path = os.path.join(directory, "state.db")
        store = await open_sqlite_store(path)
        before = await store.commit(Txn().put("k", {"v": 1}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        biggest = max(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 16384, hard))
        result = {"before": before}
        try:
            await store.commit(Txn().put("k", {"v": 2, "pad": "x" * 4_000_000}))
            result["error"] = None
        except StoreError as exc:
            result["error"] = str(exc)
        result["after_failure"] = {"value": (await store.get("k")).value, "revision": await store.revision(),
                                   "listing": [e.value for e in (await store.list("")).entries]}
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
        result["next"] = await store.commit(Txn().put("k", {"v": 3}))
        await store.close()
        reopened = await open_sqlite_store(path)
        result["reopened"] = {"value": (await reopened.get("k")).value, "revision": await reopened.revision()}
        await reopened.close()
        print(json.dumps(result))

    asyncio.run(main(sys.argv[1]))
""")


def test_file_size_limit_commit_is_reported_rolled_back_and_recoverable(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    before = result["before"]
    # EFBIG reaches SQLite as a failed write (SQLITE_IOERR_WRITE); the message says what may cause it.
    assert result["error"] is not None and result["error"].startswith("I/O error writing the state file"), result["error"]
    assert "file size limit" in result["error"] and str(tmp_path / "state.db") in result["error"]
    # Memory and disk agree on the state before the failed write ...
    assert result["after_failure"] == {"value": {"v": 1}, "revision": before, "listing": [{"v": 1}]}
    # ... and once space is back the next write takes the next revision and is durable.
    assert result["next"] == before + 1
    assert result["reopened"] == {"value": {"v": 3}, "revision": before + 1}


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk (ENOSPC). Needs root; skipped where mounting is refused."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount command here")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full; return it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


async def test_disk_full_commit_is_reported_rolled_back_and_recoverable(small_tmpfs: Path) -> None:
    path = small_tmpfs / "state.db"
    store = await open_sqlite_store(path)
    try:
        before = await store.commit(Txn().put("k", {"v": 1}))
        filler = _fill(small_tmpfs)
        with pytest.raises(StoreError) as info:
            await store.commit(Txn().put("k", {"v": 2, "pad": "x" * 1_000_000}))
        assert str(info.value).startswith(f"disk full: sqlite store {path}"), str(info.value)
        assert (await store.get("k")).value == {"v": 1}  # type: ignore[union-attr]
        assert await store.revision() == before
        assert [e.value for e in (await store.list("")).entries] == [{"v": 1}]
        filler.unlink()  # space is back
        assert await store.commit(Txn().put("k", {"v": 3})) == before + 1
    finally:
        await store.close()
    reopened = await open_sqlite_store(path)
    try:
        assert (await reopened.get("k")).value == {"v": 3}  # type: ignore[union-attr]
        assert await reopened.revision() == before + 1
    finally:
        await reopened.close()


async def test_cancelled_commit_is_still_notified_to_watchers(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await open_sqlite_store(path)
    try:
        watch = store.watch()
        assert await anext(watch) == 0
        # Another connection holds the write lock, so our commit waits inside the writer thread
        # (busy_timeout) when its caller goes away.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        commit = asyncio.create_task(store.commit(Txn().put("services/shop", {"name": "shop"})))
        await asyncio.sleep(0)  # one loop turn: the task hands the transaction to the writer thread
        commit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await commit
        blocker.execute("ROLLBACK")
        blocker.close()
        assert await asyncio.wait_for(anext(watch), 10) == 1  # the publisher would hear of it
        assert (await store.get("services/shop")).value == {"name": "shop"}  # type: ignore[union-attr]
        assert await store.revision() == 1
    finally:
        await store.close()


async def test_locked_store_refuses_a_second_opener_and_releases_on_close(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = await open_sqlite_store(path, lock=True)
    try:
        with pytest.raises(StoreError) as info:
            await open_sqlite_store(path, lock=True)
        message = str(info.value)
        assert f"state file {path} is in use by another control plane process (pid {os.getpid()}" in message
        assert f"{path}.lock" in message
        # Without lock=True (two writers in one test process), opening is still allowed.
        unlocked = await open_sqlite_store(path)
        await unlocked.close()
    finally:
        await first.close()
    again = await open_sqlite_store(path, lock=True)
    await again.close()


async def test_second_serve_process_on_one_state_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    async with run_control_plane(state_path=state) as cp:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane", "serve", "--state", str(state),
            "--xds", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}",
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(second.communicate(), 60)
        finally:
            if second.returncode is None:
                second.kill()
                await second.wait()
        text = stderr.decode()
        assert second.returncode == 2, text
        assert f"state file {state} is in use by another control plane process (pid {cp.process.pid}" in text
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{cp.admin_url}/healthz") as resp:
                assert resp.status == 200  # the first keeps serving
