"""`import-relay` on real relay databases (SQLite, PostgreSQL, MariaDB; one-api and new-api), read over HTTP.

The service layer runs the imports in-process for the matrix; the command itself (exit codes, output, --dry-run,
--json) is run as an operator runs it, on SQLite.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.db.engine import create_engine
from ledger_service.domain.relay_import import MODEL_OPTIONS, parse_option_map
from ledger_service.domain.relays import RelayToken, RelayUser
from ledger_service.relay.source import open_source
from ledger_service.services.relay_import import ImportReport, RelayImport
from ledger_service.settings import Settings
from tests.relay_support import RelayData, RelayDb
from tests.support import LedgerClient
from tests.test_cli import run_cli

pytest_plugins = ("tests.relay_fixtures",)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=2)
    try:
        yield engine
    finally:
        await engine.dispose()


async def run_import(engine: AsyncEngine, settings: Settings, db: RelayDb, *, dry_run: bool = False) -> ImportReport:
    async with open_source(db.url) as source:
        return await RelayImport(engine, settings, page_size=3).run(source, dry_run=dry_run)


async def entry_count(ledger: LedgerClient) -> int:
    return int(await ledger.conn.fetchval("SELECT count(*) FROM entries"))


async def assert_books_equal_the_relay(ledger: LedgerClient, data: RelayData) -> None:
    """The contract's promise after an import: users, tokens and prices read as the relay has them."""
    for user in data.users:
        if user.deleted:
            continue
        view = (await ledger.get(f"/v1/users/{user.id}", as_="admin")).json()
        assert view["available"] + view["held"] == user.quota, user
    for token in data.tokens:
        response = await ledger.get(f"/v1/tokens/{token.id}", as_="admin")
        if token.deleted or not token.user_known:
            assert response.status_code == 404, token
            continue
        view = response.json()
        assert (view["user_id"], view["unlimited"]) == (token.user_id, token.unlimited), token
        assert view["remaining"] == (None if token.unlimited else token.remain_quota), token
    pricing = (await ledger.get("/v1/pricing", as_="admin")).json()
    for option, field in MODEL_OPTIONS.items():
        for name, value in parse_option_map(option, data.options.get(option, "{}"), []).items():
            assert pricing["models"][name][field] == str(value), (option, name)
    for name, value in parse_option_map("GroupRatio", data.options.get("GroupRatio", "{}"), []).items():
        assert pricing["groups"][name]["group_ratio"] == str(value), name


async def test_import_brings_the_books_over_and_reruns_post_only_what_moved(
    relay_db: RelayDb, ledger: LedgerClient, engine: AsyncEngine, settings: Settings
) -> None:
    data = await relay_db.realistic()
    checksum = await relay_db.checksum()

    first = await run_import(engine, settings, relay_db)
    await assert_books_equal_the_relay(ledger, data)
    assert await relay_db.checksum() == checksum
    openings = await ledger.conn.fetch("SELECT user_id, reference FROM entries WHERE kind = 'opening' ORDER BY 1")
    source_id = first.source.source_id
    quotas = {u.id: u.quota for u in data.users if not u.deleted}
    assert [r["user_id"] for r in openings] == sorted(uid for uid, quota in quotas.items() if quota != 0)
    assert all(r["reference"] == f"import:{source_id}:user:{r['user_id']}" for r in openings)
    assert sorted(first.debts) == sorted((uid, quota) for uid, quota in quotas.items() if quota < 0)
    listed = {(item.subject, item.key) for item in first.listed}
    assert {("model", "gpt-4(1)"), ("model", "claude-3-haiku(14)")} <= listed
    assert ("token", "6") in listed  # its user is gone

    # Nothing moved in the relay: nothing posted, even though the ledger moved a user in between.
    await ledger.post(
        "/v1/holds",
        {
            "request_id": "r-1",
            "user_id": 1,
            "token_id": 1,
            "group": "default",
            "model": "gpt-4",
            "prompt_tokens": 10,
            "max_tokens": 10,
        },
    )
    before = await entry_count(ledger)
    second = await run_import(engine, settings, relay_db)
    assert await entry_count(ledger) == before
    assert (second.summary()["users"]["opened"], second.summary()["users"]["adjusted"]) == (0, 0)

    # The relay moved: exactly the differences, one adjustment (user) and one allowance entry (token) each.
    await relay_db.set_user_quota(1, 5_000_123)
    await relay_db.set_user_quota(2, 0)
    await relay_db.set_token(1, remain_quota=999_000)
    checksum = await relay_db.checksum()
    last_before_third = await ledger.conn.fetchval("SELECT max(id) FROM entries")
    third = await run_import(engine, settings, relay_db)
    assert await relay_db.checksum() == checksum
    moved = await ledger.conn.fetch(
        "SELECT e.kind, e.user_id, e.token_id, e.reference, p.amount FROM entries e"
        " JOIN postings p ON p.entry_id = e.id AND p.account IN ('user:' || e.user_id, 'token:' || e.token_id)"
        " WHERE e.id > $1 ORDER BY e.id",
        last_before_third,
    )
    assert [(r["kind"], r["user_id"], r["token_id"], r["amount"]) for r in moved] == [
        ("adjustment", 1, None, 123),
        ("adjustment", 2, None, 12_345),
        ("allowance", 1, 1, -1_000),
    ]
    assert all(r["reference"].startswith(f"import:{source_id}:run:{third.run_id}:") for r in moved)
    view = (await ledger.get("/v1/users/2", as_="admin")).json()
    assert view["available"] + view["held"] == 0


