"""Concurrency with real parallel database connections: many requests in flight at once, through HTTP.

The app runs in-process; asyncio.gather puts every request in flight together, and each one holds its own pooled
connection, so the transactions really overlap inside PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from ledger_service.db import lifecycle as lifecycle_db
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.operations import Hold, Operation
from ledger_service.domain.planning import Plan, Planner, Result, Snapshot
from ledger_service.schemas import HoldCommand
from ledger_service.services.housekeeping import refresh_snapshots
from ledger_service.services.ledger import LedgerService
from ledger_service.services.lifecycle import LifecycleService
from tests.support import LedgerClient

ESTIMATE = 2000  # gpt-4o, prompt 100 + max 200 + 500 pre-consumed, x 2.5


def codes(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(str(r.status_code) if r.status_code < 400 else r.json()["code"] for r in responses)


async def fifty_holds(ledger: LedgerClient) -> list[httpx.Response]:
    return list(
        await asyncio.gather(*(ledger.hold(request_id=f"r{i}", prompt_tokens=100, max_tokens=200) for i in range(50)))
    )


async def test_fifty_concurrent_holds_on_quota_for_ten(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10 * ESTIMATE)
    await ledger.token(1, 1)
    responses = await fifty_holds(ledger)
    assert codes(responses) == {"201": 10, "insufficient_user_quota": 40}
    user = await ledger.user(1)
    assert (user["available"], user["held"]) == (0, 10 * ESTIMATE)
    assert await ledger.count("SELECT count(*) FROM requests") == 10
    await ledger.assert_books_balance()


async def test_fifty_concurrent_holds_on_a_token_capped_for_ten(ledger: LedgerClient) -> None:
    await ledger.fund(1, 50 * ESTIMATE)
    await ledger.token(1, 1, remaining=10 * ESTIMATE)
    responses = await fifty_holds(ledger)
    assert codes(responses) == {"201": 10, "insufficient_token_quota": 40}
    token = await ledger.token_view(1)
    assert (token["remaining"], token["held"]) == (0, 10 * ESTIMATE)
    assert (await ledger.user(1))["available"] == 40 * ESTIMATE
    await ledger.assert_books_balance()


async def test_without_the_plans_premises_and_locks_the_same_load_oversells(
    ledger: LedgerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: the tests above can fail. Apply every plan without its premises and without the users' locks, and
    the 50 holds, each planned from a balance read before the others committed, oversell the quota."""
    unguarded = lifecycle_db._plan_document

    def without_guards(plan: Plan, snapshot: Snapshot, *, with_premises: bool) -> Any:
        return msgspec.structs.replace(unguarded(plan, snapshot, with_premises=False), lock_users=[])

    async def one_at_a_time(self: LifecycleService, operation: Operation) -> Result:
        [result] = await self.run([operation])  # no coalescing: each hold plans from its own read
        return result

    monkeypatch.setattr(lifecycle_db, "_plan_document", without_guards)
    monkeypatch.setattr(LifecycleService, "run_one", one_at_a_time)
    await ledger.fund(1, 10 * ESTIMATE)
    await ledger.token(1, 1)
    responses = await fifty_holds(ledger)
    assert codes(responses)["201"] > 10
    assert (await ledger.user(1))["available"] < 0


