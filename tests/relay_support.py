"""Relay databases for tests: one-api and new-api schemas on SQLite, PostgreSQL and MariaDB, with data helpers.

The fixtures that hand these out are in tests/relay_fixtures.py. A `RelayDb` has the `url` that `import-relay`/
`compare-relay` take, writers that speak the domain's row types
(`add_users`, `add_tokens`, `add_logs`, `set_option`, `set_user_quota`, `soft_delete`), `checksum()` to prove a
command changed nothing, and `load(realistic(kind))` for a data set with the awkward cases (debts, unlimited,
exhausted and disabled tokens, soft-deletes, float ratios as text, refunds).

The schemas are what the relays' GORM models create (songquanpeng/one-api and QuantumNous/new-api `model/*.go`):
GORM's column names, its per-dialect types (Go `int` is `bigint` on MySQL/PostgreSQL, `integer` on SQLite; `bool`
is `boolean` / `numeric`; an indexed or defaulted `string` is `varchar(191)` on MySQL, otherwise `longtext`; a
`gorm.DeletedAt` is `datetime(3)` / `timestamptz` / `datetime`), its index names (`idx_<table>_<column>`) and the
composite log indexes. Only columns the ledger cares about, plus the ones around them, are modelled for channels.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger_service.database import EmbeddedPostgres
from ledger_service.domain.relays import LOG_CONSUME, LOG_REFUND, RelayKind, RelayLog, RelayToken, RelayUser

DIALECTS = ("sqlite", "postgresql", "mysql")
KINDS = (RelayKind.ONE_API, RelayKind.NEW_API)
MYSQL_USER = "relay"
MYSQL_PASSWORD = "relay-Pw-9"
_numbers = itertools.count(1)

# Schemas -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Col:
    """A GORM field as a column: `go` is the Go type; `sql` an explicit `gorm:"type:..."`."""

    name: str
    go: str = "int"  # pk | int | bool | string | float | time
    sql: str | None = None
    default: str | None = None
    index: bool = False
    unique_index: bool = False
    unique: bool = False
    not_null: bool = False
    primary: bool = False
    """A string primary key (options.key): GORM's MySQL rule sizes it like an indexed string."""

    def type_for(self, dialect: str) -> str:
        if self.go == "pk":
            return {"sqlite": "integer", "mysql": "bigint AUTO_INCREMENT", "postgresql": "bigserial"}[dialect]
        if self.sql is not None:
            return self.sql
        if self.go == "int":
            return "integer" if dialect == "sqlite" else "bigint"
        if self.go == "bool":
            return "numeric" if dialect == "sqlite" else "boolean"
        if self.go == "float":
            return {"sqlite": "real", "mysql": "double", "postgresql": "decimal"}[dialect]
        if self.go == "time":
            return {"sqlite": "datetime", "mysql": "datetime(3)", "postgresql": "timestamptz"}[dialect]
        # string: GORM's MySQL rule gives indexed, unique or defaulted strings 191 characters, others longtext.
        if dialect == "mysql":
            keyed = self.index or self.unique_index or self.unique or self.primary or self.default is not None
            return "varchar(191)" if keyed else "longtext"
        return "text"


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Col, ...]
    indexes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Composite (named) indexes, besides the per-column `index`/`unique_index` ones."""
    primary_key: str = "id"

    def ddl(self, dialect: str) -> list[str]:
        q = _quoter(dialect)
        lines = []
        for col in self.columns:
            line = f"{q(col.name)} {col.type_for(dialect)}"
            if col.go == "pk" and dialect == "sqlite":
                line += " PRIMARY KEY AUTOINCREMENT"
            if col.not_null:
                line += " NOT NULL"
            if col.default is not None:
                line += f" DEFAULT {col.default}"
            if col.unique:
                line += " UNIQUE"
            lines.append(line)
        if not (dialect == "sqlite" and self.columns[0].go == "pk"):
            lines.append(f"PRIMARY KEY ({q(self.primary_key)})")
        statements = [f"CREATE TABLE {q(self.name)} ({', '.join(lines)})"]
        for col in self.columns:
            if col.index or col.unique_index:
                unique = "UNIQUE " if col.unique_index else ""
                name = f"idx_{self.name}_{col.name}"
                statements.append(f"CREATE {unique}INDEX {q(name)} ON {q(self.name)} ({q(col.name)})")
        for name, cols in self.indexes:
            listed = ", ".join(q(c) for c in cols)
            statements.append(f"CREATE INDEX {q(name)} ON {q(self.name)} ({listed})")
        return statements


def _quoter(dialect: str) -> Callable[[str], str]:
    if dialect == "mysql":
        return lambda name: f"`{name}`"
    return lambda name: f'"{name}"'


_S = "string"

ONE_API_TABLES: tuple[Table, ...] = (
    Table(
        "users",
        (
            Col("id", "pk"),
            Col("username", _S, unique=True, index=True),
            Col("password", _S, not_null=True),
            Col("display_name", _S, index=True),
            Col("role", sql="int", default="1"),
            Col("status", sql="int", default="1"),
            Col("email", _S, index=True),
            Col("github_id", _S, index=True),
            Col("wechat_id", _S, index=True),
            Col("lark_id", _S, index=True),
            Col("oidc_id", _S, index=True),
            Col("access_token", sql="char(32)", unique_index=True),
            Col("quota", default="0"),
            Col("used_quota", default="0"),
            Col("request_count", sql="int", default="0"),
            Col("group", sql="varchar(32)", default="'default'"),
            Col("aff_code", sql="varchar(32)", unique_index=True),
            Col("inviter_id", sql="int", index=True),
        ),
    ),
    Table(
        "tokens",
        (
            Col("id", "pk"),
            Col("user_id"),
            Col("key", sql="char(48)", unique_index=True),
            Col("status", default="1"),
            Col("name", _S, index=True),
            Col("created_time"),
            Col("accessed_time"),
            Col("expired_time", default="-1"),
            Col("remain_quota", default="0"),
            Col("unlimited_quota", "bool", default="false"),
            Col("used_quota", default="0"),
            Col("models", sql="text"),
            Col("subnet", _S, default="''"),
        ),
    ),
    Table(
        "channels",
        (
            Col("id", "pk"),
            Col("type", default="0"),
            Col("key", sql="text"),
            Col("status", default="1"),
            Col("name", _S, index=True),
            Col("weight", default="0"),
            Col("created_time"),
            Col("test_time"),
            Col("response_time"),
            Col("base_url", _S, default="''"),
            Col("other", _S),
            Col("balance", "float"),
            Col("balance_updated_time"),
            Col("models", _S),
            Col("group", sql="varchar(32)", default="'default'"),
            Col("used_quota", default="0"),
            Col("model_mapping", sql="varchar(1024)", default="''"),
            Col("priority", default="0"),
            Col("config", _S),
            Col("system_prompt", sql="text"),
        ),
    ),
    Table(
        "logs",
        (
            Col("id", "pk"),
            Col("user_id", index=True),
            Col("created_at"),
            Col("type"),
            Col("content", _S),
            Col("username", _S, default="''"),
            Col("token_name", _S, index=True, default="''"),
            Col("model_name", _S, index=True, default="''"),
            Col("quota", default="0"),
            Col("prompt_tokens", default="0"),
            Col("completion_tokens", default="0"),
            Col("channel_id", index=True),
            Col("request_id", _S, default="''"),
            Col("elapsed_time", default="0"),
            Col("is_stream", "bool", default="false"),
            Col("system_prompt_reset", "bool", default="false"),
        ),
        (("idx_created_at_type", ("created_at", "type")), ("index_username_model_name", ("model_name", "username"))),
    ),
    Table("options", (Col("key", _S, primary=True), Col("value", _S)), (), "key"),
)

NEW_API_TABLES: tuple[Table, ...] = (
    Table(
        "users",
        (
            Col("id", "pk"),
            Col("username", _S, unique=True, index=True),
            Col("password", _S, not_null=True),
            Col("display_name", _S, index=True),
            Col("role", sql="int", default="1"),
            Col("status", sql="int", default="1"),
            Col("email", _S, index=True),
            Col("github_id", _S, index=True),
            Col("oidc_id", _S, index=True),
            Col("wechat_id", _S, index=True),
            Col("telegram_id", _S, index=True),
            Col("access_token", sql="char(32)", unique_index=True),
            Col("quota", sql="int", default="0"),
            Col("used_quota", sql="int", default="0"),
            Col("request_count", sql="int", default="0"),
            Col("group", sql="varchar(64)", default="'default'"),
            Col("aff_code", sql="varchar(32)", unique_index=True),
            Col("aff_count", sql="int", default="0"),
            Col("aff_quota", sql="int", default="0"),
            Col("aff_history", sql="int", default="0"),
            Col("inviter_id", sql="int", index=True),
            Col("deleted_at", "time", index=True),
            Col("linux_do_id", _S, index=True),
            Col("setting", sql="text"),
            Col("remark", sql="varchar(255)"),
            Col("stripe_customer", sql="varchar(64)", index=True),
        ),
    ),
    Table(
        "tokens",
        (
            Col("id", "pk"),
            Col("user_id", index=True),
            Col("key", sql="char(48)", unique_index=True),
            Col("status", default="1"),
            Col("name", _S, index=True),
            Col("created_time"),
            Col("accessed_time"),
            Col("expired_time", default="-1"),
            Col("remain_quota", default="0"),
            Col("unlimited_quota", "bool"),
            Col("model_limits_enabled", "bool"),
            Col("model_limits", sql="varchar(1024)", default="''"),
            Col("allow_ips", _S, default="''"),
            Col("used_quota", default="0"),
            Col("group", _S, default="''"),
            Col("deleted_at", "time", index=True),
        ),
    ),
    Table(
        "channels",
        (
            Col("id", "pk"),
            Col("type", default="0"),
            Col("key", sql="text", not_null=True),
            Col("openai_organization", _S),
            Col("test_model", _S),
            Col("status", default="1"),
            Col("name", _S, index=True),
            Col("weight", default="0"),
            Col("created_time"),
            Col("test_time"),
            Col("response_time"),
            Col("base_url", _S, default="''"),
            Col("other", _S),
            Col("balance", "float"),
            Col("balance_updated_time"),
            Col("models", _S),
            Col("group", sql="varchar(64)", default="'default'"),
            Col("used_quota", default="0"),
            Col("model_mapping", sql="text"),
            Col("status_code_mapping", sql="varchar(1024)", default="''"),
            Col("priority", default="0"),
            Col("auto_ban", default="1"),
            Col("other_info", _S),
            Col("tag", _S, index=True),
            Col("setting", sql="text"),
            Col("param_override", sql="text"),
        ),
    ),
    Table(
        "logs",
        (
            Col("id", "pk"),
            Col("user_id", index=True),
            Col("created_at"),
            Col("type"),
            Col("content", _S),
            Col("username", _S, index=True, default="''"),
            Col("token_name", _S, index=True, default="''"),
            Col("model_name", _S, index=True, default="''"),
            Col("quota", default="0"),
            Col("prompt_tokens", default="0"),
            Col("completion_tokens", default="0"),
            Col("use_time", default="0"),
            Col("is_stream", "bool"),
            Col("channel_id", index=True),
            Col("token_id", default="0", index=True),
            Col("group", _S, index=True),
            Col("ip", _S, index=True, default="''"),
            Col("other", _S),
        ),
        (
            ("idx_created_at_id", ("id", "created_at")),
            ("idx_created_at_type", ("created_at", "type")),
            ("index_username_model_name", ("model_name", "username")),
        ),
    ),
    Table("options", (Col("key", _S, primary=True), Col("value", _S)), (), "key"),
)


def tables_for(kind: RelayKind) -> tuple[Table, ...]:
    return ONE_API_TABLES if kind is RelayKind.ONE_API else NEW_API_TABLES


def schema_ddl(kind: RelayKind, dialect: str) -> list[str]:
    """The CREATE statements GORM's AutoMigrate would run for these tables on `dialect`."""
    statements: list[str] = []
    for table in tables_for(kind):
        statements.extend(table.ddl(dialect))
    return statements


