"""The books check after a workload: materialize the balance snapshots (and seal the audit chain), then check that
every ledger sums to zero and, optionally, that the whole reconciliation is clean."""

from __future__ import annotations

from typing import Any

from ledger_service.bench.service import build_services
from ledger_service.services.housekeeping import refresh_snapshots


async def refresh_and_check(url: str, *, full_reconciliation: bool, seal: bool = True) -> dict[str, Any]:
    """Materialize, then check: every ledger sums to zero; optionally, the whole reconciliation."""
    # The whole-journal checks may take longer than the service lets one statement take: after a long run on a fast
    # machine the reconciliation's walk passes the service's 60 s.
    services = await build_services(url, pool_size=1, engine_pool_size=2, command_timeout=None)
    try:
        audit = services.audit
        await refresh_snapshots(services.engine)
        if seal:
            await audit.seal()
        trial = await audit.trial_balance(as_of=None)
        totals = {ledger: view.total for ledger, view in trial.ledgers.items()}
        result: dict[str, Any] = {"ledger_totals": totals, "balanced": all(t == 0 for t in totals.values())}
        if full_reconciliation:
            report = await audit.reconcile()
            result["reconciliation_ok"] = report.ok
            result["failed_checks"] = [check.name for check in report.checks if not check.ok]
        return result
    finally:
        await services.close()
