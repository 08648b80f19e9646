"""Tampering with the books behind the service's back, as a superuser, and the reconciliation naming each problem.

Every test builds the same realistic history (top-ups, limited and unlimited tokens, holds settled under and over
their estimate, refunds, a consumption, an expiry then a late settlement, a reversal; snapshots refreshed, two
sealed blocks, unsealed entries after them), checks that it reconciles, changes one thing with raw SQL, and checks
that exactly the checks concerned fail and that their offenders name what was changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.entries import Posting, content_hash
from ledger_service.services.audit import AuditService
from ledger_service.services.housekeeping import refresh_snapshots
from ledger_service.services.ledger import LedgerService
from tests.support import LedgerClient, unique

CHECKS = (
    "entries_balanced",
    "snapshots_match_entries",
    "holds_cleared",
    "no_overdue_holds",
    "background_jobs_current",
    "hash_chain_intact",
    "requests_match_entries",
    "summaries_match_entries",
)

# Phase A: snapshotted and sealed in block 1.
A_SETTLED = "a-settled"  # limited token, settled under its estimate
A_OVERAGE = "a-overage"  # unlimited token, settled above its estimate
A_OVERAGE_LIMITED = "a-overage-limited"  # limited token, settled above its estimate
A_REFUNDED = "a-refunded"  # limited token
A_REFUNDED_UNLIMITED = "a-refunded-unlimited"
A_TRUSTED = "a-trusted"  # trust rule: nothing held, settled as a direct charge
A_CONSUMED = "a-consumed"  # a consumption (no hold), reversed in phase C
A_LATE = "a-late"  # expired by the sweeper, then settled late
A_EXPIRED = "a-expired"  # expired by the sweeper, stays expired
A_OPEN = "a-open"  # still open at the end
# Phase B: after the snapshot refresh, sealed in block 2.
B_TOPUP = "topup-b"
B_SETTLED = "b-settled"
B_REFUNDED = "b-refunded"
B_CONSUMED = "b-consumed"
# Phase C: not sealed yet.
C_OPEN = "c-open"
C_CONSUMED = "c-consumed"


# The workload ----------------------------------------------------------------------------------------------------


async def hold(ledger: LedgerClient, request_id: str, user_id: int, token_id: int, amount: int) -> None:
    response = await ledger.hold(request_id=request_id, user_id=user_id, token_id=token_id, amount=amount)
    assert response.status_code == 201, response.text
    body = response.json()
    held = 0 if request_id == A_TRUSTED else amount
    assert (body["status"], body["amount"]) == ("open", held), body


async def settle(ledger: LedgerClient, request_id: str, channel_id: int, **usage: int) -> dict[str, Any]:
    body = {"channel_id": channel_id, "prompt_tokens": 100, "completion_tokens": 50, **usage}
    response = await ledger.post(f"/v1/holds/{request_id}/settle", body)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "settled"
    result: dict[str, Any] = response.json()
    return result


async def refund(ledger: LedgerClient, request_id: str) -> None:
    response = await ledger.post(f"/v1/holds/{request_id}/refund", {"reason": "upstream error"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "refunded"


async def consume(
    ledger: LedgerClient, request_id: str, user_id: int, token_id: int, channel_id: int, **usage: int
) -> None:
    body = {
        "request_id": request_id,
        "user_id": user_id,
        "token_id": token_id,
        "channel_id": channel_id,
        "group": "default",
        "model": "gpt-4o",
        "prompt_tokens": 100,
        "completion_tokens": 100,
        **usage,
    }
    response = await ledger.post("/v1/consumptions", body)
    assert response.status_code == 201, response.text


async def build_books(ledger: LedgerClient, service: LedgerService) -> None:
    """A mixed history; every hold amount is above 1% of the user's quota, so the trust rule holds it for real."""
    audit = AuditService(service.engine, sweep_interval_seconds=5)

    # Phase A.
    await ledger.fund(1, 1_000_000)
    await ledger.fund(2, 500_000)
    await ledger.fund(3, 200_000)
    await ledger.token(11, 1, remaining=300_000)
    await ledger.token(12, 1)
    await ledger.token(21, 2, remaining=100_000)
    await ledger.token(31, 3)
    await hold(ledger, A_SETTLED, 1, 11, 20_000)
    await settle(ledger, A_SETTLED, 7)  # (100 + 50 x 4) x 2.5 = 750
    await hold(ledger, A_OVERAGE, 1, 12, 15_000)
    await settle(ledger, A_OVERAGE, 7, quota=25_000)
    await hold(ledger, A_OVERAGE_LIMITED, 2, 21, 10_000)
    await settle(ledger, A_OVERAGE_LIMITED, 8, quota=15_000)
    await hold(ledger, A_REFUNDED, 2, 21, 8_000)
    await refund(ledger, A_REFUNDED)
    await hold(ledger, A_REFUNDED_UNLIMITED, 3, 31, 5_000)
    await refund(ledger, A_REFUNDED_UNLIMITED)
    await hold(ledger, A_TRUSTED, 1, 12, 100)
    await settle(ledger, A_TRUSTED, 9, prompt_tokens=10, completion_tokens=10)
    await consume(ledger, A_CONSUMED, 3, 31, 9)
    await hold(ledger, A_LATE, 1, 11, 12_000)
    await hold(ledger, A_EXPIRED, 3, 31, 4_000)
    await ledger.backdate(A_LATE)
    await ledger.backdate(A_EXPIRED)
    assert await service.lifecycle.expire_due_holds() == 2
    late = await settle(ledger, A_LATE, 8, prompt_tokens=50, completion_tokens=10)
    assert late["late"] is True
    await hold(ledger, A_OPEN, 2, 21, 6_000)
    assert await refresh_snapshots(service.engine, checkpoint_every=0) is not None
    assert await audit.seal() > 0

    # Phase B: sealed, but above the snapshots' horizon.
    response = await ledger.post("/v1/topups", {"user_id": 1, "amount": 50_000, "reference": B_TOPUP}, as_="admin")
    assert response.status_code == 201, response.text
    await hold(ledger, B_SETTLED, 1, 11, 20_000)
    await settle(ledger, B_SETTLED, 7, quota=6_500)
    await hold(ledger, B_REFUNDED, 2, 21, 9_000)
    await refund(ledger, B_REFUNDED)
    await consume(ledger, B_CONSUMED, 2, 21, 9, quota=1_200)
    assert await audit.seal() > 0

    # Phase C: not sealed.
    await ledger.fund(3, 30_000)
    await hold(ledger, C_OPEN, 3, 31, 5_000)
    response = await ledger.post(
        "/v1/adjustments", {"user_id": 2, "amount": -1_000, "reference": unique("adjust")}, as_="admin"
    )
    assert response.status_code == 201, response.text
    consumed = await entry_id(ledger.conn, A_CONSUMED, "consume")
    response = await ledger.post(
        f"/v1/entries/{consumed}/reverse", {"reference": unique("reverse"), "note": "refunded"}, as_="admin"
    )
    assert response.status_code == 201, response.text
    await consume(ledger, C_CONSUMED, 1, 12, 7, prompt_tokens=10, completion_tokens=10)

    assert await ledger.count("SELECT count(*) FROM blocks") == 2
    assert await ledger.count("SELECT count(*) FROM entries WHERE txid > (SELECT max(last_txid) FROM blocks)") > 0
    await ledger.assert_books_balance()