async def test_dry_run_plans_and_posts_nothing(
    sqlite_relay_db: RelayDb, ledger: LedgerClient, engine: AsyncEngine, settings: Settings
) -> None:
    await sqlite_relay_db.realistic()
    before = await entry_count(ledger)
    pricing = (await ledger.get("/v1/pricing", as_="admin")).json()
    report = await run_import(engine, settings, sqlite_relay_db, dry_run=True)
    assert await entry_count(ledger) == before
    assert (await ledger.get("/v1/pricing", as_="admin")).json() == pricing
    assert await ledger.conn.fetchval("SELECT count(*) FROM relay_import_runs") == 0
    assert await ledger.conn.fetchval("SELECT count(*) FROM tokens") == 0
    assert report.run_id is None
    assert report.summary()["users"]["opened"] == len(report.opened()) > 0

    # The real run then does exactly what the dry run said.
    real = await run_import(engine, settings, sqlite_relay_db)
    assert real.summary() | {"finished": True} == report.summary() | {"finished": True}


async def test_a_token_owned_by_another_ledger_user_is_listed_and_left_alone(
    sqlite_relay_db: RelayDb, ledger: LedgerClient, engine: AsyncEngine, settings: Settings
) -> None:
    await sqlite_relay_db.add_users([RelayUser(1, 100), RelayUser(2, 100)])
    await sqlite_relay_db.add_tokens([RelayToken(5, 1, 40, False, 1)])
    await ledger.token(5, 2, remaining=7)
    report = await run_import(engine, settings, sqlite_relay_db)
    assert [(item.subject, item.key) for item in report.listed if item.subject == "token"] == [("token", "5")]
    view = (await ledger.get("/v1/tokens/5", as_="admin")).json()
    assert (view["user_id"], view["remaining"]) == (2, 7)


async def test_concurrent_runs_of_one_source_post_each_balance_once(
    sqlite_relay_db: RelayDb, ledger: LedgerClient, engine: AsyncEngine, settings: Settings
) -> None:
    await sqlite_relay_db.add_users([RelayUser(i, 1000 + i) for i in range(1, 41)])
    await asyncio.gather(*(run_import(engine, settings, sqlite_relay_db) for _ in range(3)))
    openings = await ledger.conn.fetchval("SELECT count(*) FROM entries WHERE kind IN ('opening', 'adjustment')")
    assert openings == 40
    for i in (1, 17, 40):
        assert (await ledger.get(f"/v1/users/{i}", as_="admin")).json()["available"] == 1000 + i


# The command -------------------------------------------------------------------------------------------------


async def cli(database_url: str, *args: str) -> Any:
    return await asyncio.to_thread(run_cli, "import-relay", *args, LEDGER_DATABASE_URL=database_url)


async def test_the_command_prints_a_summary_and_writes_json(
    sqlite_relay_db: RelayDb, ledger: LedgerClient, database_url: str, tmp_path: Path
) -> None:
    data = await sqlite_relay_db.realistic()
    plan = await cli(database_url, sqlite_relay_db.url, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "dry run: nothing was posted" in plan.stdout
    assert await entry_count(ledger) == 0

    out = tmp_path / "run.json"
    done = await cli(database_url, sqlite_relay_db.url, "--source-id", "relay-a", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "source id relay-a, run 1" in done.stdout
    assert "users" in done.stderr  # the progress bar
    document = json.loads(out.read_text())
    opened = {u.id: u.quota for u in data.users if not u.deleted and u.quota}
    assert {item["user_id"]: item["amount"] for item in document["users"]} == {
        u.id: u.quota for u in data.users if not u.deleted
    }
    assert document["summary"]["quota"]["opened"] == sum(opened.values())
    assert await ledger.conn.fetchval("SELECT count(*) FROM entries WHERE reference LIKE 'import:relay-a:user:%'") == (
        len(opened)
    )
    assert await ledger.conn.fetchval("SELECT summary->'users'->>'read' FROM relay_import_runs") == str(len(data.users))
    assert Decimal((await ledger.get("/v1/pricing", as_="admin")).json()["groups"]["svip"]["group_ratio"]) == Decimal(
        "2.50"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param("sqlite:///{tmp}/missing.db", "missing.db", id="missing file"),
        pytest.param("sqlite:///{tmp}/empty.db", "not a one-api or new-api database", id="not a relay"),
        pytest.param("oracle://x/y", "sqlite", id="unknown scheme"),
        pytest.param("mysql://root:s3cret@127.0.0.1:1/none", "127.0.0.1", id="unreachable server"),
    ],
)
async def test_a_source_it_cannot_read_is_one_line_and_status_2(
    source: str, message: str, ledger: LedgerClient, database_url: str, tmp_path: Path
) -> None:
    import sqlite3

    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE t (x int)").connection.close()
    result = await cli(database_url, source.format(tmp=tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ledger-service import-relay: ")
    assert message in lines[0]
    assert "s3cret" not in result.stderr
    assert await entry_count(ledger) == 0
    assert not (tmp_path / "missing.db").exists()  # opening a missing file did not create it


async def test_a_bad_source_id_is_refused(sqlite_relay_db: RelayDb, ledger: LedgerClient, database_url: str) -> None:
    result = await cli(database_url, sqlite_relay_db.url, "--source-id", "no spaces")
    assert (result.returncode, result.stderr.count("\n")) == (2, 1)
    assert "source id" in result.stderr
