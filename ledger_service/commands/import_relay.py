"""`ledger-service import-relay SOURCE`: run an import and print what it did, or with --dry-run what it would do."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.commands.progress import ProgressBar
from ledger_service.domain.pricing import QUOTA_PER_USD
from ledger_service.relay.source import open_source
from ledger_service.services.relay_import import ImportReport, RelayImport
from ledger_service.settings import Settings

SHOWN = 20
"""Lines per itemised section on stdout; --json FILE lists everything."""


async def run_import(
    engine: AsyncEngine,
    settings: Settings,
    url: str,
    *,
    source_id: str | None,
    dry_run: bool,
    prepare: Callable[[], Awaitable[None]],
) -> ImportReport:
    """Open the source first, so that a source it cannot read is refused before `prepare` (migrations) runs."""
    async with open_source(url, source_id=source_id) as source:
        await prepare()
        return await RelayImport(engine, settings).run(source, dry_run=dry_run, progress=ProgressBar())


def usd(quota: int) -> str:
    return f"{Decimal(quota) / QUOTA_PER_USD:f} USD"


def render(report: ImportReport) -> str:
    info, summary = report.source, report.summary()
    users, tokens, prices, quota = summary["users"], summary["tokens"], summary["prices"], summary["quota"]
    verb = "would be" if report.dry_run else ""
    run = "dry run: nothing was posted" if report.dry_run else f"run {report.run_id}"
    lines = [
        f"import-relay: {info.kind} database {info.display_url}",
        f"source id {info.source_id}, {run}",
        "",
        f"  users   {users['read']:>9} read  {users['opened']:>9} opened  {users['adjusted']:>7} adjusted"
        f"  {users['unchanged']:>9} unchanged  {users['skipped']:>6} skipped",
        f"  tokens  {tokens['read']:>9} read  {tokens['registered']:>9} registered  {tokens['moved']:>5} moved"
        f"  {tokens['unchanged']:>9} unchanged  {tokens['skipped']:>6} skipped",
        f"  prices  {prices['stored']:>9} stored  {prices['models_set']:>7} models set  {prices['groups_set']:>3}"
        f" groups set  {prices['unchanged']:>5} unchanged",
        f"  quota   opened {quota['opened']} ({usd(quota['opened'])}), adjusted {quota['adjusted']:+d}"
        f" ({usd(quota['adjusted'])})",
        f"  debts   {quota['debts']} with a negative quota, {quota['debt_total']} in all ({usd(quota['debt_total'])})",
    ]
    if verb:
        lines[3:3] = ["  (counts of what would be posted)"]
    adjusted = [f"user {m.user_id}: {m.before} -> {m.relay_quota} ({m.amount:+d})" for m in report.adjusted()]
    moved = [
        f"token {m.token_id}: allowance {m.allowance_before} -> {m.allowance_before + m.delta}"
        + (" (unlimited)" if m.unlimited else "")
        for m in report.tokens
        if not m.first
    ]
    models = [
        f"model {name}: model_ratio {p.model_ratio}, completion_ratio {p.completion_ratio}"
        + ("" if p.model_price is None else f", model_price {p.model_price} USD per call")
        for name, p in report.prices.models.items()
    ]
    groups = [f"group {name}: group_ratio {ratio}" for name, ratio in report.prices.groups.items()]
    lines += _section("balances that moved in the relay since the last run", adjusted)
    lines += _section("token allowances that moved in the relay since the last run", moved)
    lines += _section("prices set", models + groups)
    lines += _section("debts (negative relay quota, imported as it is)", [f"user {u}: {q}" for u, q in report.debts])
    lines += _section(
        "listed: not imported, or imported with a caveat",
        [f"{item.subject} {item.key}: {item.reason}" for item in report.listed],
    )
    return "\n".join(lines)


def _section(title: str, items: Sequence[str]) -> list[str]:
    if not items:
        return []
    lines = ["", f"{title} ({len(items)}):"]
    lines += [f"  {item}" for item in items[:SHOWN]]
    if len(items) > SHOWN:
        lines.append(f"  ... and {len(items) - SHOWN} more (--json FILE lists them all)")
    return lines


def write_json(report: ImportReport, path: Path) -> None:
    """Everything the run did, item by item, for a script or an auditor."""
    document: dict[str, Any] = {
        "source": {
            "kind": str(report.source.kind),
            "url": report.source.display_url,
            "source_id": report.source.source_id,
        },
        "run_id": report.run_id,
        "dry_run": report.dry_run,
        "summary": report.summary(),
        "users": [
            {"user_id": m.user_id, "kind": str(m.kind), "amount": m.amount, "relay_quota": m.relay_quota}
            for m in report.users
        ],
        "tokens": [
            {
                "token_id": m.token_id,
                "user_id": m.user_id,
                "unlimited": m.unlimited,
                "remain_quota": m.remain_quota,
                "allowance_change": m.delta,
                "first_import": m.first,
            }
            for m in report.tokens
        ],
        "prices": {
            "models": {
                name: {
                    "model_ratio": str(p.model_ratio),
                    "completion_ratio": str(p.completion_ratio),
                    "model_price": None if p.model_price is None else str(p.model_price),
                }
                for name, p in report.prices.models.items()
            },
            "groups": {name: str(ratio) for name, ratio in report.prices.groups.items()},
        },
        "debts": [{"user_id": u, "quota": q} for u, q in report.debts],
        "listed": _listed(report.listed),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def _listed(items: Iterable[Any]) -> list[dict[str, str]]:
    return [{"subject": item.subject, "key": item.key, "reason": item.reason} for item in items]
