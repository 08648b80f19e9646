"""Provider files and their records, the channel map, and provider prices (migration 0009).

The tables are described here rather than in db/tables.py: they belong to external reconciliation, and the
reconciliation runs and the margin report read them through `records_with_channel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    Numeric,
    Select,
    Table,
    Text,
    TypeDecorator,
    and_,
    cast,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db.tables import metadata
from ledger_service.domain.external import ExternalRecord


class JsonText(TypeDecorator[str]):
    """A jsonb column read and written as JSON text, so that numbers keep every digit both ways (the engine's
    JSON (de)serializer would turn them into floats)."""

    impl = Text
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> Any:
        return cast(bindvalue, JSONB)

    def column_expression(self, column: Any) -> Any:
        return cast(column, Text)


external_uploads = Table(
    "external_uploads",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("source", Text, nullable=False),
    Column("sha256", LargeBinary, nullable=False),
    Column("filename", Text),
    Column("channel_id", BigInteger),
    Column("content", LargeBinary, nullable=False),
    Column("records", Integer, nullable=False),
    Column("uploaded_by", BigInteger),
    Column("uploaded_at", DateTime(timezone=True), nullable=False),
)

external_records = Table(
    "external_records",
    metadata,
    Column("upload_id", BigInteger, primary_key=True),
    Column("line", Integer, primary_key=True),
    Column("bucket_start", DateTime(timezone=True), nullable=False),
    Column("bucket_end", DateTime(timezone=True), nullable=False),
    Column("api_key_id", Text),
    Column("project_id", Text),
    Column("channel_id", BigInteger),
    Column("model", Text),
    Column("input_tokens", BigInteger),
    Column("output_tokens", BigInteger),
    Column("cached_tokens", BigInteger),
    Column("cache_creation_tokens", BigInteger),
    Column("requests", BigInteger),
    Column("cost_usd", Numeric),
    Column("currency", Text),
    Column("line_item", Text),
    Column("raw", JsonText, nullable=False),
)

external_channel_map = Table(
    "external_channel_map",
    metadata,
    Column("source", Text, primary_key=True),
    Column("external_key", Text, primary_key=True),
    Column("channel_id", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

provider_prices = Table(
    "provider_prices",
    metadata,
    Column("model", Text, primary_key=True),
    Column("input_usd_per_mtok", Numeric, nullable=False),
    Column("output_usd_per_mtok", Numeric, nullable=False),
    Column("cached_input_usd_per_mtok", Numeric),
    Column("request_usd", Numeric, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

INSERT_CHUNK = 5000
"""Records handed to one executemany; SQLAlchemy sends them as multi-row INSERTs of 1000 rows (17,000 parameters,
under asyncpg's 32,767), compiled once."""


@dataclass(frozen=True, slots=True)
class UploadRow:
    id: int
    source: str
    sha256: bytes
    filename: str | None
    channel_id: int | None
    records: int
    uploaded_by: int | None
    uploaded_at: datetime


_UPLOAD_COLUMNS = [column for column in external_uploads.c if column.name != "content"]


def _upload(row: Any) -> UploadRow:
    return UploadRow(
        id=row.id,
        source=row.source,
        sha256=bytes(row.sha256),
        filename=row.filename,
        channel_id=row.channel_id,
        records=row.records,
        uploaded_by=row.uploaded_by,
        uploaded_at=row.uploaded_at,
    )


async def upload_by_hash(conn: AsyncConnection, sha256: bytes) -> UploadRow | None:
    row = (await conn.execute(select(*_UPLOAD_COLUMNS).where(external_uploads.c.sha256 == sha256))).first()
    return None if row is None else _upload(row)


async def upload_by_id(conn: AsyncConnection, upload_id: int) -> UploadRow | None:
    row = (await conn.execute(select(*_UPLOAD_COLUMNS).where(external_uploads.c.id == upload_id))).first()
    return None if row is None else _upload(row)


async def insert_upload(
    conn: AsyncConnection,
    *,
    source: str,
    sha256: bytes,
    filename: str | None,
    channel_id: int | None,
    content: bytes,
    records: int,
    uploaded_by: int | None,
) -> int | None:
    """Insert the file; None when a file with the same SHA-256 exists (a concurrent upload may just have won: the
    statement waits for it to commit, then finds its row)."""
    statement = (
        pg_insert(external_uploads)
        .values(
            source=source,
            sha256=sha256,
            filename=filename,
            channel_id=channel_id,
            content=content,
            records=records,
            uploaded_by=uploaded_by,
        )
        .on_conflict_do_nothing(index_elements=[external_uploads.c.sha256])
        .returning(external_uploads.c.id)
    )
    upload_id = (await conn.execute(statement)).scalar_one_or_none()
    return None if upload_id is None else int(upload_id)


async def insert_records(conn: AsyncConnection, upload_id: int, records: Sequence[ExternalRecord]) -> None:
    statement = insert(external_records)
    for start in range(0, len(records), INSERT_CHUNK):
        rows = [
            {
                "upload_id": upload_id,
                "line": record.line,
                "bucket_start": record.bucket_start,
                "bucket_end": record.bucket_end,
                "api_key_id": record.api_key_id,
                "project_id": record.project_id,
                "channel_id": record.channel_id,
                "model": record.model,
                "input_tokens": record.input_tokens,
                "output_tokens": record.output_tokens,
                "cached_tokens": record.cached_tokens,
                "cache_creation_tokens": record.cache_creation_tokens,
                "requests": record.requests,
                "cost_usd": record.cost_usd,
                "currency": record.currency,
                "line_item": record.line_item,
                "raw": record.raw.decode(),
            }
            for record in records[start : start + INSERT_CHUNK]
        ]
        await conn.execute(statement, rows)


async def list_uploads(conn: AsyncConnection, *, before: int | None, limit: int) -> list[UploadRow]:
    """Newest first (descending id), `limit` of them, after the cursor `before` (an id)."""
    statement = select(*_UPLOAD_COLUMNS).order_by(external_uploads.c.id.desc()).limit(limit)
    if before is not None:
        statement = statement.where(external_uploads.c.id < before)
    return [_upload(row) for row in await conn.execute(statement)]


def records_with_channel(upload_id: int | None = None) -> Select[Any]:
    """Every column of external_records, its upload's source, and `resolved_channel_id`: the ledger channel the
    record belongs to, which is the record's own (a CSV's `channel`), else the channel map's entry for its api key,
    else for its project (both under the upload's source), else the upload's `channel_id`; null when none says.
    Optionally of one upload. The reconciliation runs and the margin report read records through this, so a change
    of the map applies to every upload at once (records are append-only; the map is configuration)."""
    by_key = external_channel_map.alias("by_key")
    by_project = external_channel_map.alias("by_project")
    records, uploads = external_records, external_uploads
    channel = func.coalesce(records.c.channel_id, by_key.c.channel_id, by_project.c.channel_id, uploads.c.channel_id)
    statement = (
        select(records, uploads.c.source, channel.label("resolved_channel_id"))
        .select_from(
            records.join(uploads, uploads.c.id == records.c.upload_id)
            .outerjoin(
                by_key,
                and_(by_key.c.source == uploads.c.source, by_key.c.external_key == records.c.api_key_id),
            )
            .outerjoin(
                by_project,
                and_(by_project.c.source == uploads.c.source, by_project.c.external_key == records.c.project_id),
            )
        )
        .order_by(records.c.upload_id, records.c.line)
    )
    if upload_id is not None:
        statement = statement.where(records.c.upload_id == upload_id)
    return statement


async def records_page(conn: AsyncConnection, upload_id: int, *, after_line: int, limit: int) -> list[Any]:
    statement = records_with_channel(upload_id).where(external_records.c.line > after_line).limit(limit)
    return list(await conn.execute(statement))


# The channel map and provider prices -------------------------------------------------------------------------


async def save_channel(conn: AsyncConnection, source: str, external_key: str, channel_id: int) -> tuple[bool, datetime]:
    """Insert or replace a map entry; whether it was new, and its updated_at."""
    statement = pg_insert(external_channel_map).values(source=source, external_key=external_key, channel_id=channel_id)
    row = (
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=[external_channel_map.c.source, external_channel_map.c.external_key],
                set_={"channel_id": statement.excluded.channel_id, "updated_at": func.now()},
            ).returning(text("(xmax = 0) AS inserted"), external_channel_map.c.updated_at)
        )
    ).one()
    return bool(row.inserted), row.updated_at


