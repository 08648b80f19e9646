"""Batches of lifecycle operations: the high-throughput path for relays that queue their calls."""

from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from ledger_service.api import auth
from ledger_service.api.problems import PROBLEMS
from ledger_service.schemas import BatchCommand, BatchView
from ledger_service.services.batch import BatchService


class BatchController(Controller):
    path = "/batch"
    tags = ["lifecycle"]

    @post(
        "/",
        status_code=200,
        opt={"roles": auth.RELAY_WRITE},
        responses=PROBLEMS,
        summary="Up to 1000 holds, settlements, refunds and consumptions in one transaction",
    )
    async def batch(self, data: JSONBody[BatchCommand], batches: NamedDependency[BatchService]) -> BatchView:
        return await batches.run(data)