@pytest.fixture
async def books(ledger: LedgerClient, service: LedgerService) -> LedgerClient:
    # Transaction ids are the cluster's, shared by every test. Keep one workload from straddling a change in their
    # number of digits (999 -> 1000), which has its own test below, so each test here fails only for its tampering.
    boundary = 10 ** len(str(await next_transaction_id(ledger.conn)))
    if boundary - await next_transaction_id(ledger.conn) < 1_000:
        await burn_transaction_ids(ledger.conn, until=boundary + 1)
    await build_books(ledger, service)
    return ledger


async def next_transaction_id(conn: asyncpg.Connection[Any]) -> int:
    """The id the next writing transaction will get (read without taking one)."""
    return int(await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))


async def burn_transaction_ids(conn: asyncpg.Connection[Any], *, until: int) -> None:
    """Advance the cluster's transaction counter to about `until`: each writing subtransaction takes an id."""
    count = until - await next_transaction_id(conn) - 2
    if count > 0:
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS burned (i int);"
            f" DO $$ BEGIN FOR i IN 1..{count} LOOP"
            " BEGIN INSERT INTO burned VALUES (i); EXCEPTION WHEN OTHERS THEN NULL; END;"
            " END LOOP; END $$"
        )


# Reading the reconciliation --------------------------------------------------------------------------------------


