"""The floor scenarios, `bare` and `schema`: what the batches' rows cost PostgreSQL with nothing else in the way.
They write the rows the batch scenario writes for the same operations (a request row, created or moved, an entry
and its postings), one plain SQL statement per batch of 100, from a client that only puts the rows in arrays: no
HTTP, no planner, no read before the write, no premises, no JSON. The amounts follow a simple rule (each entry
still balances), not the prices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from ledger_service.bench.driver import drive_batches
from ledger_service.bench.load import Workload
from ledger_service.bench.measurement import Measurement
from ledger_service.domain.entries import (
    Posting,
    direct_charge_postings,
    hold_postings,
    release_postings,
    settle_postings,
)

if TYPE_CHECKING:
    from ledger_service.db.lifecycle import Pool

FLOORS = ("bare", "schema")
"""- `bare`: into minimal tables of their own (schema `floor`): primary keys and the index a balance read needs, no
  constraint or trigger. PostgreSQL's floor for a double-entry journal on this machine.
- `schema`: into the service's own tables (migrated, on a database of their own), with every index, constraint
  and trigger they have. The ceiling of the schema itself: what the lifecycle's work adds is the difference to
  the `direct` scenario.

Both run on a database of their own that starts empty, so their tables are smaller than the workload's, which
the single-call and batch scenarios have filled before them: if anything, the floors are flattered. The schema
floor's hashes and fingerprints are stand-ins, so that database is not reconciled (its entries still balance: the
postings trigger checks it)."""

BARE_TABLES = """
CREATE SCHEMA IF NOT EXISTS floor;
CREATE TABLE IF NOT EXISTS floor.requests (
    request_id text PRIMARY KEY, user_id bigint NOT NULL, status text NOT NULL, amount bigint NOT NULL,
    channel_id bigint, charged bigint);
CREATE TABLE IF NOT EXISTS floor.entries (id bigint PRIMARY KEY, kind text NOT NULL, request_id text NOT NULL);
CREATE TABLE IF NOT EXISTS floor.postings (
    entry_id bigint NOT NULL, ledger text NOT NULL, account text NOT NULL, amount bigint NOT NULL,
    PRIMARY KEY (entry_id, ledger, account));