# Data --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayData:
    """A data set for a relay database, and what a source must read back from it."""

    users: tuple[RelayUser, ...]
    tokens: tuple[RelayToken, ...]
    """With `user_known` as a reader must report it (the writer ignores that field)."""
    options: dict[str, str]
    logs: tuple[RelayLog, ...]
    """Every log row written, top-ups and admin notes included; `consume_logs()` is what a source returns."""
    channels: tuple[tuple[int, int, str], ...] = ()
    """(id, type, name)."""

    def consume_logs(self, since: int = 0, until: int = 2**62) -> list[RelayLog]:
        """The logs a source's `logs(since, until)` returns, in its order."""
        kept = [g for g in self.logs if g.type in (LOG_CONSUME, LOG_REFUND) and since <= g.created_at < until]
        return sorted(kept, key=lambda g: (g.created_at, g.id))


T0 = 1_767_225_600
"""2026-01-01T00:00:00Z: the realistic logs start here."""


def realistic(kind: RelayKind) -> RelayData:
    """A small data set with every awkward case the importer and the comparison must handle."""
    new = kind is RelayKind.NEW_API
    users = (
        RelayUser(1, 5_000_000),
        RelayUser(2, -12_345),  # a debt: the relay let the user overdraw
        RelayUser(3, 0),
        RelayUser(4, 2_000_000_000),
        RelayUser(5, 777, deleted=new),  # soft-deleted (new-api only; one-api deletes rows)
        RelayUser(6, 1_000),  # no tokens
    )

    def token(id_: int, user: int, remain: int, unlimited: bool, status: int, deleted: bool = False) -> RelayToken:
        known = user in {u.id for u in users if not u.deleted}
        return RelayToken(id_, user, remain, unlimited, status, deleted=deleted, user_known=known)

    tokens = [
        token(1, 1, 1_000_000, False, 1),
        token(2, 1, 0, True, 1),  # unlimited
        token(3, 2, 0, False, 4),  # exhausted
        token(4, 3, 50_000, False, 2),  # disabled
        token(5, 5, 4_000, False, 1),  # its user soft-deleted on new-api
        token(6, 99, 123, False, 1),  # its user is gone
        token(7, 4, -500, False, 1),  # post-consumption took it below zero
        token(8, 1, 75_000, True, 3),  # unlimited and expired
    ]
    if new:
        tokens.append(token(9, 1, 300, False, 1, deleted=True))
    options = {
        "ModelRatio": '{"gpt-4":15,"gpt-4(1)":15,"gpt-3.5-turbo":0.75,"claude-3-haiku(14)":0.125,'
        '"gemini-1.5-flash":0.075,"text-embedding-3-small":0.01}',
        "CompletionRatio": '{"gpt-4":2,"gpt-3.5-turbo":1.333,"claude-3-haiku(14)":5,"gemini-1.5-flash":2.50}',
        "GroupRatio": '{"default":1,"vip":0.75,"svip":2.50}',
        "PreConsumedQuota": "500",
        "QuotaPerUnit": "500000",
        "SystemName": "Relay 测试",
    }
    if new:
        options["ModelPrice"] = '{"dall-e-3":0.04,"mj_imagine":0.1,"suno_music":0.10}'
    logs: list[RelayLog] = []

    def log(id_: int, at: int, type_: int, user: int, tok: int, quota: int, model: str = "gpt-4", **kw: Any) -> None:
        logs.append(
            RelayLog(
                id=id_,
                type=type_,
                created_at=T0 + at,
                user_id=user,
                token_id=tok if new else None,
                token_name=f"token-{tok}",
                channel_id=kw.get("channel", 1),
                model_name=model,
                quota=quota,
                prompt_tokens=kw.get("prompt", 100),
                completion_tokens=kw.get("completion", 20),
                request_id=None if new else f"20260101{id_:012d}",
            )
        )

    log(1, 0, LOG_CONSUME, 1, 1, 3_300)
    log(2, 5, 1, 1, 1, 1_000_000, model="")  # a top-up: not a consume log
    log(3, 10, LOG_CONSUME, 1, 2, 120, model="gpt-3.5-turbo", channel=2, prompt=150, completion=5)
    log(5, 20, LOG_CONSUME, 2, 3, 12_345, model="gpt-4(1)", prompt=1_000, completion=0)
    log(4, 20, LOG_CONSUME, 4, 7, 900, model="claude-3-haiku(14)", channel=2)  # same second, lower id
    log(6, 30, 3, 1, 1, 0, model="")  # an admin note
    log(7, 3_600, LOG_CONSUME, 1, 1, 0, model="gemini-1.5-flash", prompt=0, completion=0)  # free call
    log(8, 7_200, LOG_CONSUME, 5, 5, 4_321)
    if new:
        log(9, 7_300, LOG_REFUND, 5, 5, 4_321)
    log(10, 86_400, LOG_CONSUME, 1, 1, 2**31 - 1, prompt=2**31 - 1, completion=2**31 - 1)
    return RelayData(tuple(users), tuple(tokens), options, tuple(logs), ((1, 1, "openai"), (2, 14, "anthropic")))