async def reconcile(ledger: LedgerClient) -> dict[str, dict[str, Any]]:
    response = await ledger.get("/v1/reports/reconciliation", as_="auditor")
    assert response.status_code == 200, response.text
    report = response.json()
    checks = {check["name"]: check for check in report["checks"]}
    assert set(CHECKS) <= set(checks), checks.keys()
    assert report["ok"] is all(check["ok"] for check in checks.values())
    for check in checks.values():
        assert check["ok"] is (check["offenders"] == []), check
    return checks


def failing(checks: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, check in checks.items() if not check["ok"]}


def offenders(checks: dict[str, dict[str, Any]], name: str) -> list[str]:
    found: list[str] = checks[name]["offenders"]
    return found


async def assert_clean(ledger: LedgerClient) -> None:
    """The control: before any tampering, every check passes."""
    checks = await reconcile(ledger)
    assert failing(checks) == set(), [check for check in checks.values() if not check["ok"]]


# Tampering helpers -----------------------------------------------------------------------------------------------


@asynccontextmanager
async def behind_the_back(conn: asyncpg.Connection[Any]) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A transaction with every trigger off (append-only guards, the balance check, foreign keys): replica mode."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        yield conn


async def entry_id(conn: asyncpg.Connection[Any], request_id: str, kind: str) -> int:
    found = await conn.fetchval("SELECT id FROM entries WHERE request_id = $1 AND kind = $2", request_id, kind)
    assert found is not None, (request_id, kind)
    return int(found)


async def insert_entry(
    conn: asyncpg.Connection[Any], *, kind: str, reference: str, user_id: int | None, postings: list[Posting]
) -> int:
    """An entry written directly, with a correct content hash, as a forger who read the code would write it."""
    digest = content_hash(
        kind=kind,
        request_id=None,
        user_id=user_id,
        token_id=None,
        channel_id=None,
        reference=reference,
        reverses=None,
        details={},
        postings=postings,
    )
    new_id = await conn.fetchval(
        "INSERT INTO entries (kind, user_id, reference, details, hash) VALUES ($1, $2, $3, '{}', $4) RETURNING id",
        kind,
        user_id,
        reference,
        digest,
    )
    await conn.execute(  # one statement: the balance check runs once per statement that posts
        "INSERT INTO postings (entry_id, ledger, account, amount)"
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[])",
        new_id,
        [str(p.ledger) for p in postings],
        [p.account for p in postings],
        [p.amount for p in postings],
    )
    return int(new_id)


