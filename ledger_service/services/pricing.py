"""Reading and changing model prices and group ratios. A change prices new requests only."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import pricing
from ledger_service.db.transactions import run_transaction
from ledger_service.domain.pricing import DEFAULT_COMPLETION_RATIO, DEFAULT_GROUP_RATIO, DEFAULT_MODEL_RATIO
from ledger_service.schemas import (
    GroupRatioCommand,
    GroupRatioView,
    ModelPriceCommand,
    ModelPriceView,
    PricingDefaultsView,
    PricingView,
)


class PricingService:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def pricing(self) -> PricingView:
        async def work(conn: AsyncConnection) -> PricingView:
            models = await pricing.all_models(conn)
            groups = await pricing.all_groups(conn)
            return PricingView(
                models={
                    name: ModelPriceView(model_ratio=ratio, completion_ratio=completion, model_price=price)
                    for name, ratio, completion, price in models
                },
                groups={name: GroupRatioView(group_ratio=ratio) for name, ratio in groups},
                defaults=PricingDefaultsView(
                    model_ratio=DEFAULT_MODEL_RATIO,
                    completion_ratio=DEFAULT_COMPLETION_RATIO,
                    group_ratio=DEFAULT_GROUP_RATIO,
                ),
            )

        result: PricingView = await run_transaction(self.engine, work, isolation_level="REPEATABLE READ")
        return result

    async def set_model(self, model: str, command: ModelPriceCommand) -> tuple[ModelPriceView, bool]:
        """Set a model's prices; a per-call model without a model_ratio keeps the default ratio on record."""
        model_ratio = DEFAULT_MODEL_RATIO if command.model_ratio is None else command.model_ratio

        async def work(conn: AsyncConnection) -> bool:
            return await pricing.save_model(
                conn,
                model,
                model_ratio=model_ratio,
                completion_ratio=command.completion_ratio,
                model_price=command.model_price,
            )

        created: bool = await run_transaction(self.engine, work)
        view = ModelPriceView(
            model_ratio=model_ratio,
            completion_ratio=command.completion_ratio,
            model_price=command.model_price,
        )
        return view, created

    async def set_group(self, group: str, command: GroupRatioCommand) -> tuple[GroupRatioView, bool]:
        async def work(conn: AsyncConnection) -> bool:
            return await pricing.save_group(conn, group, group_ratio=command.group_ratio)

        created: bool = await run_transaction(self.engine, work)
        return GroupRatioView(group_ratio=command.group_ratio), created
