"""`import-relay`: bring a relay's balances, tokens and prices into the ledger, safely re-runnable.

One run reads the relay page by page (relay/source.py) and, per page, runs one ledger transaction that locks the
page's users, reads what the ledger has and what the last run saw, decides with domain/relay_import.py, and writes
the entries together with what this run saw. A run stopped half-way leaves whole pages behind; the next run
carries on from there and posts nothing twice (each entry's reference is unique, and what was seen is stored
with it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import journal, pricing, relay_imports
from ledger_service.db.transactions import run_transaction
from ledger_service.domain.entries import EntryKind
from ledger_service.domain.relay_import import (
    Listed,
    ModelPrices,
    PricePlan,
    TokenMove,
    UserMove,
    plan_prices,
    plan_token,
    plan_user,
    pre_consumed_note,
)
from ledger_service.domain.relays import RelayToken, RelayUser
from ledger_service.relay.source import RelaySource, SourceInfo
from ledger_service.settings import Settings

T = TypeVar("T")


class Progress(Protocol):
    """Where a long run reports how far it is (the CLI draws a progress bar on stderr)."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self, done: int) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass(slots=True)
class ImportReport:
    """What a run did (or, dry, would do)."""

    source: SourceInfo
    dry_run: bool
    run_id: int | None = None
    users_read: int = 0
    tokens_read: int = 0
    users: list[UserMove] = field(default_factory=list)
    tokens: list[TokenMove] = field(default_factory=list)
    debts: list[tuple[int, int]] = field(default_factory=list)
    """(user id, quota) of every relay user imported with a negative quota."""
    prices: PricePlan = field(default_factory=PricePlan)
    listed: list[Listed] = field(default_factory=list)
    finished: bool = False

    def opened(self) -> list[UserMove]:
        """Users given an opening entry (a first-seen user whose balance already matched gets none)."""
        return [m for m in self.users if m.kind is EntryKind.OPENING and m.amount]

    def adjusted(self) -> list[UserMove]:
        return [m for m in self.users if m.kind is EntryKind.ADJUSTMENT]

    def summary(self) -> dict[str, Any]:
        """The figures an operator reads first; stored with the run and printed by the CLI."""
        opened, adjusted = self.opened(), self.adjusted()
        return {
            "users": {
                "read": self.users_read,
                "opened": len(opened),
                "adjusted": len(adjusted),
                "unchanged": self.users_read - len(opened) - len(adjusted) - self._listed("user"),
                "skipped": self._listed("user"),
            },
            "tokens": {
                "read": self.tokens_read,
                "registered": sum(m.first for m in self.tokens),
                "moved": sum(not m.first for m in self.tokens),
                "unchanged": self.tokens_read - len(self.tokens) - self._listed("token"),
                "skipped": self._listed("token"),
            },
            "prices": {
                "stored": self.prices.stored,
                "models_set": len(self.prices.models),
                "groups_set": len(self.prices.groups),
                "unchanged": self.prices.unchanged,
            },
            "quota": {
                "opened": sum(m.amount for m in opened),
                "adjusted": sum(m.amount for m in adjusted),
                "debts": len(self.debts),
                "debt_total": sum(quota for _, quota in self.debts),
            },
            "listed": len(self.listed),
            "finished": self.finished,
        }

    def _listed(self, subject: str) -> int:
        return sum(1 for item in self.listed if item.subject == subject)


