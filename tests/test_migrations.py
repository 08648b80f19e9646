"""The migrations go up and down cleanly on an empty database, and the guards come back with them."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from alembic import command

from ledger_service.database import EmbeddedPostgres, alembic_config, migrate
from tests.support import functions_against_files


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


async def test_each_revision_downgrades_to_working_functions(empty_database: str) -> None:
    """Down to 0003 and up again: after each step that revision's lifecycle functions still run (a downgrade that
    left a function calling one it dropped would only fail at the next call), and every function is exactly its
    file as of that revision (migrations/sql)."""
    await asyncio.to_thread(migrate, empty_database)
    for revision in ("0003", "0004"):
        await asyncio.to_thread(command.downgrade if revision == "0003" else command.upgrade,
                                alembic_config(empty_database), revision)  # fmt: skip
        account = '["user:1", "quota"]' if revision == "0003" else '{"account": "user:1", "ledger": "quota"}'
        want = (
            f'{{"request_ids": ["r-1"], "token_ids": [1], "accounts": [{account}], "models": ["gpt-4o"],'
            ' "groups": ["default"]}'
        )
        conn = await asyncpg.connect(empty_database)
        try:
            assert await conn.fetchval("SELECT ledger_balance('user:1', 'quota')") == 0
            found = await conn.fetchval("SELECT ledger_lifecycle_read($1::jsonb)", want)
            assert '"requests": []' in found
            settings = await conn.fetchval("SELECT proconfig FROM pg_proc WHERE proname = 'ledger_lifecycle_apply'")
            assert (settings is None) is (revision == "0003")
            diff = await functions_against_files(conn)
            assert not diff, diff
        finally:
            await conn.close()


async def test_lifecycle_functions_plan_generically_from_0005(empty_database: str) -> None:
    """0005 gives each lifecycle function generic plans (kept per session, not made again per call), next to
    0004's `enable_seqscan = off`; its downgrade takes away only what it added (every function is its file as of
    each revision again)."""
    query = "SELECT proname, proconfig FROM pg_proc WHERE proname = ANY ($1) ORDER BY proname"
    names = ["ledger_balances", "ledger_check_posted_entries", "ledger_lifecycle_apply", "ledger_lifecycle_read",
             "ledger_lock_plan"]  # fmt: skip
    await asyncio.to_thread(migrate, empty_database)
    for revision, generic in (("0005", True), ("0004", False), ("0005", True)):
        if revision == "0004":
            await asyncio.to_thread(command.downgrade, alembic_config(empty_database), revision)
        else:
            await asyncio.to_thread(command.upgrade, alembic_config(empty_database), revision)
        conn = await asyncpg.connect(empty_database)
        try:
            rows = await conn.fetch(query, names)
            diff = await functions_against_files(conn)
        finally:
            await conn.close()
        assert not diff, diff
        assert [row["proname"] for row in rows] == names
        for row in rows:
            settings = set(row["proconfig"])
            assert "enable_seqscan=off" in settings
            assert ("plan_cache_mode=force_generic_plan" in settings) is generic, (revision, row["proname"])
