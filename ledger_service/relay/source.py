"""A relay's own database (one-api or new-api) as a read-only source of users, tokens, options and consume logs.

Both relays are Go programs whose GORM models create the same core tables (`users`, `tokens`, `channels`,
`logs`, `options`) on SQLite (the default), MySQL/MariaDB or PostgreSQL. This module opens such a database
**read-only**, tells the two relays apart, and hands out the domain rows of domain/relays.py in pages.

Read-only, in three ways:
- SQLite is opened through a `file:<path>?mode=ro` URI, so a missing file is an error rather than a new empty
  database, and every write fails in SQLite itself; `PRAGMA query_only` is set as well.
- MySQL/MariaDB sessions run `SET SESSION TRANSACTION READ ONLY` before anything else.
- PostgreSQL sessions start with `default_transaction_read_only=on`.

Every page is a keyset query (`WHERE id > :last ORDER BY id LIMIT :n`; logs by `(created_at, id)`) in its own
short transaction on a pooled connection that goes back to the pool between pages: a live relay is never
blocked for longer than one page (a SQLite relay without WAL takes its write lock only between our reads), and
memory stays flat however large the tables are.

Telling the relays apart (checked against both projects' `model/*.go`):
- new-api's `logs` table has a `token_id` column (plus `use_time`, `other`, `ip`, `group`); one-api's never had
  one: one-api names the token (`token_name`) but not its id. This is the test used.
- new-api soft-deletes users and tokens (GORM `deleted_at`); one-api deletes rows. Read wherever present.
- `logs.request_id` is *not* a reliable tell: one-api added it in 2025 (older databases lack it) and recent
  new-api versions have one too. It is read whenever the column exists (an empty string reads as None).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ledger_service.domain.relays import LOG_CONSUME, LOG_REFUND, RelayKind, RelayLog, RelayToken, RelayUser

ACCEPTED_SCHEMES = (
    "sqlite:///relative/path.db or sqlite:////absolute/path.db, "
    "mysql://user:password@host:port/database (also mariadb://, mysql+aiomysql://), "
    "postgresql://user:password@host:port/database (also postgres://, postgresql+asyncpg://)"
)
CONNECT_TIMEOUT_SECONDS = 10
LOG_TYPES = (LOG_CONSUME, LOG_REFUND)

_SCHEMES = {
    "sqlite": "sqlite",
    "sqlite+aiosqlite": "sqlite",
    "mysql": "mysql",
    "mysql+aiomysql": "mysql",
    "mariadb": "mysql",
    "mariadb+aiomysql": "mysql",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+asyncpg": "postgresql",
}
_SOURCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

# What a database must have to be read as a relay's: table -> columns.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "users": ("id", "quota"),
    "tokens": ("id", "user_id", "status", "remain_quota", "unlimited_quota"),
    "options": ("key", "value"),
    "logs": (
        "id",
        "user_id",
        "created_at",
        "type",
        "token_name",
        "model_name",
        "quota",
        "prompt_tokens",
        "completion_tokens",
        "channel_id",
    ),
}
_OPTIONAL: dict[str, tuple[str, ...]] = {
    "users": ("deleted_at",),
    "tokens": ("deleted_at",),
    "logs": ("token_id", "request_id", "deleted_at"),
}


class SourceError(Exception):
    """The relay database cannot be opened or read, or is not a relay's. The message is one line, no password."""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    kind: RelayKind
    dialect: str
    """`sqlite`, `mysql` (MySQL or MariaDB) or `postgresql`."""
    display_url: str
    """The URL with its password masked; a SQLite path made absolute."""
    source_id: str
    """Names the source in the ledger's references (`import:<source_id>:...`): `A-Za-z0-9._-`, at most 64."""


@dataclass(frozen=True, slots=True)
class _Target:
    dialect: str
    display_url: str
    identity_url: str
    """The display URL without any password: what the default source id is derived from."""
    password: str | None
    engine: Callable[[], AsyncEngine]


@dataclass(slots=True)
class _Schema:
    columns: dict[str, set[str]] = field(default_factory=dict)

    def has(self, table: str, column: str) -> bool:
        return column in self.columns.get(table, set())


def _one_line(text: str, password: str | None) -> str:
    line = " ".join(str(text).split())
    if password:
        line = line.replace(password, "***")
    return line or "unknown error"


