"""The database itself enforces the ledger's invariants: each guard refuses a raw SQL write that breaks it.

These writes go around the service, as a superuser would, so they show what the schema guarantees on its own.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import pytest

Conn: TypeAlias = "asyncpg.Connection[Any]"
HASH = "decode(repeat('ab', 32), 'hex')"


async def new_entry(conn: Conn, kind: str = "topup", **columns: Any) -> int:
    names = ["kind", "hash", *columns]
    values = ["$1", HASH, *[f"${i}" for i in range(2, len(columns) + 2)]]
    entry_id: int = await conn.fetchval(
        f"INSERT INTO entries ({', '.join(names)}) VALUES ({', '.join(values)}) RETURNING id", kind, *columns.values()
    )
    return entry_id


async def post(conn: Conn, entry_id: int, ledger: str, account: str, amount: int) -> None:
    await conn.execute(
        "INSERT INTO postings (entry_id, ledger, account, amount) VALUES ($1, $2, $3, $4)",
        entry_id,
        ledger,
        account,
        amount,
    )


async def balanced_topup(conn: Conn, amount: int = 100, user: str = "user:1") -> int:
    async with conn.transaction():
        entry_id = await new_entry(conn, user_id=1)
        await conn.execute(
            "INSERT INTO postings (entry_id, ledger, account, amount)"
            " VALUES ($1, 'quota', 'system:issuance', $2), ($1, 'quota', $3, $4)",
            entry_id,
            -amount,
            user,
            amount,
        )
    return entry_id


async def test_a_balanced_entry_is_accepted(raw: Conn) -> None:
    entry_id = await balanced_topup(raw)
    assert await raw.fetchval("SELECT count(*) FROM postings WHERE entry_id = $1", entry_id) == 2


async def test_an_unbalanced_entry_is_refused(raw: Conn) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with raw.transaction():
            entry_id = await new_entry(raw)
            await post(raw, entry_id, "quota", "system:issuance", -100)
            await post(raw, entry_id, "quota", "user:1", 99)
    assert await raw.fetchval("SELECT count(*) FROM entries") == 0


async def test_balancing_across_ledgers_is_refused(raw: Conn) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with raw.transaction():
            entry_id = await new_entry(raw)
            await post(raw, entry_id, "quota", "user:1", 100)
            await post(raw, entry_id, "allowance", "token:1", -100)


async def test_a_posting_added_to_an_old_entry_is_refused(raw: Conn) -> None:
    entry_id = await balanced_topup(raw)
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with raw.transaction():
            await post(raw, entry_id, "quota", "user:2", 5)


async def test_postings_are_balanced_by_each_statement_that_posts(raw: Conn) -> None:
    """Every statement that posts leaves each entry it names balanced: an entry cannot be built up half-way."""
    entry_id = await new_entry(raw)
    with pytest.raises(asyncpg.CheckViolationError, match=f"entry {entry_id} does not balance"):
        await post(raw, entry_id, "quota", "system:issuance", -100)
    assert await raw.fetchval("SELECT count(*) FROM postings") == 0


async def test_a_posting_to_a_missing_entry_is_refused(raw: Conn) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="entry 424242, which does not exist"):
        await raw.execute(
            "INSERT INTO postings (entry_id, ledger, account, amount)"
            " VALUES (424242, 'quota', 'user:1', 5), (424242, 'quota', 'system:issuance', -5)"
        )


async def test_without_the_balance_trigger_the_same_write_would_go_through(raw: Conn) -> None:
    """The refusal above is the trigger's doing: disabled, the unbalanced entry is stored."""
    await raw.execute("ALTER TABLE postings DISABLE TRIGGER postings_balanced")
    async with raw.transaction():
        entry_id = await new_entry(raw)
        await post(raw, entry_id, "quota", "user:1", 99)
    assert await raw.fetchval("SELECT sum(amount) FROM postings") == 99


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE postings SET amount = amount + 1",
        "DELETE FROM postings",
        "TRUNCATE postings CASCADE",
        "UPDATE entries SET user_id = 2",
        "DELETE FROM entries",
        "TRUNCATE entries CASCADE",
    ],
)
async def test_history_cannot_be_changed(raw: Conn, statement: str) -> None:
    await balanced_topup(raw)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await raw.execute(statement)
    assert await raw.fetchval("SELECT count(*) FROM postings") == 2


async def test_a_reference_is_used_once(raw: Conn) -> None:
    await new_entry(raw, reference="ref-1")
    with pytest.raises(asyncpg.UniqueViolationError, match="entries_reference_key"):
        await new_entry(raw, reference="ref-1")


async def test_an_entry_is_reversed_at_most_once(raw: Conn) -> None:
    original = await balanced_topup(raw)
    await new_entry(raw, "reversal", reverses=original)
    with pytest.raises(asyncpg.UniqueViolationError, match="entries_reverses_key"):
        await new_entry(raw, "reversal", reverses=original)