async def test_identical_holds_at_the_same_moment_create_one_hold(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    body = {"request_id": "same", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 100}
    responses = await asyncio.gather(*(ledger.post("/v1/holds", body) for _ in range(10)))
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert len({r.text for r in responses}) == 1  # every caller got the same hold
    assert await ledger.count("SELECT count(*) FROM requests") == 1
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'hold'") == 1


async def test_one_request_id_raced_by_two_users_is_one_hold(ledger: LedgerClient) -> None:
    for user in (1, 2):
        await ledger.fund(user, 100_000)
        await ledger.token(user, user)
    bodies = [
        {"request_id": "contested", "user_id": u, "token_id": u, "model": "gpt-4o", "prompt_tokens": 100}
        for u in (1, 2) * 5
    ]
    responses = await asyncio.gather(*(ledger.post("/v1/holds", b) for b in bodies))
    outcome = codes(list(responses))
    assert outcome["201"] == 1
    assert outcome["200"] == 4  # the winner's own retries are replays
    assert outcome["idempotency_conflict"] == 5
    assert await ledger.count("SELECT count(*) FROM requests") == 1
    await ledger.assert_books_balance()


async def test_settle_and_refund_racing_on_one_hold(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    for i in range(10):
        await ledger.hold(request_id=f"race{i}", prompt_tokens=100, max_tokens=200)
    calls = []
    for i in range(10):
        calls.append(
            ledger.post(f"/v1/holds/race{i}/settle", {"channel_id": 1, "prompt_tokens": 1, "completion_tokens": 1})
        )
        calls.append(ledger.post(f"/v1/holds/race{i}/refund", {}))
    responses = list(await asyncio.gather(*calls))
    for i in range(10):
        settle, refund = responses[2 * i], responses[2 * i + 1]
        assert sorted([settle.status_code, refund.status_code]) == [200, 409]
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind IN ('settle', 'refund')") == 10
    assert (
        await ledger.count("SELECT count(*) FROM postings WHERE account LIKE 'hold:%' GROUP BY ()") == 20
    )  # one posting in, one out, per hold
    held = await ledger.conn.fetchval("SELECT coalesce(sum(amount), 0) FROM postings WHERE account LIKE 'hold:%'")
    assert held == 0
    await ledger.assert_books_balance()


async def test_many_identical_settlements_settle_once(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="s", prompt_tokens=100, max_tokens=200)
    body = {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 100}
    responses = await asyncio.gather(*(ledger.post("/v1/holds/s/settle", body) for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert sum(1 for r in responses if "idempotent-replayed" in r.headers) == 19
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'settle'") == 1
    assert (await ledger.user(1))["available"] == 100_000 - 1250


async def test_a_new_token_raced_by_two_users_belongs_to_one(ledger: LedgerClient) -> None:
    bodies = [{"user_id": u, "unlimited": False, "remaining": 100 * u} for u in (1, 2) * 5]
    responses = await asyncio.gather(*(ledger.put("/v1/tokens/77", b) for b in bodies))
    owner = (await ledger.token_view(77))["user_id"]
    for body, response in zip(bodies, responses, strict=True):
        if body["user_id"] == owner:
            assert response.status_code in (200, 201)
        else:
            assert (response.status_code, response.json()["code"]) == (409, "token_user_mismatch")
    assert (await ledger.token_view(77))["remaining"] == 100 * owner
    await ledger.assert_books_balance()


async def test_holds_stay_serialized_when_the_database_defaults_to_repeatable_read(ledger: LedgerClient) -> None:
    """The hold's argument needs READ COMMITTED; the engine pins it, whatever the database's default says."""
    await ledger.conn.execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = ''repeatable read''',"
        " current_database()); END $$"
    )
    await ledger.fund(1, 10 * ESTIMATE)
    await ledger.token(1, 1)
    responses = await fifty_holds(ledger)
    assert codes(responses) == {"201": 10, "insufficient_user_quota": 40}
    assert (await ledger.user(1))["available"] == 0


async def _plan_hold(ledger: LedgerClient, request_id: str, trust_factor: int = 0) -> tuple[Plan, Snapshot]:
    """A hold of ESTIMATE for user 1, planned from what the database says now (not yet applied)."""
    command = HoldCommand(
        request_id=request_id, user_id=1, token_id=1, model="gpt-4o", prompt_tokens=100, max_tokens=200
    )
    operations = [Hold(command)]
    snapshot = await lifecycle_db.read(ledger.conn, operations, lock=False)
    planner = Planner(snapshot, pre_consumed_quota=500, trust_factor=trust_factor, hold_ttl=600)
    return planner.plan_all(operations, atomic=False), snapshot


@pytest.mark.parametrize("with_premises", [True, False])
async def test_a_plan_whose_balance_changed_is_stale_and_writes_nothing(
    ledger: LedgerClient, with_premises: bool
) -> None:
    """Two holds planned from the same balance, applied one after the other: the second plan's premise (the balance
    it was decided on) no longer holds, so it writes nothing. Control: without premises it overdraws the user."""
    await ledger.fund(1, ESTIMATE + ESTIMATE // 2)
    await ledger.token(1, 1)
    first, second = await _plan_hold(ledger, "first"), await _plan_hold(ledger, "second")
    assert await lifecycle_db.apply(ledger.conn, *first, with_premises=with_premises) is not None
    applied = await lifecycle_db.apply(ledger.conn, *second, with_premises=with_premises)
    if with_premises:
        assert applied is None
        assert await ledger.count("SELECT count(*) FROM requests") == 1
        assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'hold'") == 1
        assert (await ledger.user(1))["available"] == ESTIMATE // 2
    else:
        assert applied is not None
        assert (await ledger.user(1))["available"] == -ESTIMATE // 2
    await ledger.assert_books_balance()


@pytest.mark.parametrize("with_premises", [True, False])
async def test_a_trusted_hold_whose_user_no_longer_qualifies_is_stale(
    ledger: LedgerClient, with_premises: bool
) -> None:
    """Trust (nothing held) was decided on a balance above 100 x the estimate; a consumption then takes the user
    below it. The plan's premise covers the trust rule too: it goes stale. Control: without premises the user
    gets an unbacked trusted hold."""
    await ledger.fund(1, 100 * ESTIMATE + 1)
    await ledger.token(1, 1)
    trusted, read = await _plan_hold(ledger, "trusted", trust_factor=100)
    assert trusted.results[0].row.trusted  # type: ignore[union-attr]
    consumption = {"request_id": "drain", "user_id": 1, "token_id": 1, "channel_id": 1, "model": "gpt-4o",
                   "prompt_tokens": 0, "completion_tokens": 0, "quota": 10}  # fmt: skip
    assert (await ledger.post("/v1/consumptions", consumption)).status_code == 201
    applied = await lifecycle_db.apply(ledger.conn, trusted, read, with_premises=with_premises)
    assert (applied is None) is with_premises
    assert await ledger.count("SELECT count(*) FROM requests WHERE request_id = 'trusted'") == (
        0 if with_premises else 1
    )


DRAIN = (
    "WITH entry AS (INSERT INTO entries (kind, user_id, hash)"
    " VALUES ('adjustment', 1, decode(repeat('ab', 32), 'hex')) RETURNING id)"
    " INSERT INTO postings (entry_id, ledger, account, amount) SELECT id, 'quota', account, amount"
    " FROM entry, (VALUES ('user:1', -$1::bigint), ('system:issuance', $1)) v(account, amount)"
)


@pytest.mark.parametrize("with_premises", [True, False])
async def test_a_drain_in_flight_during_the_read_makes_the_plan_stale(
    ledger: LedgerClient, raw: asyncpg.Connection[Any], with_premises: bool
) -> None:
    """A transaction that has posted but not committed when the plan reads its balance, and commits before the plan
    is applied: the read could not see its postings, and the premise check must count them (its transaction was
    in progress at the read, so it is older than the read's snapshot). Control: without premises, an overdraft."""
    await ledger.fund(1, ESTIMATE + ESTIMATE // 2)
    await ledger.token(1, 1)
    async with raw.transaction():
        await raw.execute(DRAIN, ESTIMATE)  # in flight while the plan is made
        hold, read = await _plan_hold(ledger, "after-drain")
        assert read.balances[("user:1", SubLedger.QUOTA)] == ESTIMATE + ESTIMATE // 2
    applied = await lifecycle_db.apply(ledger.conn, hold, read, with_premises=with_premises)
    assert (applied is None) is with_premises
    assert (await ledger.user(1))["available"] == (ESTIMATE // 2 if with_premises else -ESTIMATE // 2)
    await ledger.assert_books_balance()


async def test_a_plan_read_before_a_snapshot_refresh_still_sees_what_changed(
    ledger: LedgerClient, service: LedgerService
) -> None:
    """A snapshot refresh between a plan's read and its apply moves the horizon past the read: the check then reads
    the balance in full (the other path), and a drain committed in between still makes the plan stale."""
    await ledger.fund(1, ESTIMATE + ESTIMATE // 2)
    await ledger.token(1, 1)
    hold, read = await _plan_hold(ledger, "across-refresh")
    await ledger.conn.execute(DRAIN, ESTIMATE)
    assert await refresh_snapshots(service.engine) is not None
    assert await lifecycle_db.apply(ledger.conn, hold, read, with_premises=True) is None
    assert await ledger.count("SELECT count(*) FROM requests") == 0
    hold, read = await _plan_hold(ledger, "after-refresh")  # planned again, it is refused: nothing to apply
    assert not hold.writes
    await ledger.assert_books_balance()


async def test_a_balance_read_again_is_the_one_seen_plus_what_its_snapshot_could_not_see(
    ledger: LedgerClient, raw: asyncpg.Connection[Any]
) -> None:
    """A balance this process read before is brought up to date from the snapshot it was read in: a drain
    committed since counts, one still in flight does not until it commits, and each answer equals a full read."""
    await ledger.fund(1, 10 * ESTIMATE)
    await ledger.token(1, 1)
    operations = [Hold(HoldCommand(request_id="probe", user_id=1, token_id=1, model="gpt-4o", prompt_tokens=1))]
    seen = lifecycle_db.SeenBalances()
    key = ("user:1", SubLedger.QUOTA)

    async def both() -> tuple[int, int]:
        assert "seen" in seen.annotate([{"account": "user:1", "ledger": "quota"}])[0]  # the read is given what was seen
        again = await lifecycle_db.read(ledger.conn, operations, lock=False, seen=seen)
        full = await lifecycle_db.read(ledger.conn, operations, lock=False)
        return again.balances[key], full.balances[key]

    assert (await lifecycle_db.read(ledger.conn, operations, lock=False, seen=seen)).balances[key] == 10 * ESTIMATE
    async with raw.transaction():
        await raw.execute(DRAIN, ESTIMATE)  # in flight across the next read
        await ledger.conn.execute(DRAIN, 2 * ESTIMATE)
        assert await both() == (8 * ESTIMATE, 8 * ESTIMATE)
    assert await both() == (7 * ESTIMATE, 7 * ESTIMATE)  # the one in flight then, committed now


def test_a_remembered_balance_is_read_in_full_again_once_its_chain_is_old() -> None:
    """The safety net: past `full_read_every` seconds since a balance was last read in full, the read is not given
    the remembered balance, so it reads in full (and starts a new chain)."""
    balance = [lifecycle_db._Balance("user:1", "quota", 5)]
    fresh = lifecycle_db.SeenBalances(full_read_every=3600)
    fresh.remember(balance, "10:10:")
    assert fresh.annotate([{"account": "user:1", "ledger": "quota"}]) == [
        {"account": "user:1", "ledger": "quota", "seen": 5, "seen_at": "10:10:"}
    ]
    old = lifecycle_db.SeenBalances(full_read_every=-1)
    old.remember(balance, "10:10:")
    assert old.annotate([{"account": "user:1", "ledger": "quota"}]) == [{"account": "user:1", "ledger": "quota"}]


async def test_a_balance_read_inside_a_transaction_with_an_id_is_not_remembered(
    ledger: LedgerClient, raw: asyncpg.Connection[Any]
) -> None:
    """A snapshot taken inside a transaction that already has an id leaves that transaction out of its in-progress
    list, as if it had committed: once a later id has committed, that transaction's own later postings would
    count as seen in it. Such a read (the locked, pessimistic one) is not remembered, so the next read counts
    them. Remembering it made the next read miss the drain below, and a hold could then overspend."""
    await ledger.fund(1, 10 * ESTIMATE)
    await ledger.token(1, 1)
    operations = [Hold(HoldCommand(request_id="probe", user_id=1, token_id=1, model="gpt-4o",
                                                         prompt_tokens=1))]  # fmt: skip
    seen = lifecycle_db.SeenBalances()
    key = ("user:1", SubLedger.QUOTA)
    async with raw.transaction():
        await raw.execute("SELECT pg_current_xact_id()")  # this transaction has an id
        await ledger.conn.execute("SELECT pg_current_xact_id()")  # a later id commits meanwhile
        inside = await lifecycle_db.read(raw, operations, lock=False, seen=seen)
        assert inside.seen_at is None
        assert len(seen) == 0
        await raw.execute(DRAIN, ESTIMATE)
    again = await lifecycle_db.read(ledger.conn, operations, lock=False, seen=seen)
    full = await lifecycle_db.read(ledger.conn, operations, lock=False)
    assert again.balances[key] == full.balances[key] == 9 * ESTIMATE


async def test_a_trust_threshold_beyond_bigint_is_still_a_premise(ledger: LedgerClient) -> None:
    """With the largest trust factor, a hold of 10^15 has a threshold of 10^21, beyond any stored amount; its premise
    ('at most the threshold') must still be checked rather than fail the whole plan (bounds are numeric)."""
    await ledger.fund(1, 10**15)
    await ledger.token(1, 1)
    command = HoldCommand(request_id="huge", user_id=1, token_id=1, model="gpt-4o", prompt_tokens=0, amount=10**15)
    operations = [Hold(command)]
    snapshot = await lifecycle_db.read(ledger.conn, operations, lock=False)
    plan = Planner(snapshot, pre_consumed_quota=500, trust_factor=10**6, hold_ttl=600).plan_all(
        operations, atomic=False
    )
    assert plan.balance_bounds  # the untrusted decision rests on 'at most 10^21'
    assert await lifecycle_db.apply(ledger.conn, plan, snapshot, with_premises=True) is not None
    assert (await ledger.user(1))["available"] == 0


async def test_the_lifecycle_pool_reports_every_new_connection(database_url: str) -> None:
    """The pool calls on_connect for each connection it opens (the app passes SeenBalances.forget), including
    one that replaces a connection the server closed: balances seen before a restart are never reused."""
    opened: list[int] = []
    pool = await lifecycle_db.create_pool(database_url, size=1, on_connect=lambda: opened.append(1))
    try:
        assert len(opened) == 1  # the pool's connection
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            async with pool.acquire() as conn:
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")  # the server drops it
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        assert len(opened) == 2  # a new connection replaced the dropped one
    finally:
        await pool.close()
