"""`compare-relay`: the relay's own bills against the ledger's over a window, streamed on both sides.

The rules (pairing, classes, window edges, drift) are in domain/relay_compare.py; this module reads the relay
(relay/source.py) and the ledger (db/relay_compare.py) page by page, merges the two time-ordered streams into the
matcher, and writes what it decides as it goes: every row to the CSV, the differences to the JSON, the first
few to the screen. Nothing here holds more than a page per side and the matcher's sliding window, so memory does
not grow with the window's length.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.db import relay_compare as ledger_side
from ledger_service.domain.relay_compare import (
    BalanceComparison,
    LogComparison,
    LogMatcher,
    Outcome,
    Tally,
    Tolerances,
    compare_token,
    compare_user,
)
from ledger_service.domain.relays import RelayLog
from ledger_service.relay.source import RelaySource, SourceInfo, open_source

T = TypeVar("T")

CSV_COLUMNS = (
    "record",
    "outcome",
    "time",
    "relay_log_id",
    "request_id",
    "ledger_entry_id",
    "ledger_time",
    "user_id",
    "token_id",
    "channel_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "relay_quota",
    "ledger_quota",
    "difference",
    "relay_unlimited",
    "ledger_unlimited",
    "reason",
)


@dataclass(frozen=True, slots=True)
class CompareOptions:
    since: datetime
    until: datetime
    tolerances: Tolerances = field(default_factory=Tolerances)
    csv_path: Path | None = None
    json_path: Path | None = None
    shown: int = 20
    """Differences listed on the screen; the rest are counted ("... N more, see --csv")."""
    log_batch: int = 5000
    account_batch: int = 2000


@dataclass(slots=True)
class CompareReport:
    source: SourceInfo
    since: datetime
    until: datetime
    tolerances: Tolerances
    tally: Tally = field(default_factory=Tally.empty)
    shown: list[dict[str, Any]] = field(default_factory=list)
    hidden: int = 0
    logs_read: int = 0
    charges_read: int = 0
    peak_pending: int = 0

    @property
    def ok(self) -> bool:
        return self.tally.ok

    def summary(self) -> dict[str, Any]:
        return {
            "source": {
                "kind": self.source.kind.value,
                "url": self.source.display_url,
                "source_id": self.source.source_id,
            },
            "since": _iso(self.since),
            "until": _iso(self.until),
            "tolerances": {
                "time_seconds": self.tolerances.time_seconds,
                "amount": self.tolerances.amount,
                "balance": self.tolerances.balance,
            },
            "pairing": "request_id" if self.source.kind.value == "one-api" else "composite",
            "relay_logs_read": self.logs_read,
            "ledger_charges_read": self.charges_read,
            **self.tally.as_dict(),
        }


def _iso(moment: datetime | float | None) -> str:
    if moment is None:
        return ""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def log_row(c: LogComparison) -> dict[str, Any]:
    r, g = c.relay, c.ledger
    return {
        "record": "log",
        "outcome": c.outcome.value,
        "time": _iso(c.at),
        "relay_log_id": r.id if r else "",
        "request_id": (g.request_id if g else None) or (r.request_id if r else None) or "",
        "ledger_entry_id": g.entry_id if g else "",
        "ledger_time": _iso(g.at) if g else "",
        "user_id": r.user_id if r else g.user_id if g else "",
        "token_id": (r.token_id if r and r.token_id is not None else g.token_id if g else ""),
        "channel_id": r.channel_id if r else g.channel_id if g else "",
        "model": r.model_name if r else g.model if g else "",
        "prompt_tokens": r.prompt_tokens if r else g.prompt_tokens if g else "",
        "completion_tokens": r.completion_tokens if r else g.completion_tokens if g else "",
        "relay_quota": r.quota if r else "",
        "ledger_quota": g.charged if g else "",
        "difference": "" if c.difference is None else c.difference,
        "relay_unlimited": "",
        "ledger_unlimited": "",
        "reason": "",
    }


def balance_row(c: BalanceComparison) -> dict[str, Any]:
    def flag(value: bool | None) -> str:
        return "" if value is None else str(value).lower()

    return {
        "record": c.subject,
        "outcome": "drift" if c.drifted else "ok",
        "time": "",
        "relay_log_id": "",
        "request_id": "",
        "ledger_entry_id": "",
        "ledger_time": "",
        "user_id": c.id if c.subject == "user" else "",
        "token_id": c.id if c.subject == "token" else "",
        "channel_id": "",
        "model": "",
        "prompt_tokens": "",
        "completion_tokens": "",
        "relay_quota": c.relay,
        "ledger_quota": "" if c.ledger is None else c.ledger,
        "difference": "" if c.difference is None else c.difference,
        "relay_unlimited": flag(c.relay_unlimited),
        "ledger_unlimited": flag(c.ledger_unlimited),
        "reason": c.reason,
    }


async def _flatten(pages: AsyncIterator[list[T]]) -> AsyncIterator[T]:
    async for page in pages:
        for item in page:
            yield item


class _Sink:
    """Where decided rows go: the CSV (every row), the JSON (differences), the screen (the first few)."""

    def __init__(self, report: CompareReport, options: CompareOptions, csv_file: IO[str] | None) -> None:
        self.report = report
        self.options = options
        self.csv = csv.DictWriter(csv_file, CSV_COLUMNS) if csv_file is not None else None
        if self.csv is not None:
            self.csv.writeheader()
        self.json: IO[str] | None = None
        self._json_rows = 0

    def open_json(self, path: Path) -> None:
        self.json = path.open("w", encoding="utf-8")
        self.json.write('{"differences": [')

    def difference(self, row: dict[str, Any]) -> None:
        report = self.report
        if len(report.shown) < self.options.shown:
            report.shown.append(row)
        else:
            report.hidden += 1
        if self.json is not None:
            self.json.write(("," if self._json_rows else "") + "\n  " + json.dumps(_typed(row), ensure_ascii=False))
            self._json_rows += 1

    def log(self, comparison: LogComparison) -> None:
        self.report.tally.add_log(comparison)
        row = log_row(comparison)
        if self.csv is not None:
            self.csv.writerow(row)
        if comparison.outcome is not Outcome.MATCHED:
            self.difference(row)

    def balance(self, comparison: BalanceComparison | None) -> None:
        if comparison is None:
            return
        self.report.tally.add_balance(comparison)
        row = balance_row(comparison)
        if self.csv is not None:
            self.csv.writerow(row)
        if comparison.drifted:
            self.difference(row)

    def close_json(self) -> None:
        if self.json is not None:
            summary = json.dumps(self.report.summary(), ensure_ascii=False, indent=2)
            self.json.write(f'\n], "summary": {summary}}}\n')
            self.json.close()
            self.json = None


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """A row for JSON: empty cells dropped, so numbers stay numbers and nothing reads as an empty string."""
    return {key: value for key, value in row.items() if value != ""}


ProgressFactory = Callable[[int], Any]
"""Given the number of relay logs to read, something with `update(n)` and `close()` (a tqdm bar)."""


async def compare_relay(
    engine: AsyncEngine,
    source_url: str,
    options: CompareOptions,
    progress: ProgressFactory | None = None,
) -> CompareReport:
    """Compare and write the CSV/JSON files as it goes; SourceError when the relay cannot be read."""
    async with open_source(source_url) as source:
        await ledger_side.check(engine)
        report = CompareReport(source.info, options.since, options.until, options.tolerances)
        csv_file = options.csv_path.open("w", encoding="utf-8", newline="") if options.csv_path else None
        sink = _Sink(report, options, csv_file)
        try:
            if options.json_path is not None:
                sink.open_json(options.json_path)
            await _compare_logs(engine, source, options, sink, progress)
            await _compare_balances(engine, source, options, sink)
            sink.close_json()
        finally:
            if csv_file is not None:
                csv_file.close()
            if sink.json is not None:
                sink.json.close()
    return report


async def _compare_logs(
    engine: AsyncEngine,
    source: RelaySource,
    options: CompareOptions,
    sink: _Sink,
    progress: ProgressFactory | None,
) -> None:
    tolerance = options.tolerances.time_seconds
    since, until = options.since.timestamp(), options.until.timestamp()
    relay_from, relay_to = math.floor(since - tolerance), math.ceil(until + tolerance)
    ledger_from = options.since - timedelta(seconds=tolerance)
    ledger_to = options.until + timedelta(seconds=tolerance)
    bar = progress(await source.count_logs(relay_from, relay_to)) if progress else None
    matcher = LogMatcher(source.info.kind, since, until, options.tolerances)
    report = sink.report
    logs = _flatten(source.logs(relay_from, relay_to, options.log_batch))
    charges = _flatten(ledger_side.charges(engine, ledger_from, ledger_to, options.log_batch))
    try:
        log: RelayLog | None = await anext(logs, None)
        charge = await anext(charges, None)
        while log is not None or charge is not None:
            if charge is None or (log is not None and log.created_at <= charge.at):
                assert log is not None
                decided = matcher.relay(log)
                report.logs_read += 1
                if bar is not None:
                    bar.update(1)
                log = await anext(logs, None)
            else:
                decided = matcher.ledger(charge)
                report.charges_read += 1
                charge = await anext(charges, None)
            report.peak_pending = max(report.peak_pending, matcher.pending)
            for comparison in decided:
                sink.log(comparison)
        for comparison in matcher.finish():
            sink.log(comparison)
    finally:
        if bar is not None:
            bar.close()


async def _compare_balances(engine: AsyncEngine, source: RelaySource, options: CompareOptions, sink: _Sink) -> None:
    tolerance = options.tolerances.balance
    async for users in source.users(options.account_batch):
        available = await ledger_side.user_balances(engine, [u.id for u in users if not u.deleted])
        for user in users:
            if not user.deleted:
                sink.balance(compare_user(user, available[user.id], tolerance))
    async for tokens in source.tokens(options.account_batch):
        states = await ledger_side.token_states(engine, [t.id for t in tokens if not t.deleted])
        for token in tokens:
            sink.balance(compare_token(token, states.get(token.id), tolerance))


def render(report: CompareReport) -> str:
    """The report as an operator reads it: counts per class, then each difference (capped)."""
    tally = report.tally
    lines = [
        f"compare-relay {report.source.kind.value} {report.source.display_url}",
        f"window [{_iso(report.since)}, {_iso(report.until)})  tolerances: time {report.tolerances.time_seconds:g} s,"
        f" amount {report.tolerances.amount}, balance {report.tolerances.balance}",
        "",
        "consume logs",
    ]
    lines += [f"  {outcome.value:<16}{tally.logs[outcome.value]:>10}" for outcome in Outcome]
    lines += [
        "balances",
        f"  {'users drifted':<16}{tally.users_drifted:>10} of {tally.users_compared}",
        f"  {'tokens drifted':<16}{tally.tokens_drifted:>10} of {tally.tokens_compared}",
    ]
    if report.shown:
        lines += ["", "differences"]
        for row in report.shown:
            lines.append("  " + _describe(row))
        if report.hidden:
            lines.append(f"  ... {report.hidden} more, see --csv")
    lines += ["", "everything matches" if report.ok else f"{tally.differences} differences"]
    return "\n".join(lines)


def _describe(row: dict[str, Any]) -> str:
    if row["record"] == "log":
        who = f"user {row['user_id']} token {row['token_id'] or '-'} channel {row['channel_id']} {row['model']}"
        ids = f"log {row['relay_log_id'] or '-'} entry {row['ledger_entry_id'] or '-'}"
        request = f" request {row['request_id']}" if row["request_id"] else ""
        amounts = f"relay {row['relay_quota'] if row['relay_quota'] != '' else '-'}"
        amounts += f" ledger {row['ledger_quota'] if row['ledger_quota'] != '' else '-'}"
        return f"{row['outcome']:<15} {row['time']}  {ids}{request}  {who}  {amounts}"
    subject = f"{row['record']} {row['user_id'] or row['token_id']}"
    return f"{'drift':<15} {subject}: {row['reason']}"
