"""External reconciliation runs: provider records against the ledger's charges, written in resumable chunks.

A run is keyed by the SHA-256 of its normalised input (and its upload's hash): the same input is the same run. A
run reads its scope as of its creation (ledger entries before its `as_of`, uploads up to its `max_upload_id`,
both kept in `progress`), so recomputing it gives the same items in the same order; it writes them `chunk_size`
at a time, each chunk in its own transaction with the cursor and the heartbeat. A run whose process died (status
`running`, heartbeat older than `stale_seconds`) or that failed is taken over by the next POST of the same input,
and continues from its cursor. Rules: domain/external_matching.py; SQL: db/external_reconciliation.py.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import external_reconciliation as store
from ledger_service.db.transactions import run_transaction
from ledger_service.domain import errors
from ledger_service.domain.external_matching import (
    Item,
    ItemNotFound,
    ReconciliationNotFound,
    Scope,
    Tolerance,
    UploadNotFound,
    counts,
    drift,
    fingerprint,
    grid_hours,
    latest_records,
    plan_items,
    record_key,
    resolve_channel,
)
from ledger_service.schemas import (
    ExplanationView,
    ReconciliationCommand,
    RunItemView,
    RunPageView,
    RunSummaryView,
    RunView,
)
from ledger_service.services.api_keys import Principal
from ledger_service.settings import Settings

T = TypeVar("T")

CHUNK_SIZE = 500
STALE_SECONDS = 60.0
"""A running run whose heartbeat is older than this is taken to have died with its process."""

AfterChunk = Callable[[int], Awaitable[None]]
"""Called after each committed chunk with the number of items written so far (tests interrupt runs with it)."""


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if re.fullmatch(r"[0-9]{1,18}", cursor) is None:
        raise errors.ValidationFailed("cursor is not one this service gave out")
    return int(cursor)


class ExternalReconciliationService:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        chunk_size: int = CHUNK_SIZE,
        stale_seconds: float = STALE_SECONDS,
        after_chunk: AfterChunk | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.chunk_size = chunk_size
        self.stale_seconds = stale_seconds
        self.after_chunk = after_chunk

    async def _tx(self, work: Callable[[AsyncConnection], Awaitable[T]], *, read: bool = False) -> T:
        if read:
            return await run_transaction(self.engine, work, isolation_level="REPEATABLE READ")
        return await run_transaction(self.engine, work)

    # Starting and resuming -------------------------------------------------------------------------------------

    async def start(self, command: ReconciliationCommand, author: Principal) -> tuple[RunView, bool]:
        """Run the reconciliation of this input, or find the run of the same input: (the run, created).

        A completed run, or one another process is working on, is returned as it is; a failed or abandoned one
        is continued from its cursor first."""
        tolerance = Tolerance(
            tokens_pct=command.tolerance.tokens_pct or Decimal(0),
            requests=command.tolerance.requests or 0,
            cost_pct=command.tolerance.cost_pct or Decimal(0),
            cost_usd=command.tolerance.cost_usd or Decimal(0),
        )

        async def begin(conn: AsyncConnection) -> tuple[int, bool, bool]:
            """(run id, created, this call works on it)."""
            sha = None
            if command.upload_id is not None:
                upload = await store.upload(conn, command.upload_id)
                if upload is None:
                    raise UploadNotFound(f"upload {command.upload_id} does not exist")
                sha = upload.sha256
            key, params = fingerprint(
                upload_id=command.upload_id,
                upload_sha256=sha,
                since=command.since,
                until=command.until,
                strategy=command.strategy,
                tolerance=tolerance,
            )
            existing = await store.run_by_fingerprint(conn, key, stale_seconds=self.stale_seconds)
            if existing is None:
                now = await store.database_now(conn)
                progress = {"as_of": now.isoformat(), "max_upload_id": await store.last_upload_id(conn), "next": 0}
                run_id = await store.insert_run(
                    conn, fingerprint=key, params=params, progress=progress, created_by=author.key_id
                )
                if run_id is not None:
                    return run_id, True, True
                existing = await store.run_by_fingerprint(conn, key, stale_seconds=self.stale_seconds)
                assert existing is not None  # inserted by a concurrent call, which works on it
                return existing.id, False, False
            if existing.status == "completed":
                return existing.id, False, False
            return existing.id, False, await store.claim_run(conn, existing.id, stale_seconds=self.stale_seconds)

        run_id, created, mine = await self._tx(begin)
        if mine:
            await self._execute(run_id)
        return await self.run(run_id, class_filter=None, cursor=None, limit=100), created

    async def _execute(self, run_id: int) -> None:
        try:
            await self._continue(run_id)
        except Exception as error:
            message = f"{type(error).__name__}: {error}"

            async def fail(conn: AsyncConnection) -> None:
                await store.fail_run(conn, run_id, message)

            await self._tx(fail)
            if isinstance(error, errors.LedgerError):
                raise
        # Anything else (a BaseException: the process stopping, a cancelled task) leaves the run `running`: its
        # heartbeat goes stale and the next POST of the same input continues it.

    async def _continue(self, run_id: int) -> None:
        row = await self._tx(lambda conn: store.run(conn, run_id))
        assert row is not None
        assert row.progress is not None
        progress: dict[str, Any] = dict(row.progress)
        items = await self._tx(lambda conn: self._plan(conn, row.params, progress), read=True)
        position = int(progress["next"])
        tally = counts(items[:position])
        while position < len(items):
            chunk = items[position : position + self.chunk_size]
            chunk_tally = counts(chunk)
            so_far = {name: tally[name] + chunk_tally[name] for name in tally}

            async def write(
                conn: AsyncConnection,
                chunk: list[Item] = chunk,
                expected: int = position,
                so_far: dict[str, int] = so_far,
            ) -> bool:
                current = await store.run(conn, run_id, lock=True)
                if current is None or current.status != "running" or current.progress is None:
                    return False
                if int(current.progress["next"]) != expected:
                    return False  # another process took the run over and moved on: leave it to it
                done = expected + len(chunk)
                await store.write_chunk(conn, run_id, chunk, progress={**progress, "next": done}, counts=so_far)
                return True

            if not await self._tx(write):
                return
            tally = so_far
            position += len(chunk)
            if self.after_chunk is not None:
                await self.after_chunk(position)

        async def complete(conn: AsyncConnection) -> None:
            await store.write_chunk(conn, run_id, [], progress={**progress, "next": len(items)}, counts=counts(items))
            await store.complete_run(conn, run_id, drift(items))

        await self._tx(complete)

    async def _plan(self, conn: AsyncConnection, params: dict[str, Any], progress: dict[str, Any]) -> list[Item]:
        """Every item of the run, recomputed from its scope as it was when the run started."""
        as_of = datetime.fromisoformat(progress["as_of"])
        if params["upload_id"] is not None:
            records = await store.upload_records(conn, int(params["upload_id"]))
            start = min((r.bucket_start for r in records), default=as_of)
            end = max((r.bucket_end for r in records), default=as_of)
        else:
            start = datetime.fromisoformat(params["since"])
            end = datetime.fromisoformat(params["until"])
            records = latest_records(
                await store.window_records(conn, since=start, until=end, max_upload_id=int(progress["max_upload_id"]))
            )
        channel_map = await store.channel_map(conn)
        placed = [resolve_channel(record, channel_map) for record in records]
        keys = sorted({record_key(p) for p in placed}, key=lambda k: k.order())
        covered = await store.ledger_in_keys(conn, keys, as_of=as_of)
        uncovered = await store.ledger_outside_keys(
            conn, keys, start=start, end=end, as_of=as_of, hours=grid_hours(records)
        )
        tol = params["tolerance"]
        tolerance = Tolerance(
            tokens_pct=_decimal(tol["tokens_pct"]),
            requests=int(tol["requests"]),
            cost_pct=_decimal(tol["cost_pct"]),
            cost_usd=_decimal(tol["cost_usd"]),
        )
        scope = Scope(placed=placed, covered=covered, uncovered=uncovered, prices=await store.prices(conn))
        return plan_items(scope, strategy=str(params["strategy"]), tolerance=tolerance)

    # Reading -----------------------------------------------------------------------------------------------------

    async def runs(self, cursor: str | None, limit: int) -> RunPageView:
        before = parse_cursor(cursor)

        async def work(conn: AsyncConnection) -> RunPageView:
            rows = await store.runs(conn, before_id=before, limit=limit)
            return RunPageView(
                items=[_summary(row) for row in rows],
                next_cursor=str(rows[-1].id) if len(rows) == limit else None,
            )

        return await self._tx(work, read=True)

    async def run(self, run_id: int, class_filter: str | None, cursor: str | None, limit: int | None) -> RunView:
        """The run with a page of its items (all of them when `limit` is None), optionally of one class."""
        after = parse_cursor(cursor)

        async def work(conn: AsyncConnection) -> RunView:
            row = await store.run(conn, run_id, stale_seconds=self.stale_seconds)
            if row is None:
                raise ReconciliationNotFound(f"reconciliation run {run_id} does not exist")
            items = await store.items(conn, run_id, klass=class_filter, after_id=after, limit=limit)
            notes: dict[int, list[ExplanationView]] = {}
            for note in await store.explanations(conn, run_id, [item.id for item in items]):
                notes.setdefault(note.item_id, []).append(
                    ExplanationView(
                        note=note.note, author=note.author, author_key_id=note.author_key, created_at=note.created_at
                    )
                )
            summary = _summary(row)
            return RunView(
                **{name: getattr(summary, name) for name in summary.__struct_fields__},
                items=[
                    RunItemView(
                        id=item.id,
                        klass=item.klass,
                        channel_id=item.channel_id,
                        model=item.model,
                        bucket_start=item.bucket_start,
                        bucket_end=item.bucket_end,
                        ledger=item.ledger,
                        provider=item.provider,
                        difference=item.difference,
                        explanations=notes.get(item.id, []),
                    )
                    for item in items
                ],
                next_cursor=str(items[-1].id) if limit is not None and len(items) == limit else None,
                drift=row.drift or [],
            )

        return await self._tx(work, read=True)

    async def explain(self, run_id: int, item_id: int, note: str, author: Principal) -> ExplanationView:
        """Attach a note to an item: appended, never changed; the item's difference stays as it is."""

        async def work(conn: AsyncConnection) -> ExplanationView:
            if await store.run(conn, run_id) is None:
                raise ReconciliationNotFound(f"reconciliation run {run_id} does not exist")
            if not await store.item_exists(conn, run_id, item_id):
                raise ItemNotFound(f"run {run_id} has no item {item_id}")
            row = await store.insert_explanation(
                conn, run_id, item_id, note=note, author=author.name, author_key=author.key_id
            )
            return ExplanationView(
                note=row.note, author=row.author, author_key_id=row.author_key, created_at=row.created_at
            )

        return await self._tx(work)


def _decimal(text: str) -> Decimal:
    return Decimal(text)


def _summary(row: store.RunRow) -> RunSummaryView:
    return RunSummaryView(
        id=row.id,
        status=row.status,
        params=row.params,
        matched=row.matched,
        differs=row.differs,
        only_provider=row.only_provider,
        only_ledger=row.only_ledger,
        error=row.error,
        created_at=row.created_at,
        completed_at=row.completed_at,
    )
