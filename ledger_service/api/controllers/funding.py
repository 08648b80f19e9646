"""Funding users and registering tokens."""

from __future__ import annotations

from litestar import Controller, post, put
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Response

from ledger_service.api import auth
from ledger_service.api.controllers.responses import respond
from ledger_service.api.params import PathId, parse_id
from ledger_service.api.problems import created, replayed
from ledger_service.schemas import AdjustmentCommand, FundingView, TokenCommand, TokenView, TopupCommand
from ledger_service.services.ledger import LedgerService


class FundingController(Controller):
    path = "/"
    tags = ["funding"]

    @post(
        "/topups",
        status_code=201,
        opt={"roles": auth.ADMIN_ONLY},
        responses=replayed(FundingView),
        summary="Credit a user's quota",
    )
    async def topup(
        self, data: JSONBody[TopupCommand], ledger: NamedDependency[LedgerService]
    ) -> Response[FundingView]:
        return respond(await ledger.topup(data))

    @post(
        "/adjustments",
        status_code=201,
        opt={"roles": auth.ADMIN_ONLY},
        responses=replayed(FundingView),
        summary="Correct a user's quota (signed)",
    )
    async def adjust(
        self, data: JSONBody[AdjustmentCommand], ledger: NamedDependency[LedgerService]
    ) -> Response[FundingView]:
        return respond(await ledger.adjust(data))

    @put(
        "/tokens/{token_id:str}",
        status_code=200,
        opt={"roles": auth.RELAY_WRITE},
        responses=created(TokenView),
        summary="Register a token or set its allowance",
    )
    async def set_token(
        self,
        token_id: PathId,
        data: JSONBody[TokenCommand],
        ledger: NamedDependency[LedgerService],
    ) -> Response[TokenView]:
        return respond(await ledger.set_token(parse_id(token_id, "token_id"), data))