async def run_reconcile_cli(database_url: str) -> tuple[int, str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
    env["LEDGER_DATABASE_URL"] = database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger_service",
        "reconcile",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def line_of(table: str, check: str) -> str:
    lines = [line for line in table.splitlines() if line.split()[:1] == [check]]
    assert len(lines) == 1, table
    return lines[0]


# The untouched books ---------------------------------------------------------------------------------------------


async def test_untouched_books_reconcile_over_http_and_on_the_command_line(
    books: LedgerClient, database_url: str
) -> None:
    checks = await reconcile(books)
    assert failing(checks) == set(), [c for c in checks.values() if not c["ok"]]
    assert list(checks) == list(CHECKS)
    entries = await books.count("SELECT count(*) FROM entries")
    assert f"{entries} entries and 2 blocks verified" in checks["hash_chain_intact"]["detail"]

    code, stdout, stderr = await run_reconcile_cli(database_url)
    assert code == 0, stdout + stderr
    for name in CHECKS:
        assert line_of(stdout, name).split()[1] == "ok", stdout
    assert "FAILED" not in stdout
    assert stdout.strip().splitlines()[-1] == "the books reconcile"
    assert "... entries_balanced: summing every entry per ledger" in stderr
    assert f"... hash_chain_intact: {entries} entries checked" in stderr


async def test_sealing_across_a_transaction_id_with_one_more_digit_keeps_the_chain_intact(
    ledger: LedgerClient, service: LedgerService
) -> None:
    """Entries whose transaction ids straddle a power of ten (9998, 9999, 10000, ...) seal and verify like any."""
    audit = AuditService(service.engine, sweep_interval_seconds=5)
    await ledger.fund(1, 1_000)
    boundary = 10 ** len(str(await next_transaction_id(ledger.conn)))
    await burn_transaction_ids(ledger.conn, until=boundary - 3)
    assert await next_transaction_id(ledger.conn) < boundary
    for _ in range(20):
        if await ledger.count("SELECT count(*) FROM entries WHERE txid >= $1::text::xid8", str(boundary)) >= 2:
            break
        await ledger.fund(1, 1_000)
    assert await ledger.count("SELECT count(*) FROM entries WHERE txid < $1::text::xid8", str(boundary)) >= 2
    assert await audit.seal() > 0
    first = await ledger.conn.fetchrow(
        "SELECT first_txid::text AS first_txid, first_entry, last_txid::text AS last_txid, last_entry FROM blocks"
    )
    assert first is not None
    feed = await ledger.conn.fetch("SELECT e.txid::text AS txid, e.id FROM entries e ORDER BY e.txid, e.id")
    positions = [(int(row["txid"]), row["id"]) for row in feed]
    sealed = ((int(first["first_txid"]), first["first_entry"]), (int(first["last_txid"]), first["last_entry"]))
    assert sealed == (positions[0], positions[-1])  # the block spans the feed from its first entry to its last

    await ledger.fund(1, 1_000)
    assert await audit.seal() == 1  # the next block holds only the new entry: nothing is sealed twice
    checks = await reconcile(ledger)
    assert failing(checks) == set(), [check for check in checks.values() if not check["ok"]]


# The journal -----------------------------------------------------------------------------------------------------


async def test_a_changed_posting_amount_unbalances_its_entry_and_breaks_its_hash(books: LedgerClient) -> None:
    await assert_clean(books)
    settled = await entry_id(books.conn, B_SETTLED, "settle")
    async with books.conn.transaction():  # the other way around the guards: switch the table's triggers off
        await books.conn.execute("ALTER TABLE postings DISABLE TRIGGER USER")
        status = await books.conn.execute(
            "UPDATE postings SET amount = amount + 1 WHERE entry_id = $1 AND account = 'user:1' AND ledger = 'quota'",
            settled,
        )
        assert status == "UPDATE 1"
        await books.conn.execute("ALTER TABLE postings ENABLE TRIGGER USER")

    checks = await reconcile(books)
    assert failing(checks) == {"entries_balanced", "hash_chain_intact"}
    assert offenders(checks, "entries_balanced") == [f"entry {settled}: quota postings sum to 1"]
    assert offenders(checks, "hash_chain_intact") == [f"entry {settled}: its content does not match its hash"]


async def test_two_postings_changed_so_the_entry_still_balances_break_only_its_hash(books: LedgerClient) -> None:
    await assert_clean(books)
    topup = await books.conn.fetchval("SELECT id FROM entries WHERE reference = $1", B_TOPUP)
    async with behind_the_back(books.conn) as conn:
        await conn.execute(
            "UPDATE postings SET amount = amount - 5 WHERE entry_id = $1 AND account = 'system:issuance'", topup
        )
        await conn.execute("UPDATE postings SET amount = amount + 5 WHERE entry_id = $1 AND account = 'user:1'", topup)

    checks = await reconcile(books)
    assert failing(checks) == {"hash_chain_intact"}
    assert offenders(checks, "hash_chain_intact") == [f"entry {topup}: its content does not match its hash"]


async def test_changed_entry_details_break_its_hash(books: LedgerClient) -> None:
    await assert_clean(books)
    settled = await entry_id(books.conn, A_SETTLED, "settle")
    async with behind_the_back(books.conn) as conn:
        status = await conn.execute(
            "UPDATE entries SET details = jsonb_set(details, '{prompt_tokens}', '1') WHERE id = $1", settled
        )
        assert status == "UPDATE 1"

    checks = await reconcile(books)
    assert failing(checks) == {"hash_chain_intact"}
    assert offenders(checks, "hash_chain_intact") == [f"entry {settled}: its content does not match its hash"]


async def test_a_deleted_sealed_refund_breaks_its_block_its_hold_and_its_request(books: LedgerClient) -> None:
    await assert_clean(books)
    refunded = await entry_id(books.conn, B_REFUNDED, "refund")
    block = await books.conn.fetchrow(
        "SELECT id, entry_count FROM blocks WHERE $1 BETWEEN first_entry AND last_entry", refunded
    )
    assert block is not None
    async with behind_the_back(books.conn) as conn:  # foreign keys are off too: the postings go first, by hand
        assert await conn.execute("DELETE FROM postings WHERE entry_id = $1", refunded) == "DELETE 4"
        assert await conn.execute("DELETE FROM entries WHERE id = $1", refunded) == "DELETE 1"

    checks = await reconcile(books)
    assert failing(checks) == {"hash_chain_intact", "holds_cleared", "requests_match_entries"}
    count = block["entry_count"]
    assert offenders(checks, "hash_chain_intact") == [
        f"block {block['id']}: sealed {count} entries, {count - 1} are there now",
        f"block {block['id']}: its entries no longer hash to the sealed value",
    ]
    assert offenders(checks, "holds_cleared") == [
        f"hold {B_REFUNDED} (refunded, amount 9000): hold account holds 9000 quota and 9000 allowance"
    ]
    assert offenders(checks, "requests_match_entries") == [
        f"request {B_REFUNDED} is refunded, but has 0 refund/expire entries (amount 9000)"
    ]


async def test_an_unbalanced_entry_inserted_with_the_triggers_off_is_named(books: LedgerClient) -> None:
    await assert_clean(books)
    async with behind_the_back(books.conn) as conn:  # replica mode skips the deferred balance check as well
        forged = await insert_entry(
            conn,
            kind="adjustment",
            reference="free-money",
            user_id=1,
            postings=[Posting(SubLedger.QUOTA, "user:1", 1_000)],
        )

    checks = await reconcile(books)
    # Its hash is right (the forger computed it) and it is not sealed yet: only the balance rule catches it.
    assert failing(checks) == {"entries_balanced"}
    assert offenders(checks, "entries_balanced") == [f"entry {forged}: quota postings sum to 1000"]


async def test_a_channel_credited_without_a_charge_is_named(books: LedgerClient) -> None:
    await assert_clean(books)
    # Balanced and correctly hashed: the database's own guards accept it, no trigger needs switching off.
    await insert_entry(
        books.conn,
        kind="adjustment",
        reference="slush",
        user_id=None,
        postings=[Posting(SubLedger.QUOTA, "system:issuance", -100), Posting(SubLedger.QUOTA, "channel:7", 100)],
    )
    used = await books.count("SELECT sum(charged) FROM entries WHERE channel_id = 7 AND charged IS NOT NULL")

    checks = await reconcile(books)
    assert failing(checks) == {"summaries_match_entries"}
    assert offenders(checks, "summaries_match_entries") == [
        f"channel 7: used {used} by its charges, but its account holds {used + 100}"
    ]


# Snapshots -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (
            "UPDATE balance_snapshots SET balance = balance + 1 WHERE account = 'user:2' AND ledger = 'quota'",
            "balance snapshot user:2/quota: ",
        ),
        (
            "UPDATE balance_snapshots SET balance = balance - 1 WHERE account = 'token:11' AND ledger = 'allowance'",
            "balance snapshot token:11/allowance: ",
        ),
        ("UPDATE usage_snapshots SET used = used + 1 WHERE subject = 'channel:7'", "usage snapshot channel:7: "),
        (
            "UPDATE usage_snapshots SET request_count = request_count - 1 WHERE subject = 'token:31'",
            "usage snapshot token:31: ",
        ),
        (
            "UPDATE kind_snapshots SET balance = balance - 1 WHERE ledger = 'allowance' AND kind = 'token'",
            "kind snapshot allowance/token: ",
        ),
    ],
    ids=["balance-quota", "balance-allowance", "usage-used", "usage-count", "kind"],
)
async def test_a_broken_snapshot_is_named(books: LedgerClient, tamper: str, named: str) -> None:
    await assert_clean(books)
    assert await books.conn.execute(tamper) == "UPDATE 1"

    checks = await reconcile(books)
    assert failing(checks) == {"snapshots_match_entries"}
    found = offenders(checks, "snapshots_match_entries")
    assert len(found) == 1, found
    assert found[0].startswith(named), found