# The handle --------------------------------------------------------------------------------------------------------


class RelayDb:
    """A relay database a test owns: `url` for the commands, writers in the domain's terms, a checksum."""

    def __init__(self, kind: RelayKind, dialect: str, url: str, engine: AsyncEngine, path: Path | None) -> None:
        self.kind = kind
        self.dialect = dialect
        self.url = url
        self.path = path
        """The SQLite file (None on a server)."""
        self.engine = engine
        self._dropper: Callable[[], None] | None = None

    @property
    def is_new_api(self) -> bool:
        return self.kind is RelayKind.NEW_API

    async def create_schema(self) -> None:
        async with self.engine.begin() as conn:
            for statement in schema_ddl(self.kind, self.dialect):
                await conn.exec_driver_sql(statement)

    async def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Any statement, for what the helpers do not cover."""
        async with self.engine.begin() as conn:
            await conn.execute(sa.text(sql), params or {})

    async def _insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        target = sa.table(table, *(sa.column(name) for name in rows[0]))
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(target), rows)

    def _deleted_at(self, deleted: bool) -> Any:
        if not deleted:
            return None
        if not self.is_new_api:
            raise ValueError("one-api has no soft deletes (no deleted_at column)")
        now = datetime.now(UTC).replace(microsecond=123000)
        if self.dialect == "sqlite":
            return now.strftime("%Y-%m-%d %H:%M:%S.%f000+00:00")  # how go-sqlite3 stores a time.Time
        if self.dialect == "mysql":
            return now.replace(tzinfo=None)
        return now

    async def add_users(self, users: Iterable[RelayUser]) -> None:
        rows = []
        for u in users:
            row: dict[str, Any] = {
                "id": u.id,
                "username": f"user{u.id}",
                "password": "$2a$10$relayrelayrelayrelayrelayrelayrelayrelayrelayrelayre",
                "display_name": f"User {u.id}",
                "role": 100 if u.id == 1 else 1,
                "status": 1,
                "email": f"user{u.id}@example.com",
                "access_token": f"{u.id:032d}",
                "quota": u.quota,
                "used_quota": 0,
                "group": "default",
                "aff_code": f"A{u.id:07d}",
            }
            if self.is_new_api:
                row["deleted_at"] = self._deleted_at(u.deleted)
                row["setting"] = ""
            elif u.deleted:
                raise ValueError("one-api has no soft deletes (no deleted_at column)")
            rows.append(row)
        await self._insert("users", rows)

    async def add_tokens(self, tokens: Iterable[RelayToken], *, expired_time: int = -1) -> None:
        """Tokens as the relay stores them; `user_known` is not stored (a reader derives it)."""
        rows = []
        for t in tokens:
            row: dict[str, Any] = {
                "id": t.id,
                "user_id": t.user_id,
                "key": f"{t.id:048d}",
                "status": t.status,
                "name": f"token-{t.id}",
                "created_time": T0 - 86_400,
                "accessed_time": T0,
                "expired_time": expired_time,
                "remain_quota": t.remain_quota,
                "unlimited_quota": t.unlimited,
                "used_quota": 0,
            }
            if self.is_new_api:
                row["deleted_at"] = self._deleted_at(t.deleted)
                row["model_limits_enabled"] = False
            elif t.deleted:
                raise ValueError("one-api has no soft deletes (no deleted_at column)")
            rows.append(row)
        await self._insert("tokens", rows)

    async def add_channels(self, channels: Iterable[tuple[int, int, str]]) -> None:
        rows = [
            {"id": id_, "type": type_, "name": name, "key": f"sk-upstream-{id_}", "status": 1, "models": "gpt-4"}
            for id_, type_, name in channels
        ]
        await self._insert("channels", rows)

    async def add_logs(self, logs: Iterable[RelayLog], *, chunk: int = 5_000) -> None:
        """Log rows as the relay writes them (one-api keeps `request_id`, new-api `token_id`)."""
        batch: list[dict[str, Any]] = []
        for g in logs:
            row: dict[str, Any] = {
                "id": g.id,
                "user_id": g.user_id,
                "created_at": g.created_at,
                "type": g.type,
                "content": f"model ratio 15.00, completion ratio 2.00 ({g.id})",
                "username": f"user{g.user_id}",
                "token_name": g.token_name,
                "model_name": g.model_name,
                "quota": g.quota,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
                "channel_id": g.channel_id,
                "is_stream": g.id % 2 == 0,
            }
            if self.is_new_api:
                row.update(token_id=g.token_id or 0, use_time=1, group="default", ip="", other="{}")
            else:
                row.update(request_id=g.request_id or "", elapsed_time=1200)
            batch.append(row)
            if len(batch) >= chunk:
                await self._insert("logs", batch)
                batch = []
        await self._insert("logs", batch)

    async def set_option(self, key: str, value: str) -> None:
        options = sa.table("options", sa.column("key"), sa.column("value"))
        async with self.engine.begin() as conn:
            await conn.execute(sa.delete(options).where(options.c.key == key))
            await conn.execute(sa.insert(options).values(key=key, value=value))

    async def set_user_quota(self, user_id: int, quota: int) -> None:
        users = sa.table("users", sa.column("id"), sa.column("quota"))
        async with self.engine.begin() as conn:
            await conn.execute(sa.update(users).where(users.c.id == user_id).values(quota=quota))

    async def set_token(self, token_id: int, *, remain_quota: int | None = None, unlimited: bool | None = None) -> None:
        tokens = sa.table("tokens", sa.column("id"), sa.column("remain_quota"), sa.column("unlimited_quota"))
        values: dict[str, Any] = {}
        if remain_quota is not None:
            values["remain_quota"] = remain_quota
        if unlimited is not None:
            values["unlimited_quota"] = unlimited
        async with self.engine.begin() as conn:
            await conn.execute(sa.update(tokens).where(tokens.c.id == token_id).values(**values))

    async def soft_delete(self, table: str, id_: int) -> None:
        """Set `deleted_at` as GORM's Delete does (new-api's users and tokens)."""
        if table not in ("users", "tokens"):
            raise ValueError(f"new-api soft-deletes users and tokens, not {table}")
        target = sa.table(table, sa.column("id"), sa.column("deleted_at"))
        async with self.engine.begin() as conn:
            await conn.execute(sa.update(target).where(target.c.id == id_).values(deleted_at=self._deleted_at(True)))

    async def load(self, data: RelayData) -> RelayData:
        """Write a data set (options, channels, users, tokens, logs); returns it, for the expectations."""
        for key, value in data.options.items():
            await self.set_option(key, value)
        await self.add_channels(data.channels)
        await self.add_users(data.users)
        await self.add_tokens(data.tokens)
        await self.add_logs(data.logs)
        return data

    async def realistic(self) -> RelayData:
        return await self.load(realistic(self.kind))

    async def checksum(self) -> str:
        """A digest of every table's full contents (every column, every row, in primary-key order) and, on SQLite,
        of the file's bytes: equal before and after a command proves the command wrote nothing."""
        digest = hashlib.sha256()
        async with self.engine.connect() as conn:
            names = await conn.run_sync(lambda c: sorted(sa.inspect(c).get_table_names()))
            q = _quoter(self.dialect)
            for name in names:
                digest.update(f"\0table {name}\0".encode())
                result = await conn.exec_driver_sql(f"SELECT * FROM {q(name)} ORDER BY 1")
                for row in result:
                    digest.update(repr(tuple(row)).encode())
        if self.path is not None:
            digest.update(self.path.read_bytes())
        return digest.hexdigest()

    async def close(self) -> None:
        await self.engine.dispose()
        if self._dropper is not None:
            self._dropper()
            self._dropper = None


