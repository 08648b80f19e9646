"""What auditors and finance read: the entry feed, account balances and statements, reports, reconciliation.

Reads run in REPEATABLE READ so that every statement of one answer sees the same committed state. Sealing (the
hash chain) also lives here: it is the write side of tamper evidence and runs in the background.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import audit, journal, locks, reconciliation
from ledger_service.db.audit import EntryFilter
from ledger_service.db.transactions import run_transaction
from ledger_service.domain import accounts, errors
from ledger_service.domain.audit import GENESIS_HASH, FeedPosition, SealedEntry, StatementPosition, block_hash
from ledger_service.schemas import (
    AccountView,
    EntryPageView,
    ReconciliationCheckView,
    ReconciliationView,
    StatementLineView,
    StatementPageView,
    TrialBalanceLedgerView,
    TrialBalanceView,
    UsageReportView,
    UsageRowView,
)
from ledger_service.services.replicas import read_routed

T = TypeVar("T")

SEAL_BATCH = 5000
"""Entries per sealed block at most."""

Progress = Callable[[str], None]


def _cursor(after: str | None) -> FeedPosition | None:
    return None if after is None else FeedPosition.decode(after)


BUSY_RETRY_AFTER_SECONDS = "30"
"""Retry-After of a heavy report refused for want of a slot: such reports take tens of seconds on a large journal."""


HEAVY_REPORT_STATEMENT_SECONDS = 900
"""How long one statement of a whole-journal report may run (the service's other statements get 60 s): a check over a
journal of a million requests takes minutes, and the slots already keep these reports from crowding anything out."""


class HeavyReads:
    """Where the whole-journal reports run: a few slots, each with a connection of its own.

    One reconciliation of a large journal holds a connection for most of a minute; 25 at once once emptied the
    shared pool, and relay calls, /health and the background jobs failed with it. Here they run on an engine of
    their own, `slots` at most per process, and one more is refused at once (429 `busy`) rather than queued.
    """

    def __init__(self, engine: AsyncEngine, slots: int, replica: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.replica = replica
        """With LEDGER_READ_DATABASE_URL: the slots' connections to the replica (`engine` is then the fallback)."""
        self._slots = asyncio.Semaphore(slots)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[HeavyReads]:
        if self._slots.locked():  # no waiting: a queue of 40 s reports would only time out at the client
            raise errors.Busy(
                "as many heavy reports as this process runs at once are in progress; retry later",
                headers={"Retry-After": BUSY_RETRY_AFTER_SECONDS},
            )
        async with self._slots:  # released however the report ends: done, failed or cancelled
            yield self


class AuditService:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        sweep_interval_seconds: float,
        snapshot_interval_seconds: float = 5,
        heavy: HeavyReads | None = None,
        replica: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        self.replica = replica
        """LEDGER_READ_DATABASE_URL's engine: the reads go there (services/replicas.py); `engine` stays the primary's,
        for sealing and as the reads' fallback."""
        self.sweep_interval_seconds = sweep_interval_seconds
        self.snapshot_interval_seconds = snapshot_interval_seconds
        self.heavy = heavy
        """None (the command line): heavy reports run on `engine`, unbounded."""

    async def _read(self, work: Callable[[AsyncConnection], Awaitable[T]], min_position: str | None) -> T:
        """On the replica if there is one (showing at least `min_position`), else on the primary."""
        return await read_routed(
            self.replica, self.engine, work, min_position=min_position, isolation_level="REPEATABLE READ"
        )

    async def _heavy_read(self, work: Callable[[AsyncConnection], Awaitable[T]], min_position: str | None) -> T:
        """A read whose cost grows with the whole journal: in a heavy-report slot, off the shared pool."""
        if self.heavy is None:
            return await self._read(work, min_position)
        async with self.heavy.slot() as heavy:
            return await read_routed(
                heavy.replica, heavy.engine, work, min_position=min_position, isolation_level="REPEATABLE READ"
            )

    # The entry feed --------------------------------------------------------------------------------------------

    async def entries(
        self, where: EntryFilter, *, cursor: str | None, limit: int, min_position: str | None = None
    ) -> EntryPageView:
        after = _cursor(cursor)

        async def work(conn: AsyncConnection) -> EntryPageView:
            page = await audit.list_entries(conn, where, after=after, limit=limit)
            position = page[-1][0] if page else after
            return EntryPageView(
                items=[view for _, view in page], next_cursor=None if position is None else position.encode()
            )

        return await self._read(work, min_position)

    # Accounts --------------------------------------------------------------------------------------------------

    async def account(self, address: str, *, as_of: datetime | None, min_position: str | None = None) -> AccountView:
        ledgers = _ledgers(address)

        async def work(conn: AsyncConnection) -> AccountView:
            if as_of is None:  # now: the snapshot read, as every balance of the service
                current = await journal.balances(conn, [(address, ledger) for ledger in ledgers])
                balances = {str(ledger): amount for (_, ledger), amount in current.items()}
                return AccountView(address=address, balances=balances, as_of=await _database_now(conn))
            balances = {str(ledger): await audit.balance_as_of(conn, address, ledger, as_of) for ledger in ledgers}
            return AccountView(address=address, balances=balances, as_of=as_of)

        return await self._read(work, min_position)

    async def statement(
        self, address: str, *, cursor: str | None, limit: int, min_position: str | None = None
    ) -> StatementPageView:
        _ledgers(address)
        after = None if cursor is None else StatementPosition.decode(cursor)

        async def work(conn: AsyncConnection) -> StatementPageView:
            lines = await audit.statement(conn, address, after=after, limit=limit)
            position = lines[-1].position if lines else after
            return StatementPageView(
                items=[
                    StatementLineView(
                        entry_id=line.entry_id,
                        kind=line.kind,
                        created_at=line.created_at,
                        ledger=line.ledger,
                        amount=line.amount,
                        balance_after=line.balance_after,
                    )
                    for line in lines
                ],
                next_cursor=None if position is None else position.encode(),
            )

        return await self._read(work, min_position)

    # Reports ---------------------------------------------------------------------------------------------------

    async def trial_balance(self, *, as_of: datetime | None, min_position: str | None = None) -> TrialBalanceView:
        async def work(conn: AsyncConnection) -> TrialBalanceView:
            moment = as_of or await _database_now(conn)
            totals = await audit.trial_balance(conn, as_of)
            return TrialBalanceView(
                as_of=moment,
                ledgers={
                    ledger: TrialBalanceLedgerView(total=sum(by_kind.values()), by_kind=by_kind)
                    for ledger, by_kind in totals.items()
                },
            )

        # Now: the per-kind snapshots, a few rows. At a past instant: every posting up to it.
        return await (self._read if as_of is None else self._heavy_read)(work, min_position)

    async def usage(
        self,
        *,
        group_by: str,
        bucket: str,
        created_from: datetime | None,
        created_to: datetime | None,
        min_position: str | None = None,
    ) -> UsageReportView:
        async def work(conn: AsyncConnection) -> UsageReportView:
            rows = await audit.usage_report(
                conn, group_by=group_by, bucket=bucket, created_from=created_from, created_to=created_to
            )
            return UsageReportView(
                rows=[
                    UsageRowView(
                        key=row.key,
                        bucket_start=row.bucket_start,
                        requests=row.requests,
                        prompt_tokens=row.prompt_tokens,
                        completion_tokens=row.completion_tokens,
                        quota=row.quota,
                    )
                    for row in rows
                ]
            )

        # Every charged entry in the range, by default the whole journal.
        return await self._heavy_read(work, min_position)

    async def reconcile(
        self, progress: Progress | None = None, *, min_position: str | None = None
    ) -> ReconciliationView:
        """Recompute the books from the journal and compare with everything derived from it."""
        say = progress or (lambda _: None)
        grace = 2 * self.sweep_interval_seconds
        # A round refreshes, then seals what the refresh made final: an entry waits up to two rounds, more while a
        # round is slow. Ten rounds without it means the rounds are failing (docs/auditing.md).
        stall = 10 * self.snapshot_interval_seconds

        async def work(conn: AsyncConnection) -> ReconciliationView:
            checked_at = await _database_now(conn)
            checks: list[ReconciliationCheckView] = []

            async def rule(name: str, findings: reconciliation.Findings, fine: str, wrong: str) -> None:
                ok = findings.count == 0
                checks.append(
                    ReconciliationCheckView(
                        name=name,
                        ok=ok,
                        detail=fine if ok else wrong.format(findings.count),
                        offenders=findings.offenders,
                    )
                )
                say(f"{name}: {'ok' if ok else 'FAILED'}")

            say("entries_balanced: summing every entry per ledger")
            await rule(
                "entries_balanced",
                await reconciliation.unbalanced_entries(conn),
                "every entry sums to zero in each ledger",
                "{} entry/ledger pairs do not sum to zero",
            )
            say("snapshots_match_entries: recomputing every snapshot row")
            await rule(
                "snapshots_match_entries",
                await reconciliation.snapshot_mismatches(conn),
                "every balance, kind and usage snapshot equals its recomputation from the journal",
                "{} snapshot rows differ from their recomputation",
            )
            say("holds_cleared: checking every request's hold account")
            await rule(
                "holds_cleared",
                await reconciliation.uncleared_holds(conn),
                "resolved holds are at zero and open holds at their amount",
                "{} hold accounts are not where their request says",
            )
            await rule(
                "no_overdue_holds",
                await reconciliation.overdue_holds(conn, grace_seconds=grace),
                f"no open hold is more than {grace:g}s past its expiry",
                "{} open holds are overdue: is the sweeper running?",
            )
            await rule(
                "background_jobs_current",
                await reconciliation.stalled_background_jobs(conn, grace_seconds=stall),
                f"every entry older than {stall:g}s is in the snapshots and sealed",
                "{} background jobs are behind: are the snapshot refresh and sealing running?",
            )
            checks.append(await self._hash_chain(conn, say))
            say(f"hash_chain_intact: {'ok' if checks[-1].ok else 'FAILED'}")
            await rule(
                "requests_match_entries",
                await reconciliation.requests_disagreeing_with_entries(conn),
                "every request's state agrees with its entries",
                "{} requests disagree with their entries",
            )
            await rule(
                "summaries_match_entries",
                await reconciliation.summaries_disagreeing_with_entries(conn),
                "channel usage equals channel balances; held amounts equal their hold accounts",
                "{} user, token or channel summaries disagree with the entries",
            )
            return ReconciliationView(ok=all(c.ok for c in checks), checked_at=checked_at, checks=checks)

        return await self._heavy_read(work, min_position)

    async def _hash_chain(self, conn: AsyncConnection, say: Progress) -> ReconciliationCheckView:
        """Recompute every entry's hash, then every block's, from the first block on."""
        offenders: list[str] = []
        problems = 0
        blocks = await audit.blocks(conn, after_id=0, limit=1_000_000)
        block_index = 0
        sealed: list[SealedEntry] = []
        previous = GENESIS_HASH
        checked = 0

        def problem(message: str) -> None:
            nonlocal problems
            problems += 1
            if len(offenders) < reconciliation.OFFENDER_LIMIT:
                offenders.append(message)

        def close_block() -> None:
            nonlocal previous, sealed, block_index
            block = blocks[block_index]
            if block.prev_hash != previous:
                problem(f"block {block.id}: does not link to the block before it")
            if len(sealed) != block.entry_count:
                problem(f"block {block.id}: sealed {block.entry_count} entries, {len(sealed)} are there now")
            if block_hash(block.prev_hash, sealed) != block.hash:
                problem(f"block {block.id}: its entries no longer hash to the sealed value")
            previous, sealed, block_index = block.hash, [], block_index + 1

        async for batch in reconciliation.journal_in_feed_order(conn):
            for entry in batch:
                if entry.stored_hash != entry.computed_hash:
                    problem(f"entry {entry.position.entry_id}: its content does not match its hash")
                while block_index < len(blocks) and entry.position > blocks[block_index].last:
                    close_block()
                if block_index == len(blocks):
                    continue  # not sealed yet
                if entry.position < blocks[block_index].first:
                    problem(f"entry {entry.position.entry_id}: lies between sealed blocks, in none")
                    continue
                sealed.append(SealedEntry(entry.position, entry.created_at, entry.stored_hash))
            checked += len(batch)
            say(f"hash_chain_intact: {checked} entries checked")
        while block_index < len(blocks):
            close_block()
        ok = problems == 0
        latest = f"; latest block {blocks[-1].id} hash {blocks[-1].hash.hex()}" if blocks else ""
        detail = (
            f"{checked} entries and {len(blocks)} blocks verified from the first block{latest}"
            if ok
            else f"{problems} hash chain problems{latest}"
        )
        return ReconciliationCheckView(name="hash_chain_intact", ok=ok, detail=detail, offenders=offenders)

    # Sealing ---------------------------------------------------------------------------------------------------

    async def seal(self) -> int:
        """Seal every final, unsealed entry into blocks; returns how many entries were sealed."""

        async def work(conn: AsyncConnection) -> int:
            if not await locks.try_lock_sealing(conn):
                return 0
            last = await audit.last_block(conn)
            entries = await audit.entries_to_seal(
                conn,
                after=None if last is None else last.last,
                horizon=await audit.feed_horizon(conn),
                limit=SEAL_BATCH,
            )
            if not entries:
                return 0
            previous = GENESIS_HASH if last is None else last.hash
            await audit.insert_block(conn, entries, prev_hash=previous, block_hash=block_hash(previous, entries))
            return len(entries)

        total = 0
        while True:
            sealed = await run_transaction(self.engine, work)
            total += sealed
            if sealed < SEAL_BATCH:
                return total


def _ledgers(address: str) -> tuple[accounts.SubLedger, ...]:
    found = accounts.ledgers_of(address)
    if found is None:
        raise errors.ValidationFailed(
            "address must be an account of the chart: system:issuance, system:allowance, user:<id>, token:<id>,"
            " channel:<id> or hold:<request_id>"
        )
    return found


async def _database_now(conn: AsyncConnection) -> datetime:
    found = await conn.scalar(text("SELECT now()"))
    return found if isinstance(found, datetime) else datetime.now(UTC)