def _reason(error: BaseException) -> str:
    """The driver's own words for a failure, without SQLAlchemy's SQL echo and background link."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        error = error.orig
    args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
    # PyMySQL errors are (code, message); the message is what an operator reads.
    mysql = type(error).__module__.startswith(("pymysql", "aiomysql"))
    if mysql and len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        return f"{args[1]} (MySQL error {args[0]})"
    text = str(error) or type(error).__name__
    return text.split("\n[SQL:")[0].split("\n(Background on this error")[0]


def default_source_id(kind: RelayKind, identity_url: str) -> str:
    return f"{kind.value}-{hashlib.sha256(identity_url.encode()).hexdigest()[:10]}"


def _parse(url: str) -> _Target:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        shown = _one_line(url.split("://", 1)[0], None) if url.strip() else "(empty)"
        raise SourceError(f"not a database URL: {shown!r}; accepted: {ACCEPTED_SCHEMES}") from None
    dialect = _SCHEMES.get(parsed.drivername.lower())
    if dialect is None:
        raise SourceError(f"unsupported relay database URL scheme {parsed.drivername!r}; accepted: {ACCEPTED_SCHEMES}")
    if dialect == "sqlite":
        return _sqlite_target(parsed)
    return _server_target(parsed, dialect)


def _sqlite_target(parsed: URL) -> _Target:
    if not parsed.database or parsed.database == ":memory:":
        raise SourceError(f"a SQLite source needs a file path; accepted: {ACCEPTED_SCHEMES}")
    path = Path(os.path.abspath(parsed.database))
    display = f"sqlite:///{path}"
    if not path.is_file():
        what = "is a directory, not a SQLite file" if path.is_dir() else "does not exist"
        raise SourceError(f"relay database file {path} {what}")

    def engine() -> AsyncEngine:
        import aiosqlite

        uri = f"file:{quote(str(path))}?mode=ro"

        async def connect() -> Any:
            return await aiosqlite.connect(uri, uri=True, timeout=CONNECT_TIMEOUT_SECONDS)

        created = create_async_engine(f"sqlite+aiosqlite:///{path}", async_creator=connect, pool_size=2)

        @sa.event.listens_for(created.sync_engine, "connect")
        def query_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only = ON")
            cursor.close()

        return created

    return _Target("sqlite", display, display, None, engine)


def _server_target(parsed: URL, dialect: str) -> _Target:
    scheme = "mysql" if dialect == "mysql" else "postgresql"
    shown = parsed.set(drivername=scheme)
    display = shown.render_as_string(hide_password=True)
    identity = shown.set(password=None).render_as_string(hide_password=False)
    password = parsed.password if isinstance(parsed.password, str) else None
    if not parsed.database:
        raise SourceError(f"{display} names no database; accepted: {ACCEPTED_SCHEMES}")

    def engine() -> AsyncEngine:
        if dialect == "mysql":
            return create_async_engine(
                parsed.set(drivername="mysql+aiomysql"),
                connect_args={
                    "init_command": "SET SESSION TRANSACTION READ ONLY",
                    "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                    "charset": "utf8mb4",
                },
                pool_size=2,
                pool_recycle=3600,
            )
        return create_async_engine(
            parsed.set(drivername="postgresql+asyncpg"),
            connect_args={
                "server_settings": {
                    "default_transaction_read_only": "on",
                    "application_name": "ledger-service relay source",
                },
                "timeout": CONNECT_TIMEOUT_SECONDS,
            },
            pool_size=2,
        )

    return _Target(dialect, display, identity, password, engine)


def _flag(value: Any) -> bool:
    """A boolean as the dialect returns it: PostgreSQL bool, MySQL tinyint, SQLite numeric (or text)."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "t", "true", "y", "yes"}
    return bool(value)


