"""Request rows outside the lifecycle's own statements: a request by id, what is held, what is due."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.domain.lifecycle import RequestRow


def request_row(columns: Any) -> RequestRow:
    """A request row from its columns (a result row's mapping)."""
    return msgspec.convert(dict(columns), RequestRow)


async def get(conn: AsyncConnection, request_id: str) -> RequestRow | None:
    found = (
        (await conn.execute(text("SELECT * FROM requests WHERE request_id = :request_id"), {"request_id": request_id}))
        .mappings()
        .first()
    )
    return None if found is None else request_row(found)


_HELD_BY_USER = text("SELECT coalesce(sum(amount), 0) FROM requests WHERE user_id = :subject AND status = 'open'")
_HELD_BY_TOKEN = text("SELECT coalesce(sum(amount), 0) FROM requests WHERE token_id = :subject AND status = 'open'")


async def held_by(conn: AsyncConnection, *, user_id: int | None = None, token_id: int | None = None) -> int:
    """Sum of the amounts of a user's or a token's open holds."""
    query, subject = (_HELD_BY_USER, user_id) if user_id is not None else (_HELD_BY_TOKEN, token_id)
    return int(await conn.scalar(query, {"subject": subject}) or 0)


async def overdue_seconds(conn: AsyncConnection) -> float:
    """How long the most overdue open hold has been past its expiry; 0 when none is."""
    found = await conn.scalar(
        text(
            "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(expires_at)), 0) FROM requests"
            " WHERE status = 'open' AND expires_at <= clock_timestamp()"
        )
    )
    return float(found or 0)
