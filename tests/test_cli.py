"""The command line as an operator uses it: serve with no settings, migrate, create-key, bad settings."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path

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
