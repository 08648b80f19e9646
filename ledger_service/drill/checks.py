"""The checks after a round, on the new primary: every write a client was told succeeded is in the journal exactly
once (retried ones included), nothing is there twice, every ledger sums to zero, `ledger-service reconcile` is
clean; and, once the old primary is back as a replica and caught up, that every node holds the same journal."""

from __future__ import annotations

import asyncio
import sys
import time
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from ledger_service.drill.clients import Records
from ledger_service.drill.patroni import Node

KIND = {"hold": "hold", "settle": "settle"}
"""The entry kind each acknowledged operation must have written exactly once."""


@dataclass(frozen=True)
class JournalCheck:
    acknowledged: int
    lost: list[str]
    """Acknowledged writes with no entry."""
    doubled: list[str]
    """Entries of one request and kind more than once (whoever asked for them)."""
    retried: int
    retried_ok: bool
    ledgers: dict[str, int]
    """Sum of postings per ledger: all zero when balanced."""

    @property
    def ok(self) -> bool:
        return not self.lost and not self.doubled and self.retried_ok and all(v == 0 for v in self.ledgers.values())


async def check_journal(url: str, records: Records, prefix: str) -> JournalCheck:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT request_id, kind, count(*) AS n FROM entries WHERE request_id LIKE $1 || '%'"
            " AND kind IN ('hold', 'settle') GROUP BY request_id, kind",
            prefix,
        )
        ledgers = await conn.fetch("SELECT ledger, sum(amount)::bigint AS total FROM postings GROUP BY ledger")
    finally:
        await conn.close()
    written = {(row["request_id"], row["kind"]): row["n"] for row in rows}
    lost = sorted(f"{op} {rid}" for rid, op in records.acknowledged if written.get((rid, KIND[op]), 0) == 0)
    doubled = sorted(f"{kind} {rid} x{n}" for (rid, kind), n in written.items() if n > 1)
    retried_ok = all(written.get((rid, KIND[op]), 0) == 1 for rid, op in records.retried)
    return JournalCheck(
        acknowledged=len(records.acknowledged),
        lost=lost,
        doubled=doubled,
        retried=len(records.retried),
        retried_ok=retried_ok,
        ledgers={row["ledger"]: int(row["total"]) for row in ledgers},
    )


async def reconcile(url: str, log_path: str) -> bool:
    """`ledger-service reconcile` against `url`: exit status 0 means every check of the books passed."""
    env = {"LEDGER_DATABASE_URL": url, "LEDGER_AUTO_MIGRATE": "false", "PATH": "/usr/bin:/bin"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger_service", "reconcile", env=env, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await process.communicate()
    Path(log_path).open("ab").write(output)  # noqa: ASYNC230, SIM115 - a small file, once per round
    return process.returncode == 0


async def journal_digest(url: str) -> tuple[int, str]:
    """Number of entries and an md5 of their ids and hashes, in id order."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(md5(string_agg(id::text || ':' || encode(hash, 'hex'), ',' ORDER BY id)),"
            " '') AS digest FROM entries"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), str(row["digest"])


async def caught_up(primary: Node, replicas: Sequence[Node], database: str, within: float = 120) -> bool:
    """Every replica has replayed the primary's WAL up to where it is now."""
    conn = await asyncpg.connect(primary.url(database), timeout=10)
    try:
        target = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    finally:
        await conn.close()
    deadline = time.monotonic() + within
    for replica in replicas:
        while True:
            try:
                conn = await asyncpg.connect(replica.url(database), timeout=5)
                try:
                    done = await conn.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target)
                finally:
                    await conn.close()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                done = False  # not accepting connections yet (starting, rewinding)
            if done:
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)
    return True


async def nodes_agree(primary: Node, replicas: Sequence[Node], database: str) -> tuple[bool, tuple[int, str]]:
    """Once caught up, every replica's journal is the primary's: same count, same digest."""
    if not await caught_up(primary, replicas, database):
        return False, (0, "")
    expected = await journal_digest(primary.url(database))
    for replica in replicas:
        if await journal_digest(replica.url(database)) != expected:
            return False, expected
    return True, expected
