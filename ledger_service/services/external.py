"""Provider files (uploads and their records), the channel map, and provider prices (docs/external.md).

An upload is one transaction: the file's bytes, its metadata and every record it parses into, or nothing. The
same bytes are one upload (`sha256` is unique): a second upload of them answers with the first one's id, and two
at once both end with the one that committed first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import overload

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import external
from ledger_service.db.transactions import RetryTransaction, run_transaction
from ledger_service.domain import errors
from ledger_service.domain.external import MalformedFile, Source, parse
from ledger_service.schemas import (
    ChannelMapEntryView,
    ChannelMapView,
    ExternalRecordView,
    ProviderPriceCommand,
    ProviderPriceListView,
    ProviderPriceView,
    UploadCreatedView,
    UploadDetailView,
    UploadListView,
    UploadView,
)

PARSE_IN_THREAD_BYTES = 256 * 1024
"""Files at least this large are parsed off the event loop, so the process keeps answering other requests."""


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    view: UploadCreatedView
    created: bool


def _cursor(prefix: str, value: int) -> str:
    return base64.urlsafe_b64encode(f"{prefix}.{value}".encode()).decode().rstrip("=")


def _position(prefix: str, cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        tag, number = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii").split(".")
        value = int(number)
    except (ValueError, UnicodeError, binascii.Error):
        raise errors.ValidationFailed("cursor is not one this service handed out") from None
    if tag != prefix or not 0 <= value < 2**63:
        raise errors.ValidationFailed("cursor is not one this service handed out")
    return value


@overload
def usd(value: Decimal) -> str: ...
@overload
def usd(value: Decimal | None) -> str | None: ...
def usd(value: Decimal | None) -> str | None:
    """A decimal as a string in plain notation, every digit kept: `1E-21` is `0.000000000000000000001`."""
    return None if value is None else f"{value:f}"


def _upload_view(row: external.UploadRow) -> UploadView:
    return UploadView(
        id=row.id,
        source=row.source,
        sha256=row.sha256.hex(),
        filename=row.filename,
        channel_id=row.channel_id,
        records=row.records,
        uploaded_by=row.uploaded_by,
        uploaded_at=row.uploaded_at,
    )


def _existing(row: external.UploadRow, source: Source) -> UploadOutcome:
    if row.source != source:
        raise errors.UploadConflict(
            f"these bytes were already uploaded as upload {row.id} with source {row.source}, not {source}"
        )
    view = UploadCreatedView(upload_id=row.id, records=row.records, source=row.source, sha256=row.sha256.hex())
    return UploadOutcome(view, created=False)


class ExternalService:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def upload(
        self,
        source: Source,
        content: bytes,
        *,
        filename: str | None = None,
        channel_id: int | None = None,
        uploaded_by: int | None = None,
    ) -> UploadOutcome:
        """Store a provider file and its records; the same bytes again give the first upload (created False).
        A malformed file is a ValidationFailed naming its first bad line or field, and nothing is stored."""
        digest = hashlib.sha256(content).digest()

        async def seen(conn: AsyncConnection) -> external.UploadRow | None:
            return await external.upload_by_hash(conn, digest)

        earlier = await run_transaction(self.engine, seen)
        if earlier is not None:
            return _existing(earlier, source)
        try:
            if len(content) >= PARSE_IN_THREAD_BYTES:
                records = await asyncio.to_thread(parse, source, content)
            else:
                records = parse(source, content)
        except MalformedFile as error:
            raise errors.ValidationFailed(f"{source} file: {error}") from None

        async def store(conn: AsyncConnection) -> UploadOutcome:
            upload_id = await external.insert_upload(
                conn,
                source=source,
                sha256=digest,
                filename=filename,
                channel_id=channel_id,
                content=content,
                records=len(records),
                uploaded_by=uploaded_by,
            )
            if upload_id is None:  # a concurrent upload of the same bytes committed first
                row = await external.upload_by_hash(conn, digest)
                if row is None:  # it rolled back after all: try again
                    raise RetryTransaction
                return _existing(row, source)
            await external.insert_records(conn, upload_id, records)
            view = UploadCreatedView(upload_id=upload_id, records=len(records), source=source, sha256=digest.hex())
            return UploadOutcome(view, created=True)

        outcome: UploadOutcome = await run_transaction(self.engine, store)
        return outcome

    async def uploads(self, *, cursor: str | None, limit: int) -> UploadListView:
        before = _position("u", cursor)

        async def work(conn: AsyncConnection) -> list[external.UploadRow]:
            return await external.list_uploads(conn, before=before, limit=limit)

        rows = await run_transaction(self.engine, work)
        next_cursor = _cursor("u", rows[-1].id) if len(rows) == limit else None
        return UploadListView(items=[_upload_view(row) for row in rows], next_cursor=next_cursor)

    async def upload_detail(self, upload_id: int, *, cursor: str | None, limit: int) -> UploadDetailView:
        after = _position("r", cursor) or 0

        async def work(conn: AsyncConnection) -> tuple[external.UploadRow | None, list[ExternalRecordView]]:
            row = await external.upload_by_id(conn, upload_id)
            if row is None:
                return None, []
            records = await external.records_page(conn, upload_id, after_line=after, limit=limit)
            return row, [
                ExternalRecordView(
                    line=r.line,
                    bucket_start=r.bucket_start,
                    bucket_end=r.bucket_end,
                    api_key_id=r.api_key_id,
                    project_id=r.project_id,
                    channel_id=r.resolved_channel_id,
                    model=r.model,
                    input_tokens=r.input_tokens,
                    output_tokens=r.output_tokens,
                    cached_tokens=r.cached_tokens,
                    cache_creation_tokens=r.cache_creation_tokens,
                    requests=r.requests,
                    cost_usd=usd(r.cost_usd),
                    currency=r.currency,
                    line_item=r.line_item,
                    raw=msgspec.Raw(r.raw.encode()),
                )
                for r in records
            ]

        row, items = await run_transaction(self.engine, work, isolation_level="REPEATABLE READ")
        if row is None:
            raise errors.UploadNotFound(f"no upload {upload_id}")
        base = _upload_view(row)
        return UploadDetailView(
            **{field: getattr(base, field) for field in base.__struct_fields__},
            items=items,
            next_cursor=_cursor("r", items[-1].line) if len(items) == limit else None,
        )

    # The channel map and provider prices -------------------------------------------------------------------------

    async def set_channel(self, source: Source, external_key: str, channel_id: int) -> tuple[ChannelMapEntryView, bool]:
        async def work(conn: AsyncConnection) -> tuple[bool, datetime]:
            return await external.save_channel(conn, source, external_key, channel_id)

        created, updated_at = await run_transaction(self.engine, work)
        view = ChannelMapEntryView(
            source=source, external_key=external_key, channel_id=channel_id, updated_at=updated_at
        )
        return view, created

    async def channel_map(self) -> ChannelMapView:
        rows = await run_transaction(self.engine, external.channel_map)
        return ChannelMapView(
            items=[
                ChannelMapEntryView(
                    source=r.source, external_key=r.external_key, channel_id=r.channel_id, updated_at=r.updated_at
                )
                for r in rows
            ]
        )

    async def set_price(self, model: str, command: ProviderPriceCommand) -> tuple[ProviderPriceView, bool]:
        async def work(conn: AsyncConnection) -> tuple[bool, datetime]:
            return await external.save_price(
                conn,
                model,
                input_usd_per_mtok=command.input_usd_per_mtok,
                output_usd_per_mtok=command.output_usd_per_mtok,
                cached_input_usd_per_mtok=command.cached_input_usd_per_mtok,
                request_usd=command.request_usd,
            )

        created, updated_at = await run_transaction(self.engine, work)
        view = ProviderPriceView(
            model=model,
            input_usd_per_mtok=usd(command.input_usd_per_mtok),
            output_usd_per_mtok=usd(command.output_usd_per_mtok),
            cached_input_usd_per_mtok=usd(command.cached_input_usd_per_mtok),
            request_usd=usd(command.request_usd),
            updated_at=updated_at,
        )
        return view, created

    async def prices(self) -> ProviderPriceListView:
        rows = await run_transaction(self.engine, external.prices)
        return ProviderPriceListView(
            items=[
                ProviderPriceView(
                    model=r.model,
                    input_usd_per_mtok=usd(r.input_usd_per_mtok),
                    output_usd_per_mtok=usd(r.output_usd_per_mtok),
                    cached_input_usd_per_mtok=usd(r.cached_input_usd_per_mtok),
                    request_usd=usd(r.request_usd),
                    updated_at=r.updated_at,
                )
                for r in rows
            ]
        )
