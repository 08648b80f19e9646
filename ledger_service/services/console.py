"""The auditors' web console: sign-in sessions and the reads behind its pages.

A session is created by exchanging an auditor or admin API key (checked exactly as the API checks a bearer key).
The browser gets a random secret in a cookie; only its SHA-256 is stored, next to the session's CSRF token. Every
page looks the session up again, joined with its API key, so an expired or ended session, or one whose key was
revoked, stops working at its next request.

The pages read only what is cheap on a large journal: the trial balance from the per-kind snapshots, counts over
partial indexes, statement pages by feed position. The usage chart (a range scan over 30 days of charges) reads
each past day once per process, and today's charges at most every `USAGE_CACHE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import audit, console, console_sessions, journal, requests
from ledger_service.db.transactions import run_transaction
from ledger_service.domain import accounts, errors
from ledger_service.domain.audit import STATEMENT_START, StatementPosition
from ledger_service.schemas import EntryView, TrialBalanceView
from ledger_service.services.api_keys import ApiKeyService, Principal
from ledger_service.services.audit import AuditService

T = TypeVar("T")

CONSOLE_ROLES = frozenset({"admin", "auditor"})
USAGE_DAYS = 30
USAGE_CACHE_SECONDS = 60.0
DAY_SETTLED = timedelta(minutes=10)
UNSEALED_CAP = 100_000
OVERDUE_SHOWN = 10
SIGN_IN_FAILURES = 10
"""Failed sign-ins one client may make per `SIGN_IN_WINDOW_SECONDS` before it is made to wait."""
SIGN_IN_WINDOW_SECONDS = 300.0
CSV_PAGE = 1000


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class SignInRefused(Exception):
    """The key is unknown, revoked, or of a role the console does not admit. Says nothing about which."""


class TooManySignIns(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed sign-ins")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class NewSession:
    secret: str
    """Goes into the cookie, and nowhere else."""
    csrf_token: str
    expires_at: datetime
    principal: Principal


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    api_key_id: int
    name: str
    role: str
    csrf_token: str
    expires_at: datetime


class FailedSignIns:
    """Failed sign-ins per client (its address), in this process: a sliding window."""

    def __init__(self, limit: int = SIGN_IN_FAILURES, window: float = SIGN_IN_WINDOW_SECONDS) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        found = self._failures.get(client)
        if found is None:
            return deque()
        while found and found[0] <= now - self.window:
            found.popleft()
        if not found:
            del self._failures[client]
        return found

    def wait_for(self, client: str) -> int:
        """Seconds this client must wait before trying again; 0 when it may try now."""
        now = time.monotonic()
        recent = self._recent(client, now)
        if len(recent) < self.limit:
            return 0
        return max(1, int(recent[0] + self.window - now) + 1)

    def failed(self, client: str) -> None:
        if len(self._failures) > 10_000:  # bounded: forget everyone rather than grow without end
            self._failures.clear()
        self._failures.setdefault(client, deque()).append(time.monotonic())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


# Page views --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: datetime
    requests: int
    quota: int


@dataclass(frozen=True, slots=True)
class Overview:
    checked_at: datetime
    trial_balance: TrialBalanceView
    books_balanced: bool
    open_holds: int
    overdue_holds: int
    overdue: list[console.OverdueHold]
    unsealed_entries: int
    unsealed_capped: bool
    snapshot_age_seconds: float | None
    last_run: console.RunSummary | None
    usage: list[DayUsage]


@dataclass(frozen=True, slots=True)
class PostingLine:
    ledger: str
    account: str
    amount: int
    balance_after: int


@dataclass(frozen=True, slots=True)
class EntryLines:
    entry: EntryView
    postings: list[PostingLine]


@dataclass(frozen=True, slots=True)
class RequestDetail:
    request_id: str
    kind: str
    status: str
    user_id: int
    token_id: int
    token_limited: bool
    group: str
    model: str
    prompt_tokens: int
    max_tokens: int
    amount: int
    trusted: bool
    channel_id: int | None
    settled_prompt_tokens: int | None
    completion_tokens: int | None
    charged: int | None
    late: bool
    created_at: datetime
    expires_at: datetime | None
    ratios: dict[str, Decimal | None]
    entries: list[EntryLines]


@dataclass(frozen=True, slots=True)
class StatementLine:
    entry_id: int
    kind: str
    created_at: datetime
    ledger: str
    amount: int
    balance_after: int
    request_id: str | None


@dataclass(frozen=True, slots=True)
class StatementPage:
    address: str
    created_from: datetime | None
    created_to: datetime | None
    lines: list[StatementLine]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class _Bounds:
    start: StatementPosition
    upper_txid: int | None


class ConsoleService:
    def __init__(
        self, engine: AsyncEngine, keys: ApiKeyService, audit_service: AuditService, *, session_seconds: int
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.audit = audit_service
        self.session_seconds = session_seconds
        self.failures = FailedSignIns()
        self._usage: tuple[float, list[DayUsage]] | None = None
        self._closed: dict[datetime, DayUsage] = {}
        self._reading: asyncio.Future[list[DayUsage]] | None = None

    async def _read(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        return await run_transaction(self.engine, work, isolation_level="REPEATABLE READ")

    # Sessions ------------------------------------------------------------------------------------------------

    async def sign_in(self, key: str, *, client: str) -> NewSession:
        """Exchange an auditor's or admin's API key for a session. Raises SignInRefused (whatever was wrong) or
        TooManySignIns."""
        wait = self.failures.wait_for(client)
        if wait:
            raise TooManySignIns(wait)
        principal = await self.keys.authenticate(key.strip())
        if principal is None or principal.role not in CONSOLE_ROLES:
            self.failures.failed(client)
            raise SignInRefused
        self.failures.succeeded(client)
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)

        async def work(conn: AsyncConnection) -> datetime:
            await console_sessions.prune(conn, older_than_seconds=7 * 86400)
            return await console_sessions.insert(
                conn,
                secret_hash=secret_digest(secret),
                api_key_id=principal.key_id,
                csrf_token=csrf,
                seconds=self.session_seconds,
            )

        expires_at = await run_transaction(self.engine, work)
        return NewSession(secret=secret, csrf_token=csrf, expires_at=expires_at, principal=principal)

    async def session(self, secret: str) -> ConsoleSession | None:
        if not secret or len(secret) > 128:
            return None
        digest = secret_digest(secret)

        async def work(conn: AsyncConnection) -> console_sessions.SessionRow | None:
            return await console_sessions.active(conn, digest)

        row = await run_transaction(self.engine, work)
        if row is None:
            return None
        return ConsoleSession(row.api_key_id, row.key_name, row.role, row.csrf_token, row.expires_at)

    async def sign_out(self, secret: str) -> None:
        digest = secret_digest(secret)

        async def work(conn: AsyncConnection) -> None:
            await console_sessions.end(conn, digest)

        await run_transaction(self.engine, work)

    # Overview ------------------------------------------------------------------------------------------------

    async def overview(self) -> Overview:
        trial = await self.audit.trial_balance(as_of=None)
        usage = await self._usage_per_day()

        async def work(conn: AsyncConnection) -> Overview:
            counts = await console.counts(conn, unsealed_cap=UNSEALED_CAP)
            return Overview(
                checked_at=trial.as_of,
                trial_balance=trial,
                books_balanced=all(ledger.total == 0 for ledger in trial.ledgers.values()),
                open_holds=counts.open_holds,
                overdue_holds=counts.overdue_holds,
                overdue=await console.overdue_holds(conn, limit=OVERDUE_SHOWN) if counts.overdue_holds else [],
                unsealed_entries=min(counts.unsealed_entries, UNSEALED_CAP),
                unsealed_capped=counts.unsealed_entries > UNSEALED_CAP,
                snapshot_age_seconds=counts.snapshot_age_seconds,
                last_run=await console.last_run(conn),
                usage=usage,
            )

        return await self._read(work)

    async def warm(self) -> None:
        """Read the usage chart's days now (at start), so that the first overview does not wait for them."""
        await self._usage_per_day()

    async def _usage_per_day(self) -> list[DayUsage]:
        """Quota charged per UTC day over the last USAGE_DAYS days. A day that ended more than `DAY_SETTLED` ago
        no longer changes (an entry is dated by its transaction's start, and statements stop at 60 s), so it is
        read once and kept; the open days are read again at most every USAGE_CACHE_SECONDS. Pages that want it
        while it is being read wait for that read rather than start their own."""
        cached = self._usage
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read_usage())
        return await asyncio.shield(self._reading)

    async def _read_usage(self) -> list[DayUsage]:
        now = datetime.now(UTC)
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        first = today - timedelta(days=USAGE_DAYS - 1)
        wanted = [first + timedelta(days=n) for n in range(USAGE_DAYS)]
        self._closed = {day: usage for day, usage in self._closed.items() if day >= first}
        since = next((day for day in wanted if day not in self._closed), today)

        async def work(conn: AsyncConnection) -> list[console.DailyUsage]:
            return await console.usage_per_day(conn, since=since)

        found = {row.day.astimezone(UTC): row for row in await self._read(work)}
        days = []
        for day in wanted:
            if day in self._closed:
                days.append(self._closed[day])
                continue
            row = found.get(day)
            usage = DayUsage(day, row.requests if row else 0, row.quota if row else 0)
            if day + timedelta(days=1) + DAY_SETTLED < now:
                self._closed[day] = usage
            days.append(usage)
        self._usage = (time.monotonic() + USAGE_CACHE_SECONDS, days)
        return days

    # A request -----------------------------------------------------------------------------------------------

    async def request(self, request_id: str) -> RequestDetail:
        async def work(conn: AsyncConnection) -> RequestDetail:
            row = await requests.get(conn, request_id)
            if row is None:
                raise errors.HoldNotFound(f"no request with id {request_id!r}")
            entries = await journal.entries_of_request(conn, request_id)
            txids = await console.entry_positions(conn, request_id)
            lines = []
            for entry in entries:
                postings = []
                for posting in entry.postings:
                    position = StatementPosition(txids[entry.id], entry.id, posting.ledger)
                    balance = await audit.balance_through(conn, posting.account, posting.ledger, position)
                    postings.append(PostingLine(posting.ledger, posting.account, posting.amount, balance))
                lines.append(EntryLines(entry, postings))
            return RequestDetail(
                request_id=row.request_id,
                kind=str(row.kind),
                status=str(row.status),
                user_id=row.user_id,
                token_id=row.token_id,
                token_limited=row.token_limited,
                group=row.group,
                model=row.model,
                prompt_tokens=row.prompt_tokens,
                max_tokens=row.max_tokens,
                amount=row.amount,
                trusted=row.trusted,
                channel_id=row.channel_id,
                settled_prompt_tokens=row.settled_prompt_tokens,
                completion_tokens=row.completion_tokens,
                charged=row.charged,
                late=row.late,
                created_at=row.created_at,
                expires_at=row.expires_at,
                ratios={
                    "model_ratio": row.model_ratio,
                    "completion_ratio": row.completion_ratio,
                    "group_ratio": row.group_ratio,
                    "model_price": row.model_price,
                },
                entries=lines,
            )

        return await self._read(work)

    # Statements ----------------------------------------------------------------------------------------------

    async def statement(
        self,
        address: str,
        *,
        created_from: datetime | None,
        created_to: datetime | None,
        cursor: str | None,
        limit: int,
    ) -> StatementPage:
        check_address(address)
        after = None if cursor is None else StatementPosition.decode(cursor)

        async def work(conn: AsyncConnection) -> StatementPage:
            bounds = await _bounds(conn, created_from, created_to)
            start = after if after is not None else bounds.start
            found = await console.statement_range(
                conn,
                address,
                after=start,
                upper_txid=bounds.upper_txid,
                created_from=created_from,
                created_to=created_to,
                limit=limit + 1,
            )
            more = len(found) > limit
            lines = await _with_balances(conn, address, found[:limit])
            return StatementPage(
                address=address,
                created_from=created_from,
                created_to=created_to,
                lines=lines,
                next_cursor=found[limit - 1].position.encode() if more else None,
            )

        return await self._read(work)

    async def statement_lines(
        self, address: str, *, created_from: datetime | None, created_to: datetime | None
    ) -> AsyncIterator[list[StatementLine]]:
        """Every line of the statement in the range, page by page (each page its own read)."""
        check_address(address)
        cursor: str | None = None
        while True:
            page = await self.statement(
                address, created_from=created_from, created_to=created_to, cursor=cursor, limit=CSV_PAGE
            )
            if page.lines:
                yield page.lines
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


