"""Background work each service process runs: refreshing snapshots and expiring overdue holds.

Both are safe to run in every process at once: the snapshotter takes a lock and skips its turn when another
process holds it; the sweeper expires holds through the lifecycle, whose apply lets each hold expire once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service import metrics
from ledger_service.db import requests, snapshots
from ledger_service.db.snapshots import SnapshotRun
from ledger_service.db.transactions import run_transaction
from ledger_service.services.audit import AuditService
from ledger_service.services.lifecycle import LifecycleService
from ledger_service.settings import Settings

log = logging.getLogger(__name__)


async def refresh_snapshots(engine: AsyncEngine, *, checkpoint_every: float = 3600.0) -> SnapshotRun | None:
    """Materialize balances and usage up to the current horizon; None if another process is doing it."""

    async def work(conn: AsyncConnection) -> SnapshotRun | None:
        return await snapshots.refresh(conn, checkpoint_every=checkpoint_every)

    result: SnapshotRun | None = await run_transaction(engine, work)
    return result


async def _every(seconds: float, name: str, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A failed round (database restarting, say) is logged and tried again at the next interval.
            metrics.BACKGROUND_FAILURES.labels(job=name).inc()
            log.exception("%s failed; retrying in %ss", name, seconds)
        await asyncio.sleep(seconds)


class Housekeeping:
    """Starts and stops the periodic jobs of one process."""

    def __init__(
        self, engine: AsyncEngine, lifecycle: LifecycleService, audit: AuditService, settings: Settings
    ) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.audit = audit
        self.settings = settings
        self._tasks: list[asyncio.Task[None]] = []

    async def materialize(self) -> None:
        """One round of the snapshotter: refresh the snapshots, then seal what has become final."""
        await refresh_snapshots(self.engine, checkpoint_every=self.settings.snapshot_history_seconds)
        await self.audit.seal()
        ages = await run_transaction(self.engine, snapshots.ages)
        metrics.SNAPSHOT_AGE.set(ages.snapshot_age_seconds)
        metrics.UNSEALED_ENTRIES.set(ages.unsealed_entries)

    async def sweep(self) -> None:
        """One round of the sweeper: expire what is due, then report how far behind the most overdue hold is."""
        await self.lifecycle.expire_due_holds()
        metrics.SWEEPER_LAG.set(await run_transaction(self.engine, requests.overdue_seconds))

    def start(self) -> None:
        settings = self.settings
        self._tasks = [
            asyncio.create_task(_every(settings.snapshot_interval_seconds, "snapshot refresh", self.materialize)),
            asyncio.create_task(_every(settings.sweep_interval_seconds, "expiry sweep", self.sweep)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