async def channel_map(conn: AsyncConnection) -> list[Any]:
    statement = select(external_channel_map).order_by(
        external_channel_map.c.source, external_channel_map.c.external_key
    )
    return list(await conn.execute(statement))


async def save_price(
    conn: AsyncConnection,
    model: str,
    *,
    input_usd_per_mtok: Decimal,
    output_usd_per_mtok: Decimal,
    cached_input_usd_per_mtok: Decimal | None,
    request_usd: Decimal,
) -> tuple[bool, datetime]:
    """Insert or replace a model's provider price; whether the model was new, and its updated_at."""
    statement = pg_insert(provider_prices).values(
        model=model,
        input_usd_per_mtok=input_usd_per_mtok,
        output_usd_per_mtok=output_usd_per_mtok,
        cached_input_usd_per_mtok=cached_input_usd_per_mtok,
        request_usd=request_usd,
    )
    excluded = statement.excluded
    row = (
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=[provider_prices.c.model],
                set_={
                    "input_usd_per_mtok": excluded.input_usd_per_mtok,
                    "output_usd_per_mtok": excluded.output_usd_per_mtok,
                    "cached_input_usd_per_mtok": excluded.cached_input_usd_per_mtok,
                    "request_usd": excluded.request_usd,
                    "updated_at": func.now(),
                },
            ).returning(text("(xmax = 0) AS inserted"), provider_prices.c.updated_at)
        )
    ).one()
    return bool(row.inserted), row.updated_at


async def prices(conn: AsyncConnection) -> list[Any]:
    return list(await conn.execute(select(provider_prices).order_by(provider_prices.c.model)))