# Servers -----------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_program(program: str) -> str | None:
    """A program on the PATH, or in the sbin directories Debian installs servers to (not on a user's PATH)."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(("/usr/sbin", "/usr/local/sbin", "/sbin"))
    return shutil.which(program, path=path)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the server's process before exec: Linux sends it SIGTERM when the test process dies, even by SIGKILL, so
    no server outlives its session; `stop()` is the ordinary way. Only a system call here (libc was loaded in the
    parent), which is what a preexec_fn may safely do in a process that has threads."""
    with contextlib.suppress(AttributeError):  # not Linux: no prctl
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MariaDbServer:
    """A throwaway MariaDB server: its own data directory, socket and loopback port, run as root (`--user=root`).

    `start()` waits by polling a connection (no fixed sleeps); `stop()` always ends the process and removes the
    directory. Tests connect as `relay` (password `MYSQL_PASSWORD`) over TCP; set-up runs as root over the socket.
    """

    def __init__(self, mariadbd: str, install_db: str, client: str) -> None:
        self._mariadbd = mariadbd
        self._install_db = install_db
        self._client = client
        self.root = Path(tempfile.mkdtemp(prefix="relay-mariadb-"))
        self.socket = str(self.root / "mysqld.sock")
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        data = self.root / "data"
        subprocess.run(
            [
                self._install_db,
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        log = open(self.root / "server.log", "wb")  # noqa: SIM115 (the server writes it for its whole life)
        self._process = subprocess.Popen(
            [
                self._mariadbd,
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--bind-address=127.0.0.1",
                f"--port={self.port}",
                f"--socket={self.socket}",
                f"--pid-file={self.root / 'mysqld.pid'}",
                f"--log-error={self.root / 'error.log'}",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-doublewrite=0",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                errors = (self.root / "error.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mariadbd exited with {self._process.returncode}:\n{errors}")
            probe = subprocess.run(
                [self._client, "--no-defaults", "-uroot", f"--socket={self.socket}", "-e", "SELECT 1"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mariadbd did not accept connections in {timeout:.0f} s")
            time.sleep(0.05)
        self.sql(
            f"CREATE USER '{MYSQL_USER}'@'127.0.0.1' IDENTIFIED BY '{MYSQL_PASSWORD}';"
            f" GRANT ALL PRIVILEGES ON *.* TO '{MYSQL_USER}'@'127.0.0.1';"
        )

    def sql(self, statements: str) -> str:
        """Run SQL as root over the socket; returns the client's tab-separated output."""
        done = subprocess.run(
            [self._client, "--no-defaults", "-uroot", f"--socket={self.socket}", "-N", "-B", "-e", statements],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb: {done.stderr.strip()}")
        return done.stdout

    def url(self, database: str, *, password: str = MYSQL_PASSWORD, scheme: str = "mysql") -> str:
        return f"{scheme}://{MYSQL_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# Building ----------------------------------------------------------------------------------------------------------


async def build_relay_db(
    kind: RelayKind,
    dialect: str,
    *,
    directory: Path,
    postgres: EmbeddedPostgres | None = None,
    mariadb: MariaDbServer | None = None,
) -> RelayDb:
    """An empty relay database of `kind` on `dialect`, its schema created; close() it (drops a server database)."""
    number = next(_numbers)
    name = f"relay_{os.getpid()}_{number}"
    dropper: Callable[[], None] | None = None
    path: Path | None = None
    if dialect == "sqlite":
        path = directory / f"{kind.value}-{number}.db"
        url = f"sqlite:///{path}"
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    elif dialect == "postgresql":
        assert postgres is not None
        postgres.psql(f"CREATE DATABASE {name};")
        url = postgres.url(name)
        engine = create_async_engine(make_url(url).set(drivername="postgresql+asyncpg"))
        server = postgres

        def dropper() -> None:
            server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")

    elif dialect == "mysql":
        assert mariadb is not None
        mariadb.sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4;")
        url = mariadb.url(name)
        engine = create_async_engine(
            make_url(url).set(drivername="mysql+aiomysql"), connect_args={"charset": "utf8mb4"}
        )
        maria = mariadb

        def dropper() -> None:
            maria.sql(f"DROP DATABASE IF EXISTS {name};")

    else:
        raise ValueError(f"unknown dialect {dialect!r}")
    db = RelayDb(kind, dialect, url, engine, path)
    db._dropper = dropper
    await db.create_schema()
    return db


MakeRelayDb = Callable[[RelayKind, str], Awaitable[RelayDb]]
"""The `make_relay_db` fixture's type."""