def _int(value: Any) -> int:
    return 0 if value is None else int(value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode()
    return str(value)


class RelaySource:
    """An open relay database. Every read is a fresh short transaction; nothing is ever written."""

    def __init__(self, engine: AsyncEngine, info: SourceInfo, schema: _Schema, password: str | None) -> None:
        self.info = info
        self._engine = engine
        self._schema = schema
        self._password = password
        self._users = self._table("users")
        self._tokens = self._table("tokens")
        self._logs = self._table("logs")
        self._options = sa.table("options", sa.column("key"), sa.column("value"))

    def _table(self, name: str) -> sa.TableClause:
        wanted = _REQUIRED[name] + _OPTIONAL.get(name, ())
        return sa.table(name, *(sa.column(c) for c in wanted if self._schema.has(name, c)))

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except SourceError:
            raise
        except Exception as error:  # any driver failure is the operator's to act on, in one line
            raise SourceError(
                f"cannot read relay database {self.info.display_url}: {_one_line(_reason(error), self._password)}"
            ) from None

    async def _rows(self, query: sa.Select[Any]) -> Sequence[sa.Row[Any]]:
        with self._reading():
            async with self._engine.connect() as conn:
                result = await conn.execute(query)
                rows: Sequence[sa.Row[Any]] = result.all()
                return rows

    async def _count(self, table: sa.TableClause) -> int:
        rows = await self._rows(sa.select(sa.func.count()).select_from(table))
        return int(rows[0][0])

    async def count_users(self) -> int:
        return await self._count(self._users)

    async def count_tokens(self) -> int:
        return await self._count(self._tokens)

    async def users(self, batch_size: int = 2000) -> AsyncIterator[list[RelayUser]]:
        """Every user, soft-deleted ones too (`deleted=True`), in ascending id, `batch_size` at a time."""
        u = self._users.c
        deleted = u.deleted_at if self._schema.has("users", "deleted_at") else sa.null()
        last = None
        while True:
            query = sa.select(u.id, u.quota, deleted.label("deleted_at")).order_by(u.id).limit(batch_size)
            if last is not None:
                query = query.where(u.id > last)
            rows = await self._rows(query)
            if not rows:
                return
            yield [RelayUser(id=int(r.id), quota=_int(r.quota), deleted=r.deleted_at is not None) for r in rows]
            last = rows[-1].id

    async def tokens(self, batch_size: int = 2000) -> AsyncIterator[list[RelayToken]]:
        """Every token, soft-deleted ones too, in ascending id; `user_known` False when its user is missing or
        soft-deleted (one LEFT JOIN per page, on the users' primary key)."""
        t = self._tokens.c
        users = self._users.alias("u")
        t_deleted = t.deleted_at if self._schema.has("tokens", "deleted_at") else sa.null()
        u_deleted = users.c.deleted_at if self._schema.has("users", "deleted_at") else sa.null()
        joined = self._tokens.outerjoin(users, users.c.id == t.user_id)
        last = None
        while True:
            query = (
                sa.select(
                    t.id,
                    t.user_id,
                    t.remain_quota,
                    t.unlimited_quota,
                    t.status,
                    t_deleted.label("deleted_at"),
                    users.c.id.label("owner"),
                    u_deleted.label("owner_deleted_at"),
                )
                .select_from(joined)
                .order_by(t.id)
                .limit(batch_size)
            )
            if last is not None:
                query = query.where(t.id > last)
            rows = await self._rows(query)
            if not rows:
                return
            yield [
                RelayToken(
                    id=int(r.id),
                    user_id=_int(r.user_id),
                    remain_quota=_int(r.remain_quota),
                    unlimited=_flag(r.unlimited_quota),
                    status=_int(r.status),
                    deleted=r.deleted_at is not None,
                    user_known=r.owner is not None and r.owner_deleted_at is None,
                )
                for r in rows
            ]
            last = rows[-1].id

    async def options(self) -> dict[str, str]:
        """The raw `options` table: key -> value, text exactly as the relay stored it."""
        o = self._options.c
        rows = await self._rows(sa.select(o.key, o.value).order_by(o.key))
        return {_text(r.key): _text(r.value) for r in rows}

    def _log_window(self, since: int, until: int) -> list[sa.ColumnElement[bool]]:
        c = self._logs.c
        where = [c.type.in_(LOG_TYPES), c.created_at >= since, c.created_at < until]
        if self._schema.has("logs", "deleted_at"):
            where.append(c.deleted_at.is_(None))
        return where

    async def count_logs(self, since: int, until: int) -> int:
        """How many consume and refund logs `logs()` would return for the same window."""
        query = sa.select(sa.func.count()).select_from(self._logs).where(*self._log_window(since, until))
        rows = await self._rows(query)
        return int(rows[0][0])

    async def logs(self, since: int, until: int, batch_size: int = 5000) -> AsyncIterator[list[RelayLog]]:
        """Consume (2) and refund (6) logs with `since <= created_at < until` (unix seconds), in (created_at, id)
        order, soft-deleted ones left out, read by keyset on (created_at, id) in pages of `batch_size`."""
        c = self._logs.c
        token_id = c.token_id if self._schema.has("logs", "token_id") else sa.null()
        request_id = c.request_id if self._schema.has("logs", "request_id") else sa.null()
        columns = (
            c.id,
            c.type,
            c.created_at,
            c.user_id,
            token_id.label("token_id"),
            c.token_name,
            c.channel_id,
            c.model_name,
            c.quota,
            c.prompt_tokens,
            c.completion_tokens,
            request_id.label("request_id"),
        )
        window = self._log_window(since, until)
        after: tuple[int, int] | None = None
        while True:
            query = sa.select(*columns).where(*window).order_by(c.created_at, c.id).limit(batch_size)
            if after is not None:
                at, last = after
                # The plain `>=` lets the (created_at, type) index start each page where the last one ended.
                query = query.where(c.created_at >= at, sa.or_(c.created_at > at, c.id > last))
            rows = await self._rows(query)
            if not rows:
                return
            yield [
                RelayLog(
                    id=int(r.id),
                    type=int(r.type),
                    created_at=int(r.created_at),
                    user_id=_int(r.user_id),
                    token_id=None if r.token_id is None else int(r.token_id),
                    token_name=_text(r.token_name),
                    channel_id=_int(r.channel_id),
                    model_name=_text(r.model_name),
                    quota=_int(r.quota),
                    prompt_tokens=_int(r.prompt_tokens),
                    completion_tokens=_int(r.completion_tokens),
                    request_id=_text(r.request_id) or None,
                )
                for r in rows
            ]
            after = (int(rows[-1].created_at), int(rows[-1].id))


async def _inspect(conn: AsyncConnection) -> _Schema:
    def read(sync_conn: sa.Connection) -> _Schema:
        inspector = sa.inspect(sync_conn)
        present = set(inspector.get_table_names())
        schema = _Schema()
        for table in _REQUIRED:
            if table in present:
                schema.columns[table] = {str(col["name"]).lower() for col in inspector.get_columns(table)}
        return schema

    return await conn.run_sync(read)


def _recognise(schema: _Schema, display_url: str) -> RelayKind:
    missing_tables = [t for t in _REQUIRED if t not in schema.columns]
    missing_columns = [
        f"{t}.{c}" for t, cols in _REQUIRED.items() if t in schema.columns for c in cols if not schema.has(t, c)
    ]
    if missing_tables or missing_columns:
        parts = []
        if missing_tables:
            parts.append("no table " + ", ".join(missing_tables))
        if missing_columns:
            parts.append("no column " + ", ".join(missing_columns))
        raise SourceError(f"{display_url} is not a one-api or new-api database: {'; '.join(parts)}")
    return RelayKind.NEW_API if schema.has("logs", "token_id") else RelayKind.ONE_API


@asynccontextmanager
async def open_source(url: str, *, source_id: str | None = None) -> AsyncIterator[RelaySource]:
    """Open a relay database read-only and recognise it; SourceError (one line) when that is not possible."""
    if source_id is not None and not _SOURCE_ID.fullmatch(source_id):
        raise SourceError(f"source id {source_id!r} must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
    target = _parse(url)
    engine = target.engine()
    try:
        try:
            async with engine.connect() as conn:
                schema = await _inspect(conn)
        except Exception as error:  # bad password, unreachable host, unknown database, not a database file
            reason = _one_line(_reason(error), target.password)
            raise SourceError(f"cannot open relay database {target.display_url}: {reason}") from None
        kind = _recognise(schema, target.display_url)
        info = SourceInfo(
            kind=kind,
            dialect=target.dialect,
            display_url=target.display_url,
            source_id=source_id or default_source_id(kind, target.identity_url),
        )
        yield RelaySource(engine, info, schema, target.password)
    finally:
        await engine.dispose()
