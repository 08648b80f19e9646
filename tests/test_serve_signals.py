"""`serve` stopped by a signal stops the embedded PostgreSQL it started, whenever the signal comes.

Each test runs `python -m ledger_service serve` with no LEDGER_DATABASE_URL and a fresh LEDGER_DATA_DIR, so the
service starts its own server, then signals it as a supervisor would (systemd, `timeout` and `kill` send SIGTERM,
a terminal SIGINT). A stop is how a server's run ends: the exit status is 0, whenever the signal came.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest

from tests.processes import ServiceProcess, eventually

SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]


def running(pid: int) -> bool:
    """Whether that process exists and has not exited (a zombie has exited; only its parent has not noticed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user (as root, the embedded server runs as a user of its own)
    with contextlib.suppress(FileNotFoundError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in {"Z", "X"}
    return True


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the server that holds the data directory, from its postmaster.pid; None without one."""
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):  # ValueError: half-written
        return None


async def stop_with(service: ServiceProcess, sig: signal.Signals) -> int:
    """Send the signal; the exit status, once the process has ended."""
    assert service.process is not None
    service.process.send_signal(sig)
    async with asyncio.timeout(60):
        return await service.process.wait()


def assert_no_server_holds(data_dir: Path, pids: set[int], service: ServiceProcess) -> None:
    """A server that was stopped removed its postmaster.pid; one left running (or killed) keeps it."""
    assert not (data_dir / "postmaster.pid").exists(), f"a server still holds {data_dir}:\n{service.logged()}"
    assert not [pid for pid in pids if running(pid)], f"PostgreSQL still runs:\n{service.logged()}"


def stop_leftover_server(data_dir: Path) -> None:
    """After a failure, do not leave a server behind for the rest of the suite (SIGQUIT: immediate shutdown)."""
    pid = postmaster_pid(data_dir)
    if pid is not None and running(pid):
        os.kill(pid, signal.SIGQUIT)


@pytest.mark.parametrize(
    ("sig", "workers"),
    [
        pytest.param(signal.SIGTERM, "1", id="SIGTERM"),
        pytest.param(signal.SIGINT, "1", id="SIGINT"),
        pytest.param(signal.SIGTERM, "2", id="SIGTERM-2-workers"),  # uvicorn's supervisor process, then
    ],
)
async def test_a_stop_signal_while_serving_stops_the_embedded_server(
    tmp_path: Path, sig: signal.Signals, workers: str
) -> None:
    data_dir = tmp_path / "ledger-data"
    service = ServiceProcess(None, settings={"LEDGER_DATA_DIR": str(data_dir), "LEDGER_WORKERS": workers})
    try:
        await service.start()  # polls /health until it serves
        pid = postmaster_pid(data_dir)
        assert pid is not None
        assert running(pid)
        status = await stop_with(service, sig)
        assert_no_server_holds(data_dir, {pid}, service)
        assert status == 0, service.logged()
    finally:
        await service.stop()
        stop_leftover_server(data_dir)
        service.close()


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize(
    "landmark",
    [
        pytest.param("PG_VERSION", id="during-initdb"),  # initdb writes it first
        pytest.param("log", id="during-server-start"),  # `pg_ctl start` opens the server's log; migrations follow
    ],
)
async def test_a_stop_signal_while_starting_stops_everything_and_spoils_nothing(
    tmp_path: Path, sig: signal.Signals, landmark: str
) -> None:
    data_dir = tmp_path / "ledger-data"
    settings = {"LEDGER_DATA_DIR": str(data_dir)}
    service = ServiceProcess(None, settings=settings)
    pids: set[int] = set()

    async def starting() -> bool:
        if (pid := postmaster_pid(data_dir)) is not None:
            pids.add(pid)  # initdb's own postgres, or the server
        return (data_dir / landmark).exists()

    try:
        await service.launch()
        await eventually(starting, every=0.02)
        status = await stop_with(service, sig)
        assert_no_server_holds(data_dir, pids, service)
        assert status == 0, service.logged()
    finally:
        await service.stop()
        stop_leftover_server(data_dir)
        service.close()

    # What the interrupted start left is a data directory the next start serves from (not a half-made one).
    again = ServiceProcess(None, settings=settings)
    try:
        await again.start()
    finally:
        await again.stop()
        stop_leftover_server(data_dir)
        again.close()


async def test_a_command_stopped_while_starting_the_server_stops_it_and_says_so(tmp_path: Path) -> None:
    """A one-shot command that is stopped did not do its job: 128 + the signal's number, as a shell reports it."""
    data_dir = tmp_path / "ledger-data"
    env = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger_service", "migrate",
        env={**env, "LEDGER_DATA_DIR": str(data_dir)}, stdout=PIPE, stderr=PIPE,
    )  # fmt: skip

    async def initdb_running() -> bool:
        return (data_dir / "PG_VERSION").exists()

    try:
        await eventually(initdb_running, every=0.02)
        migrate.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            _, stderr = await migrate.communicate()
        assert not (data_dir / "postmaster.pid").exists(), stderr.decode()
        assert migrate.returncode == 128 + signal.SIGTERM
        assert stderr.decode().splitlines()[-1] == "ledger-service: stopped by SIGTERM"
    finally:
        if migrate.returncode is None:
            migrate.kill()
            await migrate.wait()
        stop_leftover_server(data_dir)


async def test_after_a_crash_the_next_run_stops_the_server_it_took_over(tmp_path: Path) -> None:
    """A run killed outright (kill -9, the OOM killer) leaves its server running, and the next run uses it. The
    wheel stops a server only when the last process using it lets go, and the dead one never let go."""
    data_dir = tmp_path / "ledger-data"
    settings = {"LEDGER_DATA_DIR": str(data_dir)}
    crashed, again = ServiceProcess(None, settings=settings), ServiceProcess(None, settings=settings)
    try:
        await crashed.start()
        await crashed.kill()
        pid = postmaster_pid(data_dir)
        assert pid is not None
        assert running(pid)  # left behind

        await again.start()
        assert postmaster_pid(data_dir) == pid  # taken over
        status = await stop_with(again, signal.SIGTERM)
        assert_no_server_holds(data_dir, {pid}, again)
        assert status == 0, again.logged()
    finally:
        for service in (crashed, again):
            await service.stop()
            service.close()
        stop_leftover_server(data_dir)