@pytest.mark.parametrize(
    ("kinds", "index"),
    [
        (("settle", "settle"), "entries_one_charge_per_request"),
        (("settle", "consume"), "entries_one_charge_per_request"),
        (("expire", "expire"), "entries_one_release_per_request"),
        (("refund", "expire"), "entries_one_release_per_request"),
        (("hold", "hold"), "entries_one_hold_per_request"),
    ],
)
async def test_a_request_is_charged_and_released_at_most_once(raw: Conn, kinds: tuple[str, str], index: str) -> None:
    parties = {"request_id": "r-1", "user_id": 1, "token_id": 1, "channel_id": 1, "charged": 0}
    await new_entry(raw, kinds[0], **parties)
    with pytest.raises(asyncpg.UniqueViolationError, match=index):
        await new_entry(raw, kinds[1], **parties)


@pytest.mark.parametrize("amount", [0, 10**15 + 1, -(10**15) - 1])
async def test_amounts_out_of_range_are_refused(raw: Conn, amount: int) -> None:
    entry_id = await new_entry(raw)
    with pytest.raises(asyncpg.CheckViolationError, match="postings_amount_check"):
        await post(raw, entry_id, "quota", "user:1", amount)


@pytest.mark.parametrize(
    "account", ["user", "user:", "wallet:1", "user:1 2", "", ":1", "user:" + "a" * 129, "hold:" + "b" * 129, "usr:1"]
)
async def test_malformed_account_addresses_are_refused(raw: Conn, account: str) -> None:
    entry_id = await new_entry(raw)
    with pytest.raises(asyncpg.CheckViolationError, match="postings_account_check"):
        await post(raw, entry_id, "quota", account, 1)


@pytest.mark.parametrize("suffix", ["1", "a" * 128, "r-1:settle.2_x", "a:b:c"])
async def test_well_formed_account_addresses_up_to_128_characters_are_accepted(raw: Conn, suffix: str) -> None:
    async with raw.transaction():
        entry_id = await new_entry(raw)
        await raw.execute(
            "INSERT INTO postings (entry_id, ledger, account, amount)"
            " VALUES ($1, 'quota', $2, 1), ($1, 'quota', $3, -1)",
            entry_id,
            "hold:" + suffix,
            "channel:" + suffix,
        )


async def test_a_charge_entry_must_name_its_parties(raw: Conn) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="entries_charges_name_parties"):
        await new_entry(raw, "settle", request_id="r-1", user_id=1)


REQUEST = """
INSERT INTO requests (request_id, kind, status, user_id, token_id, token_limited, group_name, model, prompt_tokens,
                      max_tokens, amount, trusted, model_ratio, completion_ratio, group_ratio, request_fingerprint,
                      expires_at)
VALUES ('r-1', 'hold', 'open', 1, 1, false, 'default', 'gpt-4o', 10, 10, 100, false, 2.5, 4, 1, '\\x00',
        now() + interval '10 minutes')
"""


async def test_a_request_moves_only_forward(raw: Conn) -> None:
    await raw.execute(REQUEST)
    await raw.execute("UPDATE requests SET status = 'refunded' WHERE request_id = 'r-1'")
    with pytest.raises(asyncpg.CheckViolationError, match="not a lifecycle step"):
        await raw.execute("UPDATE requests SET status = 'open' WHERE request_id = 'r-1'")
    with pytest.raises(asyncpg.CheckViolationError, match="not a lifecycle step"):
        await raw.execute(
            "UPDATE requests SET status = 'settled', charged = 1, channel_id = 1 WHERE request_id = 'r-1'"
        )


async def test_what_a_request_is_about_never_changes(raw: Conn) -> None:
    await raw.execute(REQUEST)
    for change in ("amount = 1", "user_id = 2", "model_ratio = 0", "expires_at = now()"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="only its resolution may change"):
            await raw.execute(f"UPDATE requests SET {change} WHERE request_id = 'r-1'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never deleted"):
        await raw.execute("DELETE FROM requests")


async def test_a_settled_request_must_record_its_charge(raw: Conn) -> None:
    await raw.execute(REQUEST)
    with pytest.raises(asyncpg.CheckViolationError, match="requests_settled_has_charge"):
        await raw.execute("UPDATE requests SET status = 'settled' WHERE request_id = 'r-1'")


async def test_request_ids_are_unique_and_well_formed(raw: Conn) -> None:
    await raw.execute(REQUEST)
    with pytest.raises(asyncpg.UniqueViolationError, match="requests_pkey"):
        await raw.execute(REQUEST)
    for bad in ("bad id", "", "r" * 129, "r-1\n"):
        with pytest.raises(asyncpg.CheckViolationError, match="requests_request_id_check"):
            await raw.execute(REQUEST.replace("'r-1'", f"'{bad}'"))
    await raw.execute(REQUEST.replace("'r-1'", f"'{'r' * 128}'"))


async def test_a_token_never_changes_user(raw: Conn) -> None:
    await raw.execute("INSERT INTO tokens (token_id, user_id, unlimited) VALUES (1, 1, true)")
    await raw.execute("UPDATE tokens SET unlimited = false WHERE token_id = 1")
    with pytest.raises(asyncpg.CheckViolationError, match="never changes user"):
        await raw.execute("UPDATE tokens SET user_id = 2 WHERE token_id = 1")