def check_address(address: str) -> None:
    if accounts.ledgers_of(address) is None:
        raise errors.ValidationFailed(
            "address must be an account of the chart: system:issuance, system:allowance, user:<id>, token:<id>,"
            " channel:<id> or hold:<request_id>"
        )


async def _bounds(conn: AsyncConnection, created_from: datetime | None, created_to: datetime | None) -> _Bounds:
    """Feed positions that surely enclose the entries created in [from, to) (db/console.py: SLACK_SECONDS)."""
    slack = timedelta(seconds=console.SLACK_SECONDS)
    start = STATEMENT_START
    if created_from is not None:
        first = await console.txid_at(conn, created_from - slack)
        if first is not None:
            start = StatementPosition(max(first - 1, 0), 0, "")
    upper = None
    if created_to is not None:
        last = await console.txid_at(conn, created_to + slack)
        upper = last
    return _Bounds(start, upper)


async def _with_balances(conn: AsyncConnection, address: str, found: list[console.RangeLine]) -> list[StatementLine]:
    running: dict[str, int] = {}
    lines = []
    for line in found:
        if line.ledger not in running:
            running[line.ledger] = await audit.balance_through(conn, address, line.ledger, line.position)
        else:
            running[line.ledger] += line.amount
        lines.append(
            StatementLine(
                entry_id=line.entry_id,
                kind=line.kind,
                created_at=line.created_at,
                ledger=line.ledger,
                amount=line.amount,
                balance_after=running[line.ledger],
                request_id=line.request_id,
            )
        )
    return lines
