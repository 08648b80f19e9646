"""Pytest fixtures for relay databases; the builders and data behind them are in tests/relay_support.py.

Use from a test module with `pytest_plugins = ("tests.relay_fixtures",)` (and import helpers from
tests.relay_support, never from this module, so pytest can load it as a plugin):

- `relay_db`: a fresh, empty relay database, parametrized over (sqlite, postgresql, mysql) x (one-api, new-api);
- `sqlite_relay_db`: the same on SQLite only (both kinds), the quick one;
- `make_relay_db`: a factory, `await make_relay_db(RelayKind.NEW_API, "postgresql")`, for tests that pick;
- `mariadb`: the session's MariaDB server, started on first use and stopped at session end whatever happens.
  Skipped when `mariadbd` is not installed, unless `LEDGER_TEST_REQUIRE_MYSQL=1`, which makes that a failure.

Every database made is closed and dropped (server) or left in tmp_path (SQLite) after its test.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ledger_service.database import EmbeddedPostgres
from ledger_service.domain.relays import RelayKind
from tests.relay_support import DIALECTS, KINDS, MakeRelayDb, MariaDbServer, RelayDb, build_relay_db, find_program


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDbServer]:
    """The session's MariaDB server; skipped without `mariadbd`, failed instead with LEDGER_TEST_REQUIRE_MYSQL=1."""
    programs = [find_program(p) for p in ("mariadbd", "mariadb-install-db", "mariadb")]
    if None in programs:
        reason = "MariaDB is not installed (mariadbd, mariadb-install-db and the mariadb client are needed)"
        if os.environ.get("LEDGER_TEST_REQUIRE_MYSQL") == "1":
            pytest.fail(f"{reason}, and LEDGER_TEST_REQUIRE_MYSQL=1 requires it")
        pytest.skip(reason)
    mariadbd, install_db, client = (p for p in programs if p is not None)
    server = MariaDbServer(mariadbd, install_db, client)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def make_relay_db(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: EmbeddedPostgres
) -> AsyncIterator[MakeRelayDb]:
    """`await make_relay_db(kind, dialect)`: fresh relay databases, all closed and dropped after the test.

    The session's PostgreSQL is taken up front (starting it runs its own event loop, which cannot happen inside
    this fixture's); MariaDB only when a test asks for a MySQL database."""
    made: list[RelayDb] = []

    async def make(kind: RelayKind, dialect: str) -> RelayDb:
        maria = request.getfixturevalue("mariadb") if dialect == "mysql" else None
        db = await build_relay_db(kind, dialect, directory=tmp_path, postgres=postgres, mariadb=maria)
        made.append(db)
        return db

    try:
        yield make
    finally:
        for db in made:
            with contextlib.suppress(Exception):
                await db.close()


_COMBINATIONS = [pytest.param((kind, dialect), id=f"{dialect}-{kind.value}") for dialect in DIALECTS for kind in KINDS]


@pytest.fixture(params=_COMBINATIONS)
async def relay_db(request: pytest.FixtureRequest, make_relay_db: MakeRelayDb) -> RelayDb:
    """An empty relay database: every dialect x every kind."""
    kind, dialect = request.param
    return await make_relay_db(kind, dialect)


@pytest.fixture(params=[pytest.param(kind, id=f"sqlite-{kind.value}") for kind in KINDS])
async def sqlite_relay_db(request: pytest.FixtureRequest, make_relay_db: MakeRelayDb) -> RelayDb:
    """An empty SQLite relay database, of each kind: the quick one, no server involved."""
    kind: RelayKind = request.param
    return await make_relay_db(kind, "sqlite")
