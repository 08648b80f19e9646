"""The relay request lifecycle: holds, settlements, refunds, consumptions."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Response

from ledger_service.api import auth
from ledger_service.api.controllers.responses import respond
from ledger_service.api.params import PathKey, parse_key
from ledger_service.api.problems import PROBLEMS, replayed
from ledger_service.schemas import (
    ConsumptionCommand,
    HoldCommand,
    HoldDetailView,
    HoldView,
    RefundCommand,
    SettleCommand,
)
from ledger_service.services.ledger import LedgerService


class HoldController(Controller):
    path = "/holds"
    tags = ["lifecycle"]

    @post(
        "/",
        status_code=201,
        opt={"roles": auth.RELAY_WRITE},
        responses=replayed(HoldView),
        summary="Hold the estimate before an upstream call",
    )
    async def open_hold(
        self, data: JSONBody[HoldCommand], ledger: NamedDependency[LedgerService]
    ) -> Response[HoldView]:
        return respond(await ledger.open_hold(data))

    @get(
        "/{request_id:str}",
        opt={"roles": auth.READ_ALL},
        responses=PROBLEMS,
        summary="A hold with every entry of its request",
    )
    async def get_hold(
        self,
        request: Request,  # type: ignore[type-arg]
        request_id: PathKey,
        ledger: NamedDependency[LedgerService],
    ) -> HoldDetailView:
        # Any relay key may read any hold, so admins' notes (a reversal's `note`) are kept from relays.
        relay = request.state.principal.role == auth.RELAY
        return await ledger.hold(parse_key(request_id), admin_details=not relay)

    @post(
        "/{request_id:str}/settle",
        status_code=200,
        opt={"roles": auth.RELAY_WRITE},
        responses=PROBLEMS,
        summary="Charge the real cost",
    )
    async def settle(
        self,
        request_id: PathKey,
        data: JSONBody[SettleCommand],
        ledger: NamedDependency[LedgerService],
    ) -> Response[HoldView]:
        return respond(await ledger.settle(parse_key(request_id), data), created_status=200)

    @post(
        "/{request_id:str}/refund",
        status_code=200,
        opt={"roles": auth.RELAY_WRITE},
        responses=PROBLEMS,
        summary="Give the hold back",
    )
    async def refund(
        self,
        request_id: PathKey,
        ledger: NamedDependency[LedgerService],
        data: JSONBody[RefundCommand | None] = None,
    ) -> Response[HoldView]:
        command = data or RefundCommand()
        return respond(await ledger.refund(parse_key(request_id), command), created_status=200)


class ConsumptionController(Controller):
    path = "/consumptions"
    tags = ["lifecycle"]

    @post(
        "/",
        status_code=201,
        opt={"roles": auth.RELAY_WRITE},
        responses=replayed(HoldView),
        summary="Charge a call that had no hold",
    )
    async def consume(
        self,
        data: JSONBody[ConsumptionCommand],
        ledger: NamedDependency[LedgerService],
    ) -> Response[HoldView]:
        return respond(await ledger.consume(data))
