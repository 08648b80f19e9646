"""The margin report: per channel and model and calendar month (UTC), what users were charged against what the
provider cost (docs/external.md, "Margin report"). Rules: domain/external_matching.py (`margin_row`)."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import external_reconciliation as store
from ledger_service.db.transactions import run_transaction
from ledger_service.domain import errors
from ledger_service.domain.external_matching import (
    LedgerUsage,
    MarginRow,
    latest_records,
    margin_row,
    quota_usd,
    resolve_channel,
    usd,
)
from ledger_service.schemas import MarginRowView, MarginTotalsView, MarginView
from ledger_service.settings import Settings

MONTH = re.compile(r"\A([0-9]{4})-(0[1-9]|1[0-2])\Z")


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month), UTC."""
    match = MONTH.match(month)
    if match is None:
        raise errors.ValidationFailed("month must be YYYY-MM, such as 2026-12")
    year, number = int(match.group(1)), int(match.group(2))
    if not 1 <= year <= 9998:
        raise errors.ValidationFailed("month must be YYYY-MM, such as 2026-12")
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end


def _text(amount: Decimal | None) -> str | None:
    return None if amount is None else str(amount)


class MarginService:
    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    async def margin(self, month: str) -> MarginView:
        start, end = month_bounds(month)
        per_usd = self.settings.quota_per_usd

        async def work(conn: AsyncConnection) -> list[MarginRow]:
            charges = await store.ledger_by_channel_model(conn, start=start, end=end)
            records = latest_records(
                await store.window_records(
                    conn, since=start, until=end, max_upload_id=await store.last_upload_id(conn), costs_only=True
                )
            )
            channel_map = await store.channel_map(conn)
            costs: dict[tuple[int | None, str | None], Decimal] = defaultdict(Decimal)
            for record in records:
                placed = resolve_channel(record, channel_map)
                assert record.cost_usd is not None
                costs[(placed.channel_id, record.model)] += record.cost_usd
            prices = await store.prices(conn)
            keys = sorted(set(charges) | set(costs), key=lambda k: (k[0] is None, k[0] or 0, k[1] is None, k[1] or ""))
            return [
                margin_row(
                    channel_id=channel,
                    model=model,
                    usage=charges.get((channel, model), LedgerUsage()),
                    recorded_cost=costs.get((channel, model)),
                    price=None if model is None else prices.get(model),
                    quota_per_usd=per_usd,
                )
                for channel, model in keys
            ]

        rows = await run_transaction(self.engine, work, isolation_level="REPEATABLE READ")
        total_quota = sum(row.charged_quota for row in rows)
        known = [row for row in rows if row.provider_cost_usd is not None]
        total_cost = sum((row.provider_cost_usd or Decimal(0) for row in known), Decimal(0))
        known_charged = sum((row.charged_usd for row in known), Decimal(0))
        return MarginView(
            month=month,
            quota_per_usd=per_usd,
            rows=[
                MarginRowView(
                    channel_id=row.channel_id,
                    model=row.model,
                    charged_quota=row.charged_quota,
                    charged_usd=str(row.charged_usd),
                    provider_cost_usd=_text(row.provider_cost_usd),
                    cost_estimated=row.cost_estimated,
                    margin_usd=_text(row.margin_usd),
                )
                for row in rows
            ],
            totals=MarginTotalsView(
                charged_quota=total_quota,
                charged_usd=str(quota_usd(total_quota, per_usd)),
                provider_cost_usd=str(usd(total_cost)),
                margin_usd=str(usd(known_charged - total_cost)),
                rows_without_cost=len(rows) - len(known),
            ),
        )
