"""Test harness: one embedded PostgreSQL per session, a migrated template database, a fresh clone per test.

Every test gets its own database (a file copy of the template, ~0.1 s), so tests cannot see each other's rows
and the immutability triggers never need to be bypassed to clean up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from litestar import Litestar

from ledger_service.api.app import create_app
from ledger_service.database import EmbeddedPostgres, migrate
from ledger_service.db.engine import create_engine
from ledger_service.db.lifecycle import SeenBalances, create_pool
from ledger_service.services.ledger import LedgerService
from ledger_service.services.lifecycle import LifecycleService
from ledger_service.settings import Settings
from tests.support import ADMIN_SECRET, LedgerClient

TEMPLATE = "ledger_template"
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns test output
_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    root = Path(tempfile.mkdtemp(prefix="ledger-test-"))
    server = EmbeddedPostgres(root / "pgdata", delete_on_stop=True)
    # Durability is not under test here; turning it off makes the suite several times faster.
    server.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
        " ALTER SYSTEM SET full_page_writes = off; SELECT pg_reload_conf();"
    )
    server.psql(f"CREATE DATABASE {TEMPLATE};")
    migrate(server.url(TEMPLATE))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database_url(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    admin = await asyncpg.connect(postgres.url())
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
    finally:
        await admin.close()
    yield postgres.url(name)
    admin = await asyncpg.connect(postgres.url())
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, admin_key=ADMIN_SECRET, background_tasks=False, pool_size=20)


@pytest.fixture
def app(settings: Settings) -> Litestar:
    return create_app(settings)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app served by a real uvicorn server on a loopback port.

    Litestar's in-process test client handles one request at a time; a real server lets requests sent together
    really run together, each on its own pooled database connection.
    """
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off only for sockets that name TCP as their protocol.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()  # startup failed: raise its error here
            await asyncio.sleep(0.01)
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as http:
            yield http
    finally:
        server.should_exit = True
        await serving
        sock.close()


@pytest.fixture
async def ledger(client: httpx.AsyncClient, database_url: str) -> AsyncIterator[LedgerClient]:
    """The service over HTTP, with an admin and a relay key, and a raw connection for checks behind its back."""
    conn = await asyncpg.connect(database_url)
    try:
        helper = LedgerClient(client, conn)
        await helper.start()
        yield helper
    finally:
        await conn.close()


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[LedgerService]:
    """The service layer without HTTP, for tests that drive it directly (the sweeper, snapshots)."""
    engine = create_engine(settings.database_url or "", pool_size=10)
    seen = SeenBalances()
    pool = await create_pool(settings.database_url or "", size=10, on_connect=seen.forget)
    try:
        yield LedgerService(engine, settings, LifecycleService(pool, settings, seen))
    finally:
        await pool.close()
        await engine.dispose()


@pytest.fixture
async def raw(database_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A plain connection to the test database, as the superuser, for SQL behind the service's back."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()
