"""Request rows: one per hold or consumption, keyed by request_id, carrying its lifecycle state."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import journal, pricing, tables
from ledger_service.domain import accounts
from ledger_service.domain.lifecycle import RequestKind, RequestStatus
from ledger_service.domain.pricing import Prices
from ledger_service.schemas import HoldView


@dataclass(frozen=True, slots=True)
class RequestRow:
    request_id: str
    kind: RequestKind
    status: RequestStatus
    user_id: int
    token_id: int
    token_limited: bool
    group: str
    model: str
    prompt_tokens: int
    max_tokens: int
    amount: int
    trusted: bool
    prices: Prices
    channel_id: int | None
    charged: int | None
    late: bool
    request_fingerprint: bytes
    settle_fingerprint: bytes | None
    refund_fingerprint: bytes | None
    created_at: datetime
    expires_at: datetime | None
    read_at: datetime
    """The database clock when the row was read: expiry is judged by the database's time, not the host's."""

    @property
    def due(self) -> bool:
        """Open and past expires_at."""
        return self.status is RequestStatus.OPEN and self.expires_at is not None and self.read_at >= self.expires_at

    def view(self) -> HoldView:
        return HoldView(
            request_id=self.request_id,
            user_id=self.user_id,
            token_id=self.token_id,
            group=self.group,
            model=self.model,
            status=self.status.value,
            amount=self.amount,
            trusted=self.trusted,
            charged=self.charged,
            channel_id=self.channel_id,
            late=self.late,
            created_at=self.created_at,
            expires_at=self.expires_at,
        )


_READ_AT = func.clock_timestamp().label("read_at")


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _row(m: Any) -> RequestRow:
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
    )


def now_plus(delta: timedelta) -> Any:
    """The database clock plus `delta`, as a SQL expression (expiry times use the database's clock)."""
    return func.now() + delta


async def get(conn: AsyncConnection, request_id: str, *, for_update: bool = False) -> RequestRow | None:
    query = select(tables.requests, _READ_AT).where(tables.requests.c.request_id == request_id)
    if for_update:
        query = query.with_for_update()
    found = (await conn.execute(query)).mappings().first()
    return None if found is None else _row(found)


async def insert_request(conn: AsyncConnection, **values: Any) -> RequestRow:
    """Insert a request row; raises IntegrityError (23505, requests_pkey) if the request_id is taken."""
    prices: Prices = values.pop("prices")
    values["group_name"] = values.pop("group")
    values.update(
        model_ratio=prices.model_ratio,
        completion_ratio=prices.completion_ratio,
        group_ratio=prices.group_ratio,
        model_price=prices.model_price,
    )
    created = (
        (await conn.execute(insert(tables.requests).values(**values).returning(tables.requests, _READ_AT)))
        .mappings()
        .one()
    )
    return _row(created)


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
    return _row(updated)


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
    return [_row(m) for m in result.mappings()]


async def overdue_seconds(conn: AsyncConnection) -> float:
    """How long the most overdue open hold has been past its expiry; 0 when none is."""
    found = await conn.scalar(
        text(
            "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(expires_at)), 0) FROM requests"
            " WHERE status = 'open' AND expires_at <= clock_timestamp()"
        )
    )
    return float(found or 0)


async def lock_requests(conn: AsyncConnection, request_ids: Iterable[str]) -> None:
    """Lock several request rows in ascending order (see locks.lock_users for why the order matters)."""
    ids = sorted(set(request_ids))
    if ids:
        await conn.execute(
            text(
                "SELECT request_id FROM requests WHERE request_id = ANY(CAST(:ids AS text[]))"
                " ORDER BY request_id FOR UPDATE"
            ),
            {"ids": ids},
        )


@dataclass(frozen=True, slots=True)
class HoldInputs:
    """Everything a hold decides on, read in one statement once the user's lock is held."""

    request_exists: bool
    token_user_id: int | None
    token_unlimited: bool
    available: int
    token_remaining: int
    prices: Prices


_HOLD_INPUTS = text(
    f"""
    SELECT EXISTS (SELECT 1 FROM requests WHERE request_id = :request_id) AS request_exists,
           t.user_id AS token_user_id, coalesce(t.unlimited, true) AS token_unlimited,
           {journal.balance_expression("CAST(:user_account AS text)", "'quota'")} AS available,
           {journal.balance_expression("CAST(:token_account AS text)", "'allowance'")} AS token_remaining,
           m.model_ratio, m.completion_ratio, m.model_price, g.group_ratio
      FROM (SELECT 1) one
      LEFT JOIN tokens t ON t.token_id = :token_id
      LEFT JOIN model_prices m ON m.model = :model
      LEFT JOIN group_ratios g ON g.group_name = :group
    """  # noqa: S608 - fixed fragments
)


async def hold_inputs(
    conn: AsyncConnection, *, request_id: str, user_id: int, token_id: int, model: str, group: str
) -> HoldInputs:
    row = (
        await conn.execute(
            _HOLD_INPUTS,
            {
                "request_id": request_id,
                "user_account": accounts.user(user_id),
                "token_account": accounts.token(token_id),
                "token_id": token_id,
                "model": model,
                "group": group,
            },
        )
    ).one()
    return HoldInputs(
        request_exists=row.request_exists,
        token_user_id=row.token_user_id,
        token_unlimited=row.token_unlimited,
        available=int(row.available),
        token_remaining=int(row.token_remaining),
        prices=pricing.prices_of(row.model_ratio, row.completion_ratio, row.model_price, row.group_ratio),
    )