CREATE INDEX IF NOT EXISTS postings_by_account ON floor.postings (account, ledger) INCLUDE (amount);
CREATE SEQUENCE IF NOT EXISTS floor.entry_ids;
"""

# $1-$5: one element per operation (kind, request_id, user_id, channel_id, amount: held for a hold, refund and
# settlement, charged for a consumption); $6: the charge of a settlement; $7-$10: the postings, each naming its
# operation by position (1-based). Every sub-statement sees the snapshot before the statement, so an operation may
# not move a request created in the same batch (the benchmark's batches settle the previous batch's holds).
_OPERATIONS = """
WITH ops AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
           WITH ORDINALITY AS o(kind, request_id, user_id, channel_id, amount, charge, position)
), planned AS (
    SELECT nextval({sequence}) AS id, ops.* FROM ops
)"""

_POSTINGS = """
SELECT planned.id, p.ledger, p.account, p.amount
  FROM unnest($7::bigint[], $8::text[], $9::text[], $10::bigint[]) AS p(position, ledger, account, amount)
  JOIN planned USING (position)"""

BARE_APPLY = (
    _OPERATIONS.format(sequence="'floor.entry_ids'")  # noqa: S608 - constants only
    + """, created AS (
    INSERT INTO floor.requests (request_id, user_id, status, amount, channel_id, charged)
    SELECT request_id, user_id, CASE kind WHEN 'hold' THEN 'open' ELSE 'settled' END, amount,
           CASE kind WHEN 'consume' THEN channel_id END, CASE kind WHEN 'consume' THEN amount END
      FROM ops WHERE kind IN ('hold', 'consume')
), moved AS (
    UPDATE floor.requests r
       SET status = CASE o.kind WHEN 'settle' THEN 'settled' ELSE 'refunded' END,
           channel_id = CASE o.kind WHEN 'settle' THEN o.channel_id END,
           charged = CASE o.kind WHEN 'settle' THEN o.charge END
      FROM ops o WHERE o.kind IN ('settle', 'refund') AND r.request_id = o.request_id
), posted AS (
    INSERT INTO floor.entries (id, kind, request_id) SELECT id, kind, request_id FROM planned
)
INSERT INTO floor.postings (entry_id, ledger, account, amount)"""
    + _POSTINGS
)

# The service's tables, every NOT NULL column filled. Hashes and fingerprints are SHA-256 stand-ins computed
# here, the details a document of the size the planner writes.
SCHEMA_APPLY = (
    _OPERATIONS.format(sequence="'entries_id_seq'::regclass")  # noqa: S608 - constants only
    + """, created AS (
    INSERT INTO requests (request_id, kind, status, user_id, token_id, token_limited, group_name, model,
                          prompt_tokens, max_tokens, amount, trusted, model_ratio, completion_ratio, group_ratio,
                          channel_id, settled_prompt_tokens, completion_tokens, charged, request_fingerprint,
                          expires_at, resolved_at)
    SELECT request_id, CASE kind WHEN 'hold' THEN 'hold' ELSE 'consumption' END,
           CASE kind WHEN 'hold' THEN 'open' ELSE 'settled' END, user_id, user_id, user_id % 2 = 1, 'default',
           'gpt-4o-mini', 300, 500, amount, false, 0.075, 4, 1,
           CASE kind WHEN 'consume' THEN channel_id END, CASE kind WHEN 'consume' THEN 300 END,
           CASE kind WHEN 'consume' THEN 200 END, CASE kind WHEN 'consume' THEN amount END,
           sha256(convert_to(request_id, 'UTF8')),
           CASE kind WHEN 'hold' THEN now() + interval '10 minutes' END, CASE kind WHEN 'consume' THEN now() END
      FROM ops WHERE kind IN ('hold', 'consume')
), moved AS (
    UPDATE requests r
       SET status = CASE o.kind WHEN 'settle' THEN 'settled' ELSE 'refunded' END,
           channel_id = CASE o.kind WHEN 'settle' THEN o.channel_id END,
           settled_prompt_tokens = CASE o.kind WHEN 'settle' THEN 300 END,
           completion_tokens = CASE o.kind WHEN 'settle' THEN 200 END,
           charged = CASE o.kind WHEN 'settle' THEN o.charge END,
           settle_fingerprint = CASE o.kind WHEN 'settle' THEN sha256(convert_to(o.request_id, 'UTF8')) END,
           refund_fingerprint = CASE o.kind WHEN 'refund' THEN sha256(convert_to(o.request_id, 'UTF8')) END,
           resolved_at = now()
      FROM ops o WHERE o.kind IN ('settle', 'refund') AND r.request_id = o.request_id
), posted AS (
    INSERT INTO entries (id, kind, request_id, user_id, token_id, channel_id, charged, details, hash)
    OVERRIDING SYSTEM VALUE
    SELECT id, kind, request_id, user_id, user_id,
           CASE WHEN kind IN ('settle', 'consume') THEN channel_id END,
           CASE kind WHEN 'settle' THEN charge WHEN 'consume' THEN amount END,
           jsonb_build_object('model', 'gpt-4o-mini', 'group', 'default', 'model_ratio', '0.075',
                              'completion_ratio', '4', 'group_ratio', '1', 'model_price', null,
                              'prompt_tokens', 300, 'completion_tokens', 200),
           sha256(convert_to(request_id || kind, 'UTF8'))
      FROM planned
)
INSERT INTO postings (entry_id, ledger, account, amount)"""
    + _POSTINGS
)

APPLY = {"bare": BARE_APPLY, "schema": SCHEMA_APPLY}


def postings_of(kind: str, request_id: str, user: int, channel: int, held: int, charge: int) -> tuple[Posting, ...]:
    """The postings the service writes for this operation: domain/entries.py's own rules. The benchmark's tokens
    are numbered as their users, and odd users' tokens are limited (as it funds them), so their operations also
    post to the allowance."""
    limited = user % 2 == 1
    if kind == "hold":
        return hold_postings(request_id=request_id, user_id=user, token_id=user, amount=held, limited=limited)
    if kind == "settle":
        return settle_postings(
            request_id=request_id, user_id=user, token_id=user, channel_id=channel, held=held, charge=charge,
            limited=limited,
        )  # fmt: skip
    if kind == "refund":
        return release_postings(request_id=request_id, user_id=user, token_id=user, held=held, limited=limited)
    return direct_charge_postings(user_id=user, token_id=user, channel_id=channel, charge=charge, limited=limited)


class FloorBatches:
    """Drives one floor scenario: each client's batches (Relay.next_batch) as rows, one statement per batch."""

    def __init__(self, statement: str, pool: Pool) -> None:
        self.statement, self.pool = statement, pool

    @classmethod
    async def open(cls, floor: str, database_url: str, clients: int) -> FloorBatches:
        """`floor` is one of FLOORS; `database_url` names a migrated database the workload does not use (the bare
        tables are made here)."""
        statement = APPLY[floor]
        if floor == "bare":
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(BARE_TABLES)
            finally:
                await conn.close()
        pool: Pool = await asyncpg.create_pool(database_url, min_size=clients, max_size=clients)
        return cls(statement, pool)

    async def close(self) -> None:
        await self.pool.close()

    async def drive(self, workload: Workload, run: str) -> Measurement:
        holds: dict[str, tuple[int, int]] = {}  # request_id -> (user, held); request ids are each client's own

        async def apply(operations: list[dict[str, Any]]) -> int:
            arrays = self.rows(operations, holds)
            async with self.pool.acquire() as conn:
                await conn.execute(self.statement, *arrays)
            return 0  # the statement writes every row or fails

        return await drive_batches(workload, run, apply)

    @staticmethod
    def rows(operations: list[dict[str, Any]], holds: dict[str, tuple[int, int]]) -> list[list[Any]]:
        """The statement's ten arrays for one batch. A hold holds 2,000 plus its prompt tokens; a settlement
        charges 300 plus its completion tokens (always less); a consumption charges 500."""
        columns: list[list[Any]] = [[] for _ in range(10)]
        for position, operation in enumerate(operations, start=1):
            kind, request_id, body = operation["op"], operation["request_id"], operation["body"]
            charge = 0
            if kind == "hold":
                user, held = body["user_id"], 2000 + body["prompt_tokens"]
                holds[request_id] = (user, held)
                channel, amount = None, held
            elif kind == "consume":
                user, channel, amount = body["user_id"], body["channel_id"], 500
            else:
                user, held = holds.pop(request_id)
                channel, amount = body.get("channel_id"), held
                charge = 300 + body["completion_tokens"] if kind == "settle" else 0
            for column, value in zip(columns[:6], (kind, request_id, user, channel, amount, charge), strict=True):
                column.append(value)
            charged = amount if kind == "consume" else charge
            for posting in postings_of(kind, request_id, user, channel or 0, amount, charged):
                for column, value in zip(columns[6:], (position, *posting), strict=True):
                    column.append(value)
        return columns