# Requests --------------------------------------------------------------------------------------------------------


async def test_a_settled_request_marked_refunded_disagrees_with_its_entries(books: LedgerClient) -> None:
    await assert_clean(books)
    async with behind_the_back(books.conn) as conn:
        status = await conn.execute("UPDATE requests SET status = 'refunded' WHERE request_id = $1", A_SETTLED)
        assert status == "UPDATE 1"

    checks = await reconcile(books)
    assert failing(checks) == {"requests_match_entries"}
    found = offenders(checks, "requests_match_entries")
    assert found == [
        f"request {A_SETTLED} is refunded with charge 750, its charge entries say 750 (1 entries)",
        f"request {A_SETTLED} is refunded, but has 0 refund/expire entries (amount 20000)",
    ]


async def test_a_settled_request_reopened_shows_an_empty_hold_and_wrong_held_amounts(books: LedgerClient) -> None:
    await assert_clean(books)
    async with behind_the_back(books.conn) as conn:
        status = await conn.execute("UPDATE requests SET status = 'open' WHERE request_id = $1", A_SETTLED)
        assert status == "UPDATE 1"

    checks = await reconcile(books)
    assert failing(checks) == {"holds_cleared", "requests_match_entries", "summaries_match_entries"}
    assert offenders(checks, "holds_cleared") == [
        f"hold {A_SETTLED} (open, amount 20000): hold account holds 0 quota and 0 allowance"
    ]
    assert offenders(checks, "requests_match_entries") == [
        f"request {A_SETTLED} is open with charge 750, its charge entries say 750 (1 entries)"
    ]
    assert sorted(offenders(checks, "summaries_match_entries")) == [
        "token 11: held 20000 by its open holds, its hold accounts hold 0",
        "user 1: held 20000 by its open holds, its hold accounts hold 0",
    ]


