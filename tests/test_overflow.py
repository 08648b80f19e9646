"""Sums past bigint (issue 14): accepted writes whose totals exceed 2^63-1 leave every read, report and background
job working. Each amount is at most 10^15; ten batches of 1,000 consumptions of 10^15 put 10^19 on one user, token
and channel."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from ledger_service.db import snapshots
from ledger_service.db.transactions import run_transaction
from ledger_service.schemas import TopupCommand
from ledger_service.services.audit import AuditService
from ledger_service.services.housekeeping import Housekeeping, refresh_snapshots
from ledger_service.services.ledger import LedgerService
from ledger_service.settings import Settings
from tests.support import LedgerClient

MAX = 10**15
BIGINT = 2**63 - 1


async def consume_many(ledger: LedgerClient, *, batches: int, quota: int, prefix: str) -> None:
    """1,000 consumptions of 10^15 tokens per batch, each charged `quota`, on user 1, token 1, channel 1."""
    body = {"user_id": 1, "token_id": 1, "channel_id": 1, "model": "gpt-4o", "prompt_tokens": MAX,
            "completion_tokens": MAX, "quota": quota}  # fmt: skip
    for b in range(batches):
        operations = [{"op": "consume", "request_id": f"{prefix}-{b}-{i}", "body": body} for i in range(1000)]
        response = await ledger.post("/v1/batch", {"operations": operations})
        assert response.status_code == 200, response.text
        assert all(r["status"] == 201 for r in response.json()["results"])


async def materialize(service: LedgerService, settings: Settings) -> None:
    """One round of the background snapshotter: refresh, seal, ages (what `ledger-service snapshot` runs)."""
    audit = AuditService(service.engine, sweep_interval_seconds=5)
    await Housekeeping(service.engine, service.lifecycle, audit, settings).materialize()


async def ok(ledger: LedgerClient, path: str, as_: str = "relay") -> Any:
    response = await ledger.get(path, as_=as_)
    assert response.status_code == 200, (path, response.text)
    return response.json()


async def assert_everything_reads(ledger: LedgerClient) -> None:
    for path in ("/v1/users/1", "/v1/tokens/1", "/v1/channels/1", "/v1/holds/attack-0-0"):
        await ok(ledger, path)
    for path in ("/v1/reports/trial-balance", "/v1/accounts/user:1", "/v1/accounts/channel:1",
                 "/v1/accounts/system:issuance", "/v1/accounts/user:1/postings", "/v1/entries"):  # fmt: skip
        await ok(ledger, path, as_="auditor")
    as_of = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for path in (f"/v1/accounts/user:1?as_of={as_of}", f"/v1/reports/trial-balance?as_of={as_of}"):
        await ok(ledger, path, as_="auditor")
    for group_by in ("channel", "model", "user", "token"):
        await ok(ledger, f"/v1/reports/usage?group_by={group_by}&bucket=day", as_="auditor")
    report = await ok(ledger, "/v1/reports/reconciliation", as_="auditor")
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]


async def test_balances_past_bigint_stay_readable(
    ledger: LedgerClient, service: LedgerService, settings: Settings
) -> None:
    await ledger.token(1, 1)
    await consume_many(ledger, batches=10, quota=MAX, prefix="attack")
    assert await ledger.raw_balance("user:1") == -10 * 1000 * MAX < -BIGINT
    await materialize(service, settings)
    await consume_many(ledger, batches=1, quota=MAX, prefix="after")  # through the snapshot rows, past bigint
    await materialize(service, settings)
    assert (await run_transaction(service.engine, snapshots.ages)).unsealed_entries == 0  # all sealed

    user = await ok(ledger, "/v1/users/1")
    assert user["used"] == 11 * 1000 * MAX, user
    assert (await ok(ledger, "/v1/accounts/user:1", as_="auditor"))["balances"]["quota"] == -11 * 1000 * MAX
    usage = await ok(ledger, "/v1/reports/usage?group_by=user", as_="auditor")
    assert usage["rows"][0]["quota"] == usage["rows"][0]["prompt_tokens"] == 11 * 1000 * MAX
    await assert_everything_reads(ledger)
    # The user's writes still answer as the contract says: a hold is refused (no quota), a top-up is taken.
    assert (await ledger.hold(max_tokens=10)).status_code == 403
    await ledger.fund(1, MAX)
    await ledger.assert_books_balance()


async def test_token_sums_past_bigint_in_the_usage_report(
    ledger: LedgerClient, service: LedgerService, settings: Settings
) -> None:
    """Free calls (quota 0) add no balance, but their token counts add up in the usage report."""
    await ledger.token(1, 1)
    await consume_many(ledger, batches=10, quota=0, prefix="attack")
    await materialize(service, settings)
    for bucket in ("none", "hour", "day"):
        rows = (await ok(ledger, f"/v1/reports/usage?bucket={bucket}", as_="auditor"))["rows"]
        assert [(r["prompt_tokens"], r["completion_tokens"], r["quota"]) for r in rows] == [(10**19, 10**19, 0)]
    await assert_everything_reads(ledger)


async def test_reconciliation_fails_while_the_background_round_keeps_failing(
    ledger: LedgerClient, service: LedgerService
) -> None:
    """Before, a refresh failing every round (as after the overflow) stopped sealing while the reconciliation said
    ok. Now entries that the refresh, or the sealing, has not taken in within ten intervals fail it."""
    # Two views of the same books, one with a grace of an hour and one of ten microseconds: the entry is within
    # the first and past the second, with no waiting.
    patient = AuditService(service.engine, sweep_interval_seconds=5, snapshot_interval_seconds=360)
    audit = AuditService(service.engine, sweep_interval_seconds=5, snapshot_interval_seconds=0.000001)

    async def stalled(auditor: AuditService = audit) -> list[str]:
        report = await auditor.reconcile()
        check = next(c for c in report.checks if c.name == "background_jobs_current")
        assert report.ok == check.ok  # nothing else is wrong
        return check.offenders

    await ledger.fund(1, 100)
    assert await stalled(patient) == []  # within the grace
    offenders = await stalled()  # past it, and no round ran: nothing refreshed, nothing sealed
    assert ["refresh failing" in o for o in offenders] == [True, False], offenders
    assert "not sealed" in offenders[1]
    await refresh_snapshots(service.engine)  # the refresh succeeds again, sealing still fails
    offenders = await stalled()
    assert ["not sealed" in o for o in offenders] == [True], offenders
    await audit.seal()
    assert await stalled() == []


async def test_issuance_past_bigint_stays_readable(
    ledger: LedgerClient, service: LedgerService, settings: Settings
) -> None:
    """About 9,200 admin top-ups of 10^15 (50 at a time) put user 1 past 2^63 and system:issuance past -2^63."""
    topups = 9300
    for start in range(0, topups, 50):
        commands = [TopupCommand(user_id=1, amount=MAX, reference=f"issuance-{n}") for n in range(start, start + 50)]
        await asyncio.gather(*(service.topup(command) for command in commands))
    await materialize(service, settings)
    await ledger.fund(1, MAX)  # a top-up after the snapshot: the read adds it to a snapshot row past bigint
    issuance = (await ok(ledger, "/v1/accounts/system:issuance", as_="auditor"))["balances"]["quota"]
    assert issuance == -(topups + 1) * MAX < -BIGINT
    quota = (await ok(ledger, "/v1/reports/trial-balance", as_="auditor"))["ledgers"]["quota"]
    assert quota == {"total": 0, "by_kind": {"system": -(topups + 1) * MAX, "user": (topups + 1) * MAX}}
    # Holds decided on a balance past bigint (the lifecycle's premises), settled and read back.
    await ledger.token(1, 1)
    hold = await ledger.hold(request_id="rich", max_tokens=10)
    assert hold.status_code == 201, hold.text
    settle = {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 10}
    assert (await ledger.post("/v1/holds/rich/settle", settle)).status_code == 200
    user = await ok(ledger, "/v1/users/1")
    assert user["available"] == (topups + 1) * MAX - user["used"] > BIGINT
    await materialize(service, settings)
    report = await ok(ledger, "/v1/reports/reconciliation", as_="auditor")
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    await ledger.assert_books_balance()
