"""Peak memory of `compare-relay` against the number of logs in the window: a measurement, not a test.

    .venv/bin/python -m tests.measure_relay_compare_memory 1000 10000 100000 [--kind new-api|one-api]

For each size N it builds, in a fresh subprocess: a SQLite relay database with N consume logs (ten a second) and an
embedded PostgreSQL ledger with the N matching charges (written by SQL, not through the service: only the
comparison is measured), then runs the comparison (services/relay_compare.py, CSV output on) and prints the
Python heap's peak during it (tracemalloc), the process's peak RSS, the matcher's peak pending items and the time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from ledger_service.database import EmbeddedPostgres, migrate
from ledger_service.db.engine import create_engine
from ledger_service.domain.relays import RelayKind
from ledger_service.services.relay_compare import CompareOptions, compare_relay
from tests.relay_support import schema_ddl

T0 = 1_767_225_600
USERS = 100
RATE = 10
"""Logs per second."""


def build_relay(path: Path, kind: RelayKind, n: int) -> None:
    new = kind is RelayKind.NEW_API
    db = sqlite3.connect(path)
    for statement in schema_ddl(kind, "sqlite"):
        db.execute(statement)
    db.executemany(
        "INSERT INTO users (id, username, password, access_token, aff_code, quota) VALUES (?, ?, 'x', ?, ?, ?)",
        [(u, f"user{u}", f"{u:032d}", f"A{u:07d}", -1) for u in range(1, USERS + 1)],
    )
    db.executemany(
        'INSERT INTO tokens (id, user_id, "key", name, remain_quota, unlimited_quota) VALUES (?, ?, ?, ?, 0, 1)',
        [(u, u, f"{u:048d}", f"token-{u}") for u in range(1, USERS + 1)],
    )
    extra = "token_id" if new else "request_id"

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(1, n + 1):
            user = i % USERS + 1
            yield (i, user, T0 + i // RATE, 2, f"token-{user}", "gpt-4o-mini", i % 997 + 1, 100 + i % 50, 20,
                   i % 5 + 1, user if new else f"r{i}")  # fmt: skip

    db.executemany(
        "INSERT INTO logs (id, user_id, created_at, type, token_name, model_name, quota, prompt_tokens,"
        f" completion_tokens, channel_id, {extra}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows(),
    )
    db.commit()
    db.close()


LEDGER_SQL = """
INSERT INTO tokens (token_id, user_id, unlimited) SELECT u, u, true FROM generate_series(1, $2::int) u;
"""

CHARGES_SQL = """
WITH reqs AS (
    INSERT INTO requests (request_id, kind, status, user_id, token_id, token_limited, group_name, model,
                          prompt_tokens, max_tokens, amount, trusted, model_ratio, completion_ratio, group_ratio,
                          channel_id, settled_prompt_tokens, completion_tokens, charged, request_fingerprint,
                          resolved_at)
    SELECT 'r' || i, 'consumption', 'settled', i % $2 + 1, i % $2 + 1, false, 'default', 'gpt-4o-mini',
           100 + i % 50, 0, 0, false, 0.075, 4, 1, i % 5 + 1, 100 + i % 50, 20, i % 997 + 1,
           sha256(convert_to('r' || i, 'UTF8')), now()
      FROM generate_series($3::int, $4::int) i
    RETURNING request_id, user_id, token_id, channel_id, charged
), entry AS (
    INSERT INTO entries (kind, request_id, user_id, token_id, channel_id, charged, hash, created_at)
    SELECT 'consume', request_id, user_id, token_id, channel_id, charged, sha256(convert_to(request_id, 'UTF8')),
           to_timestamp($1::float8 + substr(request_id, 2)::int / $5::float8 + 0.3)
      FROM reqs
    RETURNING id, user_id, channel_id, charged
)
INSERT INTO postings (entry_id, ledger, account, amount)
SELECT id, 'quota', 'user:' || user_id, -charged FROM entry
UNION ALL
SELECT id, 'quota', 'channel:' || channel_id, charged FROM entry
"""


async def build_ledger(url: str, n: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(LEDGER_SQL.replace("$2::int", str(USERS)))
        for start in range(1, n + 1, 50_000):
            await conn.execute(CHARGES_SQL, T0, USERS, start, min(n, start + 49_999), RATE)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def measure(url: str, relay: Path, n: int, kind: RelayKind) -> dict[str, Any]:
    engine = create_engine(url, pool_size=2, command_timeout=None)
    since = datetime.fromtimestamp(T0, UTC)
    until = since + timedelta(seconds=n // RATE + 1)
    options = CompareOptions(since=since, until=until, csv_path=relay.with_suffix(".csv"))
    tracemalloc.start()
    started = time.perf_counter()
    report = await compare_relay(engine, f"sqlite:///{relay}", options)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await engine.dispose()
    assert report.tally.logs["matched"] == n, report.tally.as_dict()
    return {
        "logs": n,
        "kind": kind.value,
        "heap_peak_mib": round(peak / 2**20, 2),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_pending": report.peak_pending,
        "seconds": round(elapsed, 1),
    }


def one(n: int, kind: RelayKind) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="compare-memory-"))
    server = EmbeddedPostgres(root / "pg", delete_on_stop=True)
    try:
        server.psql("CREATE DATABASE ledger;")
        url = server.url("ledger")
        migrate(url)
        relay = root / "relay.db"
        build_relay(relay, kind, n)
        asyncio.run(build_ledger(url, n))
        return asyncio.run(measure(url, relay, n, kind))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="+", type=int)
    parser.add_argument("--kind", default="new-api", choices=[k.value for k in RelayKind])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.sizes[0], RelayKind(args.kind))))
        return
    for n in args.sizes:  # each size in a process of its own, so the RSS peak is that size's alone
        done = subprocess.run(
            [sys.executable, "-m", "tests.measure_relay_compare_memory", str(n), "--kind", args.kind, "--one"],
            capture_output=True,
            text=True,
            check=True,
        )
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