async def test_an_open_hold_far_past_its_expiry_is_overdue(books: LedgerClient) -> None:
    await assert_clean(books)
    await books.backdate(C_OPEN)  # a second past expiry: within the grace of two sweep intervals
    assert failing(await reconcile(books)) == set()

    async with behind_the_back(books.conn) as conn:
        await conn.execute("UPDATE requests SET expires_at = now() - interval '1 hour' WHERE request_id = $1", C_OPEN)

    checks = await reconcile(books)
    assert failing(checks) == {"no_overdue_holds"}
    found = offenders(checks, "no_overdue_holds")
    assert len(found) == 1, found
    assert found[0].startswith(f"hold {C_OPEN} expired at "), found
    assert found[0].endswith(" and is still open"), found


# Blocks ----------------------------------------------------------------------------------------------------------


async def test_a_changed_block_hash_is_named_with_the_broken_link_after_it(books: LedgerClient) -> None:
    await assert_clean(books)
    first, second = [row["id"] for row in await books.conn.fetch("SELECT id FROM blocks ORDER BY id")]
    async with behind_the_back(books.conn) as conn:
        status = await conn.execute(
            "UPDATE blocks SET hash = $1 WHERE id = $2", hashlib.sha256(b"rewritten history").digest(), first
        )
        assert status == "UPDATE 1"

    checks = await reconcile(books)
    assert failing(checks) == {"hash_chain_intact"}
    assert offenders(checks, "hash_chain_intact") == [
        f"block {first}: its entries no longer hash to the sealed value",
        f"block {second}: does not link to the block before it",
    ]


# The command line on tampered books ------------------------------------------------------------------------------


async def test_reconcile_on_the_command_line_fails_and_lists_the_offenders(
    books: LedgerClient, database_url: str
) -> None:
    await assert_clean(books)
    settled = await entry_id(books.conn, B_SETTLED, "settle")
    async with behind_the_back(books.conn) as conn:
        await conn.execute(
            "UPDATE postings SET amount = amount - 3 WHERE entry_id = $1 AND account = 'channel:7'", settled
        )

    code, stdout, stderr = await run_reconcile_cli(database_url)
    assert code == 1, stdout + stderr
    assert line_of(stdout, "entries_balanced").split()[1] == "FAILED", stdout
    assert line_of(stdout, "hash_chain_intact").split()[1] == "FAILED", stdout
    assert line_of(stdout, "summaries_match_entries").split()[1] == "FAILED", stdout
    for name in ("snapshots_match_entries", "holds_cleared", "no_overdue_holds", "requests_match_entries"):
        assert line_of(stdout, name).split()[1] == "ok", stdout
    assert f"- entry {settled}: quota postings sum to -3" in stdout
    assert f"- entry {settled}: its content does not match its hash" in stdout
    assert "- channel 7: used " in stdout
    assert stdout.strip().splitlines()[-1] == "3 of 8 checks FAILED"
    # Progress goes to stderr, keeping stdout the report alone.
    assert "... entries_balanced: summing every entry per ledger" in stderr
    assert "... entries_balanced: FAILED" in stderr
    assert "... hash_chain_intact: FAILED" in stderr
    assert "entries checked" in stderr
    assert "... " not in stdout
