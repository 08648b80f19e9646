"""The command line as an operator uses it: serve with no settings, migrate, create-key, bad settings."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ledger_service.settings import Settings
from tests.processes import AUTH, service_process
from tests.support import LedgerClient


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "ledger_service", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_serve_with_no_settings_starts_its_own_postgres(tmp_path: Path) -> None:
    data_dir = tmp_path / "ledger-data"
    async with service_process(None, LEDGER_DATA_DIR=str(data_dir)) as client:
        health = await client.get("/health")
        assert health.json() == {"status": "ok", "database": "ok"}
        topup = {"user_id": 1, "amount": 10, "reference": "first"}
        assert (await client.post("/v1/topups", json=topup, headers=AUTH)).status_code == 201
        assert (data_dir / "PG_VERSION").exists()  # migrated and serving from the embedded server
        assert (await client.get("/schema/openapi.json")).status_code == 200
    # Stopping the service stops the embedded server it started.
    assert not (data_dir / "postmaster.pid").exists()

    # The data survives a restart.
    async with service_process(None, LEDGER_DATA_DIR=str(data_dir)) as client:
        user = (await client.get("/v1/users/1", headers=AUTH)).json()
        assert user["available"] == 10


async def test_create_key_prints_a_working_secret_once(ledger: LedgerClient, database_url: str) -> None:
    result = await asyncio.to_thread(
        run_cli, "create-key", "--role", "auditor", "--name", "finance", LEDGER_DATABASE_URL=database_url
    )
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip().splitlines()[-1]
    stored = await ledger.conn.fetchrow("SELECT role, key_hash FROM api_keys WHERE name = 'finance'")
    assert stored is not None
    assert stored["role"] == "auditor"
    assert bytes(stored["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    response = await ledger.client.get("/v1/users/1", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200


async def test_migrate_is_idempotent(database_url: str) -> None:
    for _ in range(2):
        result = await asyncio.to_thread(run_cli, "migrate", LEDGER_DATABASE_URL=database_url)
        assert result.returncode == 0, result.stderr
        assert "migrations applied" in result.stdout


def test_a_bad_setting_is_named_and_nothing_starts() -> None:
    result = run_cli("serve", LEDGER_HOLD_TTL_SECONDS="ten")
    assert result.returncode == 2
    assert "LEDGER_HOLD_TTL_SECONDS must be an integer" in result.stderr


def listing(folder: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """Everything under the folder, itself included, with mode, owner, group, size and mtime: to compare."""
    return {
        str(path.relative_to(folder)): (stat.st_mode, stat.st_uid, stat.st_gid, stat.st_size, stat.st_mtime_ns)
        for path in (folder, *folder.rglob("*"))
        for stat in (path.lstat(),)
    }


def assert_refused(result: subprocess.CompletedProcess[str], problem: str) -> None:
    """Status 2 and one line naming the variable, as for the other settings."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("ledger-service: LEDGER_DATA_DIR must be ")
    assert problem in result.stderr


def not_a_data_directory(tmp_path: Path) -> Path:
    """A folder for something else: a log file in it."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_text("a line of someone else's log\n")
    return tmp_path / "logs"


def a_file(tmp_path: Path) -> Path:
    (tmp_path / "data").write_text("not a directory\n")
    return tmp_path / "data"


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "data").write_text("not a directory\n")
    return tmp_path / "data" / "pgdata"  # cannot be created


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(not_a_data_directory, "not empty, and no PG_VERSION", id="a-folder-of-other-files"),
        pytest.param(a_file, "not a directory", id="a-file"),
        pytest.param(under_a_file, "Not a directory", id="under-a-file"),
    ],
)
def test_a_data_dir_postgres_cannot_use_is_named_and_left_untouched(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    data_dir = make(tmp_path)
    before = listing(tmp_path)
    result = run_cli("serve", LEDGER_DATA_DIR=str(data_dir))
    assert_refused(result, problem)
    assert str(data_dir) in result.stderr
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "command",
    [["migrate"], ["create-key", "--role", "auditor", "--name", "x"], ["snapshot"], ["reconcile"]],
    ids=lambda command: command[0],
)
def test_every_command_that_starts_the_embedded_server_refuses_it_too(tmp_path: Path, command: list[str]) -> None:
    data_dir = not_a_data_directory(tmp_path)
    before = listing(tmp_path)
    assert_refused(run_cli(*command, LEDGER_DATA_DIR=str(data_dir)), "not empty, and no PG_VERSION")
    assert listing(tmp_path) == before


def test_an_empty_data_dir_is_initialised_and_then_used(tmp_path: Path) -> None:
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    for _ in range(2):  # empty, then a PostgreSQL data directory
        result = run_cli("migrate", LEDGER_DATA_DIR=str(data_dir))
        assert result.returncode == 0, result.stderr
        assert "migrations applied" in result.stdout
        assert (data_dir / "PG_VERSION").exists()
    assert not (data_dir / "postmaster.pid").exists()


def test_unknown_role_is_refused() -> None:
    result = run_cli("create-key", "--role", "root", "--name", "x")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_an_unknown_bench_scenario_is_refused_before_anything_starts() -> None:
    result = run_cli("bench", "--scenarios", "single,singel")
    assert result.returncode == 2
    assert "unknown scenarios singel" in result.stderr
    assert "starting" not in result.stderr  # no PostgreSQL was started for it


async def test_processes_starting_together_bootstrap_the_admin_key_once(database_url: str) -> None:
    from ledger_service.db.engine import create_engine
    from ledger_service.services.api_keys import ApiKeyService

    engine = create_engine(database_url, pool_size=8)
    try:
        keys = ApiKeyService(engine)
        created = await asyncio.gather(*(keys.ensure("lsk_bootstrap-race") for _ in range(8)))
        assert sorted(created) == [False] * 7 + [True]
    finally:
        await engine.dispose()


def test_libpq_sslmode_is_understood() -> None:
    from ledger_service.db.engine import async_url

    assert async_url("postgresql://u:p@db:5432/ledger?sslmode=require") == (
        "postgresql+asyncpg://u:p@db:5432/ledger?ssl=require"
    )


def test_a_short_admin_key_is_refused_at_start() -> None:
    """Only the secret's unsalted SHA-256 is stored: a short secret could be guessed from a leaked hash."""
    result = run_cli("serve", LEDGER_ADMIN_KEY="fifteen-chars!!")
    assert result.returncode == 2, result.stderr
    assert result.stderr == "ledger-service: LEDGER_ADMIN_KEY must be at least 16 characters, got 15\n"
    assert Settings.from_env({"LEDGER_ADMIN_KEY": "sixteen-chars!!!"}).admin_key == "sixteen-chars!!!"


async def test_reconcile_statements_are_not_cut_off_at_the_services_60_s(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a journal of a million requests one check's statement runs past 60 s; by hand, the check must finish."""
    import argparse

    from ledger_service import cli
    from ledger_service.db import engine as engine_module
    from ledger_service.settings import Settings

    timeouts: list[float | None] = []
    create_engine = engine_module.create_engine

    def recording(url: str, **options: Any) -> Any:
        timeouts.append(options.get("command_timeout", 60))
        return create_engine(url, **options)

    monkeypatch.setattr(engine_module, "create_engine", recording)
    status = await asyncio.to_thread(cli.cmd_reconcile, argparse.Namespace(), Settings(database_url=database_url))
    assert status == 0, capsys.readouterr()
    assert timeouts == [None]
