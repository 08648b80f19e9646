"""Model prices and group ratios."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import tables
from ledger_service.domain.pricing import (
    DEFAULT_COMPLETION_RATIO,
    DEFAULT_GROUP_RATIO,
    DEFAULT_MODEL_RATIO,
    Prices,
)


def prices_of(model_ratio: Any, completion_ratio: Any, model_price: Any, group_ratio: Any) -> Prices:
    """Prices from a price row and a group row, either of which may be missing (the defaults then apply)."""
    return Prices(
        model_ratio=DEFAULT_MODEL_RATIO if model_ratio is None else Decimal(model_ratio),
        completion_ratio=DEFAULT_COMPLETION_RATIO if completion_ratio is None else Decimal(completion_ratio),
        group_ratio=DEFAULT_GROUP_RATIO if group_ratio is None else Decimal(group_ratio),
        model_price=None if model_price is None else Decimal(model_price),
    )


async def all_models(conn: AsyncConnection) -> list[tuple[str, Decimal, Decimal, Decimal | None]]:
    rows = await conn.execute(select(tables.model_prices).order_by(tables.model_prices.c.model))
    return [(r.model, r.model_ratio, r.completion_ratio, r.model_price) for r in rows]


async def all_groups(conn: AsyncConnection) -> list[tuple[str, Decimal]]:
    rows = await conn.execute(select(tables.group_ratios).order_by(tables.group_ratios.c.group_name))
    return [(r.group_name, r.group_ratio) for r in rows]


async def save_model(
    conn: AsyncConnection,
    model: str,
    *,
    model_ratio: Decimal,
    completion_ratio: Decimal,
    model_price: Decimal | None,
) -> bool:
    """Insert or replace a model's prices; True when the model was new."""
    statement = insert(tables.model_prices).values(
        model=model, model_ratio=model_ratio, completion_ratio=completion_ratio, model_price=model_price
    )
    row = (
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=[tables.model_prices.c.model],
                set_={
                    "model_ratio": statement.excluded.model_ratio,
                    "completion_ratio": statement.excluded.completion_ratio,
                    "model_price": statement.excluded.model_price,
                    "updated_at": func.now(),
                },
            ).returning(text("(xmax = 0) AS inserted"))
        )
    ).one()
    return bool(row.inserted)


async def save_group(conn: AsyncConnection, group: str, *, group_ratio: Decimal) -> bool:
    statement = insert(tables.group_ratios).values(group_name=group, group_ratio=group_ratio)
    row = (
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=[tables.group_ratios.c.group_name],
                set_={"group_ratio": statement.excluded.group_ratio, "updated_at": func.now()},
            ).returning(text("(xmax = 0) AS inserted"))
        )
    ).one()
    return bool(row.inserted)
