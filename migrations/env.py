"""Alembic environment: runs migrations over asyncpg, one process at a time (an advisory lock)."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from ledger_service.db.engine import async_url, asyncpg_dsn
from ledger_service.settings import Settings

MIGRATION_LOCK = 0x4C45444745520000
"""Advisory lock key: two processes starting at once migrate one after the other."""

config = context.config


def database_url() -> str:
    url = config.attributes.get("database_url") or Settings.from_env().database_url
    if not url:
        raise SystemExit("no database: set LEDGER_DATABASE_URL or run `ledger-service migrate`")
    return str(url)


def run_migrations_offline() -> None:
    context.configure(url=async_url(database_url()), literal_binds=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
    connection.commit()  # the lock is the session's; alembic then runs its own transactions
    try:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
        connection.commit()


async def run_migrations_online() -> None:
    # Opened by asyncpg on the service's DSN (db/engine.py): a cluster's URL reaches its primary. The advisory lock
    # is the session's, so this must reach PostgreSQL itself, not pgbouncer's transaction pooling.
    dsn = asyncpg_dsn(database_url())
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(dsn), poolclass=pool.NullPool
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
