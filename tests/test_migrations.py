"""The migrations go up and down cleanly on an empty database, and the guards come back with them."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from alembic import command

from ledger_service.database import EmbeddedPostgres, alembic_config, migrate


@pytest.fixture
async def empty_database(postgres: EmbeddedPostgres) -> str:
    admin = await asyncpg.connect(postgres.url())
    try:
        await admin.execute("DROP DATABASE IF EXISTS migrations_roundtrip WITH (FORCE)")
        await admin.execute("CREATE DATABASE migrations_roundtrip")
    finally:
        await admin.close()
    return postgres.url("migrations_roundtrip")


async def tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


async def test_upgrade_downgrade_upgrade(empty_database: str) -> None:
    await asyncio.to_thread(migrate, empty_database)
    assert {"entries", "postings", "requests", "blocks", "balance_history"} <= await tables(empty_database)
    await asyncio.to_thread(command.downgrade, alembic_config(empty_database), "base")
    assert await tables(empty_database) == {"alembic_version"}
    await asyncio.to_thread(migrate, empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        entry_id = await conn.fetchval(
            "INSERT INTO entries (kind, hash) VALUES ('topup', decode(repeat('00', 32), 'hex')) RETURNING id"
        )
        with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO postings (entry_id, ledger, account, amount) VALUES ($1, 'quota', 'user:1', 5)",
                    entry_id,
                )
    finally:
        await conn.close()
