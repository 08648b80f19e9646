"""Heavy reports (reconciliation, usage, trial balance as_of) are bounded: a few slots per process, on connections
of their own, so that relay calls, /health and background jobs never wait for them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from ledger_service.db import reconciliation
from ledger_service.db.engine import create_engine
from ledger_service.services.audit import AuditService, HeavyReads
from ledger_service.settings import Settings
from tests.support import ADMIN_SECRET, LedgerClient


@pytest.fixture
def settings(database_url: str) -> Settings:
    # One shared connection: a report that took it would leave nothing for /health and the relay read.
    return Settings(
        database_url=database_url, admin_key=ADMIN_SECRET, background_tasks=False, pool_size=1, heavy_reports=1
    )


class Gate:
    """Stands in for the reconciliation's first check: signals that the report is running, then waits to be let
    go, and either goes on with the real check or fails."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = False
        self.original = reconciliation.unbalanced_entries

    async def __call__(self, conn: Any) -> reconciliation.Findings:
        self.entered.set()
        await self.release.wait()
        if self.fail:
            raise RuntimeError("the report failed")
        return await self.original(conn)


@pytest.fixture
async def gate(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gate]:
    gate = Gate()
    monkeypatch.setattr(reconciliation, "unbalanced_entries", gate)
    yield gate
    gate.release.set()


async def held_report(ledger: LedgerClient, gate: Gate) -> asyncio.Task[httpx.Response]:
    """A reconciliation started and parked in its slot."""
    gate.entered.clear()
    gate.release.clear()
    running = asyncio.create_task(ledger.get("/v1/reports/reconciliation", as_="auditor"))
    async with asyncio.timeout(30):
        await gate.entered.wait()
    return running


async def test_a_heavy_report_beyond_the_slots_is_refused_and_nothing_else_waits(
    ledger: LedgerClient, gate: Gate
) -> None:
    await ledger.fund(1, 10_000)
    running = await held_report(ledger, gate)

    heavy = ("/v1/reports/reconciliation", "/v1/reports/usage", "/v1/reports/trial-balance?as_of=2030-01-01T00:00:00Z")
    for path in heavy:
        refused = await ledger.get(path, as_="auditor")
        assert refused.status_code == 429, (path, refused.text)
        assert refused.json()["code"] == "busy"
        assert int(refused.headers["Retry-After"]) >= 1
    # The shared pool has one connection, and the held report is not on it.
    assert (await ledger.client.get("/health")).status_code == 200
    assert (await ledger.get("/v1/users/1")).status_code == 200
    assert (await ledger.get("/v1/reports/trial-balance", as_="auditor")).status_code == 200  # snapshots: light

    gate.release.set()
    assert (await running).status_code == 200
    gate.release.set()  # the next one runs straight through: the slot is free again
    assert (await ledger.get("/v1/reports/reconciliation", as_="auditor")).status_code == 200


async def test_the_slot_is_released_when_the_report_fails(ledger: LedgerClient, gate: Gate) -> None:
    running = await held_report(ledger, gate)
    gate.fail = True
    gate.release.set()
    assert (await running).status_code == 500
    gate.fail = False
    assert (await ledger.get("/v1/reports/usage", as_="auditor")).status_code == 200


async def test_the_slot_is_released_when_the_report_is_cancelled() -> None:
    heavy = HeavyReads(engine=None, slots=1)  # type: ignore[arg-type]  # the slot never touches its engine
    inside = asyncio.Event()

    async def report() -> None:
        async with heavy.slot():
            inside.set()
            await asyncio.Event().wait()

    running = asyncio.create_task(report())
    await inside.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    async with heavy.slot():  # would raise Busy had the cancelled report kept it
        pass


async def test_a_clean_reconciliation_scans_once_per_check(database_url: str) -> None:
    """Each check counts its offenders, then lists the first few: with none to list, the listing (another scan
    of the whole journal) is skipped."""
    engine = create_engine(database_url, pool_size=1)
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        report = await AuditService(engine, sweep_interval_seconds=5).reconcile()
    finally:
        await engine.dispose()
    assert report.ok
    assert [s for s in statements if "SELECT count(*) FROM (" in s]
    assert not [s for s in statements if f"LIMIT {reconciliation.OFFENDER_LIMIT}" in s]
