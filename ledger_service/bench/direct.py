"""The direct scenario: the batch scenario without HTTP. This process decodes, plans and applies each client's
batches with the service's own code (BatchService, LifecycleService), so the service's HTTP layer is out of the
measurement: the batch path's ceiling."""

from __future__ import annotations

from typing import Any

import msgspec

from ledger_service.bench.driver import drive_batches
from ledger_service.bench.load import Workload
from ledger_service.bench.measurement import Measurement
from ledger_service.bench.service import Services, build_services
from ledger_service.schemas import BatchCommand


class InProcessBatches:
    """Drives the direct scenario with the service's settings, on a pool of its own. Open it before the CPU reading
    that starts a measurement and close it after the one that ends it: a backend that exits in between takes its
    CPU time with it."""

    def __init__(self, services: Services) -> None:
        self.services = services

    @classmethod
    async def open(cls, database_url: str, clients: int) -> InProcessBatches:
        # The engine is only there because BatchService wants a LedgerService: batches never use it.
        return cls(await build_services(database_url, pool_size=clients, engine_pool_size=1))

    async def close(self) -> None:
        await self.services.close()

    async def drive(self, workload: Workload, run: str) -> Measurement:
        async def apply(operations: list[dict[str, Any]]) -> int:
            command = msgspec.convert({"operations": operations}, BatchCommand, strict=True)
            view = await self.services.batches.run(command)
            return sum(1 for result in view.results if result.status >= 300)

        return await drive_batches(workload, run, apply)
