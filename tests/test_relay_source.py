"""relay/source.py against real relay databases: SQLite files, the session's PostgreSQL and a MariaDB server.

Every dialect x kind: the relay is recognised, every row comes back exactly (booleans, debts, soft-deletes, tokens
whose user is gone), options as raw text, logs in their window and order across page boundaries, and nothing is
ever written (checksums before and after, and a write through the source's own connection is refused).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledger_service.domain.relays import LOG_CONSUME, LOG_REFUND, RelayKind, RelayLog, RelayToken, RelayUser
from ledger_service.relay.source import RelaySource, SourceError, open_source
from tests.relay_support import MYSQL_PASSWORD, T0, MakeRelayDb, MariaDbServer, RelayDb, free_port

pytest_plugins = ("tests.relay_fixtures",)


async def read_all(
    source: RelaySource, *, batch: int = 2000, since: int = 0, until: int = 2**62
) -> tuple[list[RelayUser], list[RelayToken], list[RelayLog]]:
    users = [u async for page in source.users(batch) for u in page]
    tokens = [t async for page in source.tokens(batch) for t in page]
    logs = [g async for page in source.logs(since, until, batch) for g in page]
    return users, tokens, logs


async def test_recognises_the_relay_and_reads_every_row_back(relay_db: RelayDb) -> None:
    data = await relay_db.realistic()
    before = await relay_db.checksum()
    async with open_source(relay_db.url) as source:
        assert source.info.kind is relay_db.kind
        assert source.info.dialect == relay_db.dialect
        assert MYSQL_PASSWORD not in source.info.display_url
        assert source.info.source_id.startswith(f"{relay_db.kind.value}-")
        assert re.fullmatch(r"[a-z-]+-[0-9a-f]{10}", source.info.source_id)

        users, tokens, logs = await read_all(source)
        assert users == list(data.users)
        assert tokens == list(data.tokens)
        assert await source.options() == data.options
        assert logs == data.consume_logs()
        assert await source.count_users() == len(data.users)
        assert await source.count_tokens() == len(data.tokens)
        assert await source.count_logs(0, 2**62) == len(logs)

    # The awkward cases really are in there, with the dialect's own booleans and integers normalised.
    assert any(u.quota < 0 for u in users)
    assert any(t.unlimited for t in tokens)
    assert any(not t.unlimited for t in tokens)
    assert {t.status for t in tokens} >= {1, 2, 3, 4}
    assert [t.id for t in tokens if not t.user_known] == ([5, 6] if relay_db.is_new_api else [6])
    assert any(u.deleted for u in users) is relay_db.is_new_api
    assert any(t.deleted for t in tokens) is relay_db.is_new_api
    assert {g.type for g in logs} == ({LOG_CONSUME, LOG_REFUND} if relay_db.is_new_api else {LOG_CONSUME})
    if relay_db.is_new_api:
        assert all(g.token_id is not None and g.request_id is None for g in logs)
    else:
        assert all(g.token_id is None and g.request_id for g in logs)
    assert '"gemini-1.5-flash":0.075' in data.options["ModelRatio"]
    assert await relay_db.checksum() == before


async def test_pages_by_keyset_across_batch_boundaries_and_cuts_the_window(relay_db: RelayDb) -> None:
    new = relay_db.is_new_api
    users = [RelayUser(i, i * 1000 - 7_000, deleted=new and i % 5 == 0) for i in range(1, 24)]
    tokens = [RelayToken(i, (i % 30) + 1, i * 10, i % 3 == 0, 1 + i % 4, user_known=True) for i in range(1, 32)]
    logs = []
    for i in range(1, 48):
        # Ids out of time order, and three logs per second, so paging must follow (created_at, id).
        at = T0 + (50 - i) // 3
        logs.append(
            RelayLog(
                i, LOG_CONSUME, at, 1, i if new else None, f"token-{i}", 1, "gpt-4", i, i, i, None if new else f"r{i}"
            )
        )
    logs.append(RelayLog(100, 5, T0 + 3, 1, None, "", 1, "gpt-4", 0, 0, 0, None))  # an error log: never read
    await relay_db.add_users(users)
    await relay_db.add_tokens(tokens)
    await relay_db.add_logs(logs)
    expected = sorted((g for g in logs if g.type == LOG_CONSUME), key=lambda g: (g.created_at, g.id))

    async with open_source(relay_db.url) as source:
        pages = [page async for page in source.users(4)]
        assert [len(p) for p in pages] == [4, 4, 4, 4, 4, 3]
        assert [u for p in pages for u in p] == users
        read_tokens = [t async for page in source.tokens(5) for t in page]
        missing = {u.id for u in users if u.deleted} | set(range(24, 40))
        assert [(t.id, t.user_known) for t in read_tokens] == [(t.id, t.user_id not in missing) for t in tokens]
        for batch in (1, 2, 3, 5, 1000):
            assert [g async for page in source.logs(0, 2**62, batch) for g in page] == expected

        since, until = T0 + 3, T0 + 9  # since inclusive, until exclusive
        window = [g for g in expected if since <= g.created_at < until]
        assert {g.created_at for g in window} == set(range(since, until))
        assert [g async for page in source.logs(since, until, 2) for g in page] == window
        assert await source.count_logs(since, until) == len(window)
        assert [g async for page in source.logs(until, until, 2) for g in page] == []


async def test_a_write_through_the_sources_connection_is_refused(relay_db: RelayDb) -> None:
    await relay_db.realistic()
    before = await relay_db.checksum()
    async with open_source(relay_db.url) as source:
        [first, *_] = [u async for page in source.users() for u in page]
        engine = source._engine  # the source's own pool: the session settings under test live there
        with pytest.raises(sa.exc.DBAPIError) as refused:
            async with engine.begin() as conn:
                await conn.execute(sa.text("UPDATE users SET quota = quota + 1 WHERE id = :id"), {"id": first.id})
        message = str(refused.value.orig).lower()
        assert any(words in message for words in ("read-only", "readonly", "read only")), message
        with pytest.raises(sa.exc.DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(sa.text("INSERT INTO options (" + _key(relay_db) + ", value) VALUES ('x', 'y')"))
    assert await relay_db.checksum() == before


def _key(relay_db: RelayDb) -> str:
    return "`key`" if relay_db.dialect == "mysql" else '"key"'


async def test_source_ids_ignore_the_password_and_the_scheme_spelling(make_relay_db: MakeRelayDb) -> None:
    db = await make_relay_db(RelayKind.ONE_API, "sqlite")
    async with open_source(db.url) as a, open_source(db.url, source_id="prod-relay_1.main") as b:
        assert a.info.source_id != b.info.source_id == "prod-relay_1.main"
    with pytest.raises(SourceError, match="source id"):
        async with open_source(db.url, source_id="bad id!"):
            pass


async def test_mysql_urls_mask_the_password_and_share_one_source_id(
    make_relay_db: MakeRelayDb, mariadb: MariaDbServer
) -> None:
    db = await make_relay_db(RelayKind.NEW_API, "mysql")
    database = db.url.rsplit("/", 1)[1]
    ids = set()
    for scheme in ("mysql", "mariadb", "mysql+aiomysql"):
        async with open_source(mariadb.url(database, scheme=scheme)) as source:
            assert source.info.display_url == f"mysql://relay:***@127.0.0.1:{mariadb.port}/{database}"
            ids.add(source.info.source_id)
    assert len(ids) == 1


async def test_a_relative_sqlite_path_is_made_absolute(
    make_relay_db: MakeRelayDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await make_relay_db(RelayKind.NEW_API, "sqlite")
    assert db.path is not None
    monkeypatch.chdir(db.path.parent)
    async with open_source(f"sqlite:///{db.path.name}") as source:
        assert source.info.display_url == f"sqlite:///{db.path}"
        assert source.info.kind is RelayKind.NEW_API


def assert_one_line(error: SourceError, *fragments: str, secret: str = MYSQL_PASSWORD) -> None:
    text = str(error)
    assert "\n" not in text, text
    assert "Traceback" not in text, text
    assert secret not in text, text
    for fragment in fragments:
        assert fragment in text, text


async def open_fails(url: str) -> SourceError:
    with pytest.raises(SourceError) as caught:
        async with open_source(url):
            pass
    return caught.value


async def test_unusable_urls_and_files_give_one_line(tmp_path: Path) -> None:
    assert_one_line(await open_fails("oracle://u:pw@h/db"), "'oracle'", "sqlite:///", "mysql://", "postgresql://")
    assert_one_line(await open_fails("just a path.db"), "not a database URL")
    missing = tmp_path / "gone" / "one-api.db"
    assert_one_line(await open_fails(f"sqlite:///{missing}"), str(missing), "does not exist")
    assert not missing.parent.exists()  # never created
    assert_one_line(await open_fails(f"sqlite:///{tmp_path}"), "is a directory")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, just some bytes" * 200)
    assert_one_line(await open_fails(f"sqlite:///{garbage}"), "cannot open relay database", str(garbage))
    assert garbage.read_bytes() == b"this is not a database, just some bytes" * 200
    empty = tmp_path / "empty.db"
    empty.touch()  # SQLite reads an empty file as an empty database
    assert_one_line(
        await open_fails(f"sqlite:///{empty}"),
        "is not a one-api or new-api database: no table users, tokens, options, logs",
    )
    assert empty.read_bytes() == b""


async def test_a_database_missing_relay_columns_is_named(sqlite_relay_db: RelayDb) -> None:
    await sqlite_relay_db.execute("ALTER TABLE logs RENAME COLUMN channel_id TO channel")
    await sqlite_relay_db.execute("DROP TABLE options")
    error = await open_fails(sqlite_relay_db.url)
    assert_one_line(error, "is not a one-api or new-api database: no table options; no column logs.channel_id")


async def test_mysql_server_errors_give_one_line_without_the_password(
    make_relay_db: MakeRelayDb, mariadb: MariaDbServer
) -> None:
    db = await make_relay_db(RelayKind.ONE_API, "mysql")
    database = db.url.rsplit("/", 1)[1]
    wrong = "Wr0ng-Secret"
    error = await open_fails(mariadb.url(database, password=wrong))
    assert_one_line(error, "Access denied", "mysql://relay:***@", secret=wrong)
    assert_one_line(await open_fails(mariadb.url("no_such_db")), "Unknown database")
    port = free_port()
    error = await open_fails(f"mysql://relay:{MYSQL_PASSWORD}@127.0.0.1:{port}/{database}")
    assert_one_line(error, "cannot open relay database", f"127.0.0.1:{port}")


async def test_postgresql_server_errors_give_one_line(make_relay_db: MakeRelayDb) -> None:
    db = await make_relay_db(RelayKind.NEW_API, "postgresql")
    assert_one_line(await open_fails(db.url.replace("/relay_", "/nothere_")), "does not exist")
    port = free_port()
    error = await open_fails(f"postgresql://ledger:Pg-Secret-1@127.0.0.1:{port}/relay")
    assert_one_line(error, "cannot open relay database", "postgresql://ledger:***@", secret="Pg-Secret-1")
