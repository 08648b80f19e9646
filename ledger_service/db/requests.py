"""Request rows: one per hold or consumption, keyed by request_id, carrying its lifecycle state."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import tables
from ledger_service.domain.lifecycle import RequestKind, RequestRow, RequestStatus
from ledger_service.domain.pricing import Prices

_READ_AT = func.clock_timestamp().label("read_at")


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def request_row(m: Mapping[Any, Any]) -> RequestRow:
    """A request row from its columns (and `read_at`, the database clock when it was read)."""
    return RequestRow(
        request_id=m["request_id"],
        kind=RequestKind(m["kind"]),
        status=RequestStatus(m["status"]),
        user_id=m["user_id"],
        token_id=m["token_id"],
        token_limited=m["token_limited"],
        group=m["group_name"],
        model=m["model"],
        prompt_tokens=m["prompt_tokens"],
        max_tokens=m["max_tokens"],
        amount=m["amount"],
        trusted=m["trusted"],
        prices=Prices(
            model_ratio=Decimal(m["model_ratio"]),
            completion_ratio=Decimal(m["completion_ratio"]),
            group_ratio=Decimal(m["group_ratio"]),
            model_price=None if m["model_price"] is None else Decimal(m["model_price"]),
        ),
        channel_id=m["channel_id"],
        charged=m["charged"],
        late=m["late"],
        request_fingerprint=bytes(m["request_fingerprint"]),
        settle_fingerprint=_bytes(m["settle_fingerprint"]),
        refund_fingerprint=_bytes(m["refund_fingerprint"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        read_at=m["read_at"],
        settled_prompt_tokens=m["settled_prompt_tokens"],
        completion_tokens=m["completion_tokens"],
    )


async def get(conn: AsyncConnection, request_id: str) -> RequestRow | None:
    query = select(tables.requests, _READ_AT).where(tables.requests.c.request_id == request_id)
    found = (await conn.execute(query)).mappings().first()
    return None if found is None else request_row(found)


async def resolve(conn: AsyncConnection, request_id: str, **changes: Any) -> RequestRow:
    """Record a lifecycle step (status and what settled it). The database refuses steps out of order."""
    updated = (
        (
            await conn.execute(
                update(tables.requests)
                .where(tables.requests.c.request_id == request_id)
                .values(resolved_at=func.now(), **changes)
                .returning(tables.requests, _READ_AT)
            )
        )
        .mappings()
        .one()
    )
    return request_row(updated)


async def held_by(conn: AsyncConnection, *, user_id: int | None = None, token_id: int | None = None) -> int:
    """Sum of the amounts of a user's or a token's open holds."""
    column = tables.requests.c.user_id if user_id is not None else tables.requests.c.token_id
    subject = user_id if user_id is not None else token_id
    total = await conn.scalar(
        select(func.coalesce(func.sum(tables.requests.c.amount), 0)).where(
            column == subject, tables.requests.c.status == RequestStatus.OPEN.value
        )
    )
    return int(total or 0)


async def lock_due_holds(conn: AsyncConnection, *, limit: int) -> list[RequestRow]:
    """Open holds past expires_at, locked; rows another process is expiring right now are skipped."""
    result = await conn.execute(
        text(
            "SELECT *, clock_timestamp() AS read_at FROM requests WHERE status = 'open' AND expires_at <= now()"
            " ORDER BY expires_at LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"limit": limit},
    )
    return [request_row(m) for m in result.mappings()]


async def overdue_seconds(conn: AsyncConnection) -> float:
    """How long the most overdue open hold has been past its expiry; 0 when none is."""
    found = await conn.scalar(
        text(
            "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(expires_at)), 0) FROM requests"
            " WHERE status = 'open' AND expires_at <= clock_timestamp()"
        )
    )
    return float(found or 0)
