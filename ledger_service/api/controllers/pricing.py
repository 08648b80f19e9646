"""Model prices and group ratios."""

from __future__ import annotations

from litestar import Controller, get, put
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Response

from ledger_service.api import auth
from ledger_service.api.params import PathName, parse_name
from ledger_service.api.problems import PROBLEMS, created
from ledger_service.schemas import (
    GroupRatioCommand,
    GroupRatioView,
    ModelPriceCommand,
    ModelPriceView,
    PricingView,
)
from ledger_service.services.pricing import PricingService


class PricingController(Controller):
    path = "/pricing"
    tags = ["pricing"]

    @get(
        "/", opt={"roles": auth.READ_ALL}, responses=PROBLEMS, summary="Every model price, group ratio and the defaults"
    )
    async def pricing(self, prices: NamedDependency[PricingService]) -> PricingView:
        return await prices.pricing()

    @put(
        "/models/{model:path}",
        status_code=200,
        opt={"roles": auth.ADMIN_ONLY},
        responses=created(ModelPriceView),
        summary="Set a model's ratios (new requests only)",
    )
    async def set_model(
        self,
        model: PathName,
        data: JSONBody[ModelPriceCommand],
        prices: NamedDependency[PricingService],
    ) -> Response[ModelPriceView]:
        view, created = await prices.set_model(parse_name(model.lstrip("/"), "model"), data)
        return Response(view, status_code=201 if created else 200)

    @put(
        "/groups/{group:str}",
        status_code=200,
        opt={"roles": auth.ADMIN_ONLY},
        responses=created(GroupRatioView),
        summary="Set a group's ratio (new requests only)",
    )
    async def set_group(
        self,
        group: PathName,
        data: JSONBody[GroupRatioCommand],
        prices: NamedDependency[PricingService],
    ) -> Response[GroupRatioView]:
        view, created = await prices.set_group(parse_name(group, "group"), data)
        return Response(view, status_code=201 if created else 200)