class RelayImport:
    def __init__(self, engine: AsyncEngine, settings: Settings, *, page_size: int = 2000) -> None:
        self.engine = engine
        self.settings = settings
        self.page_size = page_size
        """Relay rows per ledger transaction: large enough to amortise the round trips, small enough that a
        transaction stays short next to live traffic and a stopped run loses little."""

    async def run(self, source: RelaySource, *, dry_run: bool, progress: Progress | None = None) -> ImportReport:
        progress = progress or NoProgress()
        report = ImportReport(source=source.info, dry_run=dry_run)
        await self._prices(source, report)
        if not dry_run:
            info = source.info
            report.run_id = await run_transaction(
                self.engine,
                lambda conn: relay_imports.start_run(conn, info.source_id, str(info.kind), info.display_url),
            )
        await self._pages(
            "users",
            await source.count_users(),
            source.users(self.page_size),
            progress,
            lambda page: self._users(page, report),
        )
        await self._pages(
            "tokens",
            await source.count_tokens(),
            source.tokens(self.page_size),
            progress,
            lambda page: self._tokens(page, report),
        )
        report.finished = True
        if report.run_id is not None:
            run_id = report.run_id
            await run_transaction(self.engine, lambda conn: relay_imports.finish_run(conn, run_id, report.summary()))
        return report

    async def _pages(
        self,
        label: str,
        total: int,
        pages: AsyncIterator[Sequence[T]],
        progress: Progress,
        handle: Callable[[Sequence[T]], Any],
    ) -> None:
        progress.start(label, total)
        try:
            async for page in pages:
                await handle(page)
                progress.advance(len(page))
        finally:
            progress.finish()

    # Prices ----------------------------------------------------------------------------------------------------

    async def _prices(self, source: RelaySource, report: ImportReport) -> None:
        options = await source.options()

        async def work(conn: AsyncConnection) -> PricePlan:
            models = {
                name: ModelPrices(ratio, completion, price)
                for name, ratio, completion, price in await pricing.all_models(conn)
            }
            groups = dict(await pricing.all_groups(conn))
            plan = plan_prices(options, models, groups)
            if not report.dry_run:
                for name, prices in plan.models.items():
                    await pricing.save_model(
                        conn,
                        name,
                        model_ratio=prices.model_ratio,
                        completion_ratio=prices.completion_ratio,
                        model_price=prices.model_price,
                    )
                for name, ratio in plan.groups.items():
                    await pricing.save_group(conn, name, group_ratio=ratio)
            return plan

        report.prices = await run_transaction(self.engine, work)
        report.listed.extend(report.prices.listed)
        note = pre_consumed_note(options, self.settings.pre_consumed_quota)
        if note is not None:
            report.listed.append(note)

    # Users -----------------------------------------------------------------------------------------------------

    async def _users(self, page: Sequence[RelayUser], report: ImportReport) -> None:
        source_id = report.source.source_id
        live = [user for user in page if not user.deleted]

        async def work(conn: AsyncConnection) -> list[UserMove | Listed]:
            ids = [user.id for user in live]
            if not report.dry_run:
                await relay_imports.lock_users(conn, ids)
            seen = await relay_imports.seen_users(conn, source_id, ids)
            totals = await relay_imports.user_totals(conn, ids)
            planned = [plan_user(user, seen.get(user.id), totals.get(user.id, 0)) for user in page]
            decided = [item for item in planned if item is not None]
            moves = [item for item in decided if isinstance(item, UserMove)]
            if not report.dry_run and report.run_id is not None:
                drafts = [m.draft(source_id, report.run_id, report.source.kind) for m in moves if m.amount]
                await journal.insert_referenced_entries(conn, drafts)
                await relay_imports.remember(
                    conn, source_id, report.run_id, "user", [(m.user_id, m.relay_quota, None) for m in moves]
                )
            return decided

        decided = await run_transaction(self.engine, work)
        report.users_read += len(page)
        report.users.extend(item for item in decided if isinstance(item, UserMove))
        report.listed.extend(item for item in decided if isinstance(item, Listed))
        report.debts.extend((user.id, user.quota) for user in live if user.quota < 0)

    # Tokens ----------------------------------------------------------------------------------------------------

    async def _tokens(self, page: Sequence[RelayToken], report: ImportReport) -> None:
        source_id = report.source.source_id

        async def work(conn: AsyncConnection) -> list[TokenMove | Listed]:
            ids = [token.id for token in page]
            if not report.dry_run:
                await relay_imports.lock_users(conn, sorted({t.user_id for t in page if t.user_id > 0}))
            seen = await relay_imports.seen_tokens(conn, source_id, ids)
            ledger = await relay_imports.ledger_tokens(conn, ids)
            planned = [plan_token(token, seen.get(token.id), ledger.get(token.id)) for token in page]
            decided = [item for item in planned if item is not None]
            if report.dry_run or report.run_id is None:
                return decided
            moves = [item for item in decided if isinstance(item, TokenMove)]
            written = await relay_imports.register_tokens(conn, [(m.token_id, m.user_id, m.unlimited) for m in moves])
            lost = [m for m in moves if m.token_id not in written]  # registered to another user since we read
            moves = [m for m in moves if m.token_id in written]
            drafts = [m.draft(source_id, report.run_id, report.source.kind) for m in moves if m.delta]
            await journal.insert_referenced_entries(conn, drafts)
            await relay_imports.remember(
                conn, source_id, report.run_id, "token", [(m.token_id, m.remain_quota, m.unlimited) for m in moves]
            )
            kept: list[TokenMove | Listed] = [item for item in decided if isinstance(item, Listed)]
            kept.extend(moves)
            kept.extend(Listed("token", str(m.token_id), "registered to another user in the ledger") for m in lost)
            return kept

        decided = await run_transaction(self.engine, work)
        report.tokens_read += len(page)
        report.tokens.extend(item for item in decided if isinstance(item, TokenMove))
        report.listed.extend(item for item in decided if isinstance(item, Listed))
