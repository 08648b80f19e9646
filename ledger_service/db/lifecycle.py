"""The lifecycle's two statements, over asyncpg directly: read a snapshot, apply a plan (migration 0003).

The relay operations are most of the traffic, and on a small machine their cost is the client side of each round
trip. So they skip SQLAlchemy's statement machinery: each is one prepared statement on an asyncpg connection, with
its arguments and answer as one JSON document each (msgspec encodes and decodes them).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import msgspec

from ledger_service.db.engine import asyncpg_dsn, connect_options
from ledger_service.db.pricing import prices_of
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.entries import EntryKind, Posting
from ledger_service.domain.lifecycle import RequestRow, RequestStatus
from ledger_service.domain.operations import Operation
from ledger_service.domain.planning import Plan, Snapshot, Wanted, wanted
from ledger_service.domain.pricing import Prices

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


async def create_pool(
    url: str,
    *,
    size: int,
    application_name: str = "ledger-service",
    on_connect: Callable[[], None] | None = None,
    statement_cache: bool = True,
    startup_isolation: bool = True,
) -> Pool:
    """A pool for the lifecycle statements. READ COMMITTED is pinned per session, whatever the server defaults
    to: a plan's premises are checked by statements that must each see the latest commits (docs/accounting.md).
    `on_connect` runs for every new connection, including the ones that replace connections the server closed.

    The URL may name several hosts (db/engine.py): each connection goes to the primary. Without `statement_cache`
    (pgbouncer's transaction pooling) no prepared statement is kept between transactions. Without
    `startup_isolation` (behind pgbouncer, which refuses unknown startup parameters) the isolation is not pinned:
    the server's default, READ COMMITTED unless changed, is then the one."""

    async def opened(connection: Connection) -> None:
        if on_connect is not None:
            on_connect()

    async def keep(connection: Connection) -> None:
        # Released connections are reused as they are: the lifecycle leaves no session state behind (only
        # transaction-scoped locks, and every transaction is closed before release), so asyncpg's reset round
        # trip would buy nothing.
        if connection.is_in_transaction():
            await connection.execute("ROLLBACK")

    options = connect_options(application_name=application_name, command_timeout=60, statement_cache=statement_cache)
    if startup_isolation:
        options["server_settings"]["default_transaction_isolation"] = "read committed"
    pool: Pool = await asyncpg.create_pool(
        asyncpg_dsn(url), min_size=1, max_size=size, reset=keep, init=opened, **options
    )
    return pool


class _Token(msgspec.Struct):
    token_id: int
    user_id: int
    unlimited: bool


class _Balance(msgspec.Struct):
    account: str
    ledger: str
    balance: int


class _Model(msgspec.Struct):
    model: str
    model_ratio: Decimal
    completion_ratio: Decimal
    model_price: Decimal | None


class _Group(msgspec.Struct):
    group_name: str
    group_ratio: Decimal


class _Snapshot(msgspec.Struct):
    now: datetime
    seen_at: str | None
    requests: list[RequestRow]
    tokens: list[_Token]
    balances: list[_Balance]
    models: list[_Model]
    groups: list[_Group]


class _Created(msgspec.Struct):
    request_id: str
    created_at: datetime
    expires_at: datetime | None


class _Applied(msgspec.Struct):
    stale: bool = False
    created: list[_Created] = []


class _ExpectedRequest(msgspec.Struct):
    request_id: str
    status: RequestStatus


class _ExpectedBalance(msgspec.Struct):
    account: str
    ledger: SubLedger
    seen: int
    seen_at: str | None
    low: int | None
    high: int | None


class _ExpectedToken(msgspec.Struct):
    token_id: int
    unlimited: bool


class _Entry(msgspec.Struct):
    kind: EntryKind
    request_id: str | None
    user_id: int | None
    token_id: int | None
    channel_id: int | None
    charged: int | None
    details: Mapping[str, Any]
    hash: bytes
    postings: tuple[Posting, ...]
    """Each as [ledger, account, amount]."""


class _PlanDocument(msgspec.Struct):
    """The argument of `ledger_lifecycle_apply`: what to write, and the premises to check."""

    lock_users: list[int]
    expect_requests: list[_ExpectedRequest]
    expect_balances: list[_ExpectedBalance]
    expect_tokens: list[_ExpectedToken]
    new_requests: list[RequestRow]
    expires_in: dict[str, int]
    """request_id -> seconds, for each new hold (a request absent here never expires)."""
    updated_requests: list[RequestRow]
    entries: list[_Entry]


STALE_PLAN = "LS001"
"""SQLSTATE of ledger_lifecycle_apply when a balance or token premise failed after the plan's writes."""

_snapshot_decoder = msgspec.json.Decoder(_Snapshot)
_applied_decoder = msgspec.json.Decoder(_Applied)
_encoder = msgspec.json.Encoder()


class SeenBalances:
    """The balances this process read last, each with the database snapshot it was read in (at most `capacity`,
    the least recently read forgotten first).

    A balance read again is then the one seen plus the postings that snapshot could not see (`ledger_balances`,
    migration 0004), instead of a scan of every posting since the last snapshot refresh. That is exact whatever
    else wrote in between, in this process or another: postings are only ever added. Forget everything when a
    connection to the database is lost or a new one is opened: a restored or failed-over database may not have
    what was seen. Only balances read outside a transaction are remembered (see `ledger_lifecycle_read`).

    As a safety net, each balance is still read in full at least every `full_read_every` seconds (plus one read):
    were a chain of brought-up-to-date balances ever wrong, the error would not outlive it.
    """

    def __init__(self, capacity: int = 100_000, full_read_every: float = 10.0) -> None:
        self.capacity = capacity
        self.full_read_every = full_read_every
        # (account, ledger) -> (balance, snapshot it was read in, monotonic time of the chain's full read)
        self._seen: OrderedDict[tuple[str, str], tuple[int, str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def annotate(self, accounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The read's `accounts` argument ({account, ledger} each), with `seen` and `seen_at` added where a balance
        was seen (and its chain is not due for a full read)."""
        now = time.monotonic()
        annotated: list[dict[str, Any]] = []
        for wanted_account in accounts:
            seen = self._seen.get((wanted_account["account"], wanted_account["ledger"]))
            if seen is None or now - seen[2] > self.full_read_every:
                annotated.append(wanted_account)
            else:
                annotated.append(wanted_account | {"seen": seen[0], "seen_at": seen[1]})
        return annotated

    def remember(self, balances: list[_Balance], seen_at: str) -> None:
        now = time.monotonic()
        for balance in balances:
            key = (balance.account, balance.ledger)
            before = self._seen.get(key)
            # A read brought up to date from a remembered balance continues its chain; a full read starts one.
            started = before[2] if before is not None and now - before[2] <= self.full_read_every else now
            self._seen[key] = (balance.balance, seen_at, started)
            self._seen.move_to_end(key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def forget(self) -> None:
        self._seen.clear()


def _read_document(want: Wanted, *, lock: bool, seen: SeenBalances | None) -> dict[str, Any]:
    """The argument of `ledger_lifecycle_read`; with `lock`, the users and requests to lock first."""
    balances = [{"account": account, "ledger": str(ledger)} for account, ledger in sorted(want.balances)]
    document: dict[str, Any] = {
        "request_ids": sorted(want.request_ids),
        "token_ids": sorted(want.token_ids),
        "accounts": balances if seen is None else seen.annotate(balances),
        "models": sorted(want.models),
        "groups": sorted(want.groups),
    }
    if lock:
        document.update(lock=True, lock_users=sorted(want.lock_users), lock_requests=sorted(want.lock_requests))
    return document


async def read(
    conn: Connection, operations: Sequence[Operation], *, lock: bool, seen: SeenBalances | None = None
) -> Snapshot:
    """One statement: everything the operations decide on. With `lock`, inside the caller's transaction, their
    users and requests are locked first, so nothing read can change before the plan is applied. With `seen`,
    balances read before are brought up to date rather than read again, and the balances read are remembered."""
    document = _read_document(wanted(operations), lock=lock, seen=seen)
    found = _snapshot_decoder.decode(
        await conn.fetchval("SELECT ledger_lifecycle_read($1::jsonb)", _encoder.encode(document).decode())
    )
    if seen is not None and found.seen_at is not None:  # None: read inside a transaction that has an id
        seen.remember(found.balances, found.seen_at)
    models = {m.model: m for m in found.models}
    groups = {g.group_name: g.group_ratio for g in found.groups}

    @cache
    def prices(model: str, group: str) -> Prices:
        m = models.get(model)
        if m is None:
            return prices_of(None, None, None, groups.get(group))
        return prices_of(m.model_ratio, m.completion_ratio, m.model_price, groups.get(group))

    return Snapshot(
        now=found.now,
        requests={r.request_id: r for r in found.requests},
        tokens={t.token_id: (t.user_id, t.unlimited) for t in found.tokens},
        balances={(b.account, SubLedger(b.ledger)): b.balance for b in found.balances},
        prices=prices,
        seen_at=found.seen_at,
    )


def _plan_document(plan: Plan, snapshot: Snapshot, *, with_premises: bool) -> _PlanDocument:
    if with_premises and plan.balance_bounds and snapshot.seen_at is None:
        raise RuntimeError("balance premises need the snapshot their balances were read in")
    rows = plan.requests.values()
    return _PlanDocument(
        lock_users=sorted(plan.lock_users),
        expect_requests=[_ExpectedRequest(request_id, status) for request_id, status in plan.expect_requests.items()],
        expect_balances=_expected_balances(plan, snapshot) if with_premises else [],
        expect_tokens=[_ExpectedToken(t, unlimited) for t, unlimited in plan.expect_tokens.items()]
        if with_premises
        else [],
        new_requests=[row for row in rows if plan.creates(row.request_id)],
        expires_in={request_id: s for request_id, s in plan.expires_in.items() if s is not None},
        updated_requests=[row for row in rows if not plan.creates(row.request_id)],
        entries=[
            _Entry(
                kind=draft.kind,
                request_id=draft.request_id,
                user_id=draft.user_id,
                token_id=draft.token_id,
                channel_id=draft.channel_id,
                charged=charged,
                details=draft.details,
                hash=draft.content_hash(),
                postings=draft.postings,
            )
            for draft, charged in plan.entries
        ],
    )


def _expected_balances(plan: Plan, snapshot: Snapshot) -> list[_ExpectedBalance]:
    """The balance premises, checked after the plan's own postings are written: the bounds shift by its change."""
    changes: dict[tuple[str, SubLedger], int] = {}
    for draft, _ in plan.entries:
        for posting in draft.postings:
            key = (posting.account, posting.ledger)
            changes[key] = changes.get(key, 0) + posting.amount
    return [
        _ExpectedBalance(
            account=account,
            ledger=ledger,
            seen=snapshot.balances[(account, ledger)],
            seen_at=snapshot.seen_at,
            low=None if bounds.low is None else bounds.low + changes.get((account, ledger), 0),
            high=None if bounds.high is None else bounds.high + changes.get((account, ledger), 0),
        )
        for (account, ledger), bounds in plan.balance_bounds.items()
    ]


async def apply(
    conn: Connection, plan: Plan, snapshot: Snapshot, *, with_premises: bool
) -> dict[str, tuple[datetime, datetime | None]] | None:
    """Apply a plan in one statement. None if a premise no longer held (nothing was written).

    `snapshot` is what the plan was made from. Without premises (the caller locked everything the plan read, in
    its transaction) only the statuses of the requests it moves are checked. Returns the creation and expiry times
    of the requests it created.
    """
    document = _encoder.encode(_plan_document(plan, snapshot, with_premises=with_premises)).decode()
    try:
        answer = await conn.fetchval("SELECT ledger_lifecycle_apply($1::jsonb)", document)
    except asyncpg.PostgresError as error:
        if error.sqlstate == STALE_PLAN:
            return None  # the statement, and with it everything the plan wrote, was rolled back
        raise
    applied = _applied_decoder.decode(answer)
    if applied.stale:
        return None
    return {c.request_id: (c.created_at, c.expires_at) for c in applied.created}


async def lock_due_holds(conn: Connection, *, limit: int) -> list[str]:
    """The request ids of open holds past expires_at, the most overdue first, locked for the caller's transaction;
    holds another sweeper has locked are skipped, so sweepers share the work."""
    rows = await conn.fetch(
        "SELECT request_id FROM requests WHERE status = 'open' AND expires_at <= now()"
        " ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    return [row["request_id"] for row in rows]
