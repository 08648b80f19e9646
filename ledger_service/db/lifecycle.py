"""The lifecycle's two statements, over asyncpg directly: read a snapshot, apply a plan (migration 0003).

The relay operations are most of the traffic, and on a small machine their cost is the client side of each round
trip. So they skip SQLAlchemy's statement machinery: each is one prepared statement on an asyncpg connection, with
its arguments and answer as one JSON document each (msgspec encodes and decodes them).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import msgspec

from ledger_service.db.engine import asyncpg_dsn
from ledger_service.db.pricing import prices_of
from ledger_service.db.requests import request_row
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.lifecycle import RequestKind, RequestStatus
from ledger_service.domain.planning import Operation, Plan, Snapshot, lock_targets, wanted
from ledger_service.domain.pricing import Prices

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


async def create_pool(
    url: str, *, size: int, application_name: str = "ledger-service", on_connect: Callable[[], None] | None = None
) -> Pool:
    """A pool for the lifecycle statements. READ COMMITTED is pinned per session, whatever the server defaults
    to: a plan's premises are checked by statements that must each see the latest commits (docs/accounting.md).
    `on_connect` runs for every new connection, including the ones that replace connections the server closed."""

    async def opened(connection: Connection) -> None:
        if on_connect is not None:
            on_connect()

    async def keep(connection: Connection) -> None:
        # Released connections are reused as they are: the lifecycle leaves no session state behind (only
        # transaction-scoped locks, and every transaction is closed before release), so asyncpg's reset round
        # trip would buy nothing.
        if connection.is_in_transaction():
            await connection.execute("ROLLBACK")

    pool: Pool = await asyncpg.create_pool(
        asyncpg_dsn(url),
        min_size=1,
        max_size=size,
        reset=keep,
        init=opened,
        timeout=5,
        command_timeout=60,
        server_settings={
            "application_name": application_name,
            "default_transaction_isolation": "read committed",
        },
    )
    return pool


class _Request(msgspec.Struct):
    request_id: str
    kind: str
    status: str
    user_id: int
    token_id: int
    token_limited: bool
    group_name: str
    model: str
    prompt_tokens: int
    max_tokens: int
    amount: int
    trusted: bool
    model_ratio: Decimal
    completion_ratio: Decimal
    group_ratio: Decimal
    model_price: Decimal | None
    channel_id: int | None
    charged: int | None
    late: bool
    settled_prompt_tokens: int | None
    completion_tokens: int | None
    request_fingerprint: bytes  # base64 in the document
    settle_fingerprint: bytes | None
    refund_fingerprint: bytes | None
    created_at: datetime
    expires_at: datetime | None


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
    requests: list[_Request]
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


async def read(
    conn: Connection, operations: list[Operation], *, lock: bool, seen: SeenBalances | None = None
) -> Snapshot:
    """One statement: everything the operations decide on. With `lock`, inside the caller's transaction, their
    users and requests are locked first, so nothing read can change before the plan is applied. With `seen`,
    balances read before are brought up to date rather than read again, and the balances read are remembered."""
    want: dict[str, Any] = wanted(operations)
    if lock:
        users, moved = lock_targets(operations)
        want.update(lock=True, lock_users=users, lock_requests=moved)
    if seen is not None:
        want["accounts"] = seen.annotate(want["accounts"])
    found = _snapshot_decoder.decode(
        await conn.fetchval("SELECT ledger_lifecycle_read($1::jsonb)", _encoder.encode(want).decode())
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
        requests={
            r.request_id: request_row(msgspec.structs.asdict(r) | {"read_at": found.now}) for r in found.requests
        },
        tokens={t.token_id: (t.user_id, t.unlimited) for t in found.tokens},
        balances={(b.account, SubLedger(b.ledger)): b.balance for b in found.balances},
        prices=prices,
        seen_at=found.seen_at,
    )


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _plan_document(plan: Plan, snapshot: Snapshot, *, with_premises: bool) -> dict[str, Any]:
    if with_premises and plan.balance_bounds and snapshot.seen_at is None:
        raise RuntimeError("balance premises need the snapshot their balances were read in")
    new_requests = []
    updated_requests = []
    for request_id, row in plan.requests.items():
        resolution = {
            "request_id": request_id,
            "status": str(row.status),
            "channel_id": row.channel_id,
            "settled_prompt_tokens": row.settled_prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "charged": row.charged,
            "late": row.late,
            "settle_fingerprint": _hex(row.settle_fingerprint),
            "refund_fingerprint": _hex(row.refund_fingerprint),
        }
        if request_id not in plan.new_requests:
            updated_requests.append(resolution)
            continue
        prices = row.prices
        new_requests.append(
            resolution
            | {
                "kind": str(row.kind),
                "user_id": row.user_id,
                "token_id": row.token_id,
                "token_limited": row.token_limited,
                "group_name": row.group,
                "model": row.model,
                "prompt_tokens": row.prompt_tokens,
                "max_tokens": row.max_tokens,
                "amount": row.amount,
                "trusted": row.trusted,
                "model_ratio": str(prices.model_ratio),
                "completion_ratio": str(prices.completion_ratio),
                "group_ratio": str(prices.group_ratio),
                "model_price": None if prices.model_price is None else str(prices.model_price),
                "request_fingerprint": row.request_fingerprint.hex(),
                "expires_in": plan.new_requests[request_id] if row.kind is RequestKind.HOLD else None,
                "resolved": row.kind is RequestKind.HOLD and row.status is not RequestStatus.OPEN,
            }
        )
    changes: dict[tuple[str, SubLedger], int] = {}
    for draft, _ in plan.entries:
        for posting in draft.postings:
            key = (posting.account, posting.ledger)
            changes[key] = changes.get(key, 0) + posting.amount
    entries = [
        {
            "kind": str(draft.kind),
            "request_id": draft.request_id,
            "user_id": draft.user_id,
            "token_id": draft.token_id,
            "channel_id": draft.channel_id,
            "charged": charged,
            "details": dict(draft.details),
            "hash": draft.content_hash().hex(),
            "postings": [[str(p.ledger), p.account, p.amount] for p in draft.postings],
        }
        for draft, charged in plan.entries
    ]
    return {
        "lock_users": sorted(plan.lock_users),
        "expect_requests": [
            {"request_id": request_id, "status": str(status)} for request_id, status in plan.expect_requests.items()
        ],
        "expect_balances": [
            # Checked after the plan's own postings are written: the bounds shift by the plan's change.
            {
                "account": account,
                "ledger": str(ledger),
                "seen": snapshot.balances[(account, ledger)],
                "seen_at": snapshot.seen_at,
                "low": None if bounds.low is None else bounds.low + changes.get((account, ledger), 0),
                "high": None if bounds.high is None else bounds.high + changes.get((account, ledger), 0),
            }
            for (account, ledger), bounds in plan.balance_bounds.items()
        ]
        if with_premises
        else [],
        "expect_tokens": [
            {"token_id": token_id, "unlimited": unlimited} for token_id, unlimited in plan.expect_tokens.items()
        ]
        if with_premises
        else [],
        "new_requests": new_requests,
        "updated_requests": updated_requests,
        "entries": entries,
    }


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
