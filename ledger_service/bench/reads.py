"""The reads scenario, last and on a database of its own: the latency of a balance read (GET /v1/users/{id}) for an
account with 1,000 postings and one with --read-postings (1,000,000 by default), from a service of its own."""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any

from ledger_service.bench.books import refresh_and_check
from ledger_service.bench.http import HttpConnection
from ledger_service.bench.options import Options
from ledger_service.bench.postgres import execute
from ledger_service.bench.report import summarize
from ledger_service.bench.service import Service


async def read_scenario(url: str, options: Options, say: Callable[[str], None]) -> dict[str, Any]:
    """Load the two accounts into the (migrated, empty) database at `url`, then time --runs rounds of reads."""
    say(f"loading 1,000 and {options.read_postings:,} postings into two accounts")
    await load_read_accounts(url, 1000, options.read_postings)
    await refresh_and_check(url, full_reconciliation=False, seal=False)  # as the background snapshotter would
    admin = secrets.token_urlsafe(24)
    service = Service(url, admin, 1, options.coalesce_groups)
    try:
        await service.ready(admin)
        # A little traffic after the snapshot, so that reads add a delta to it, as they do in production.
        http = HttpConnection("127.0.0.1", service.port, admin)
        for user in (1, 2):
            for i in range(50):
                body = {"user_id": user, "amount": 1, "reference": f"after-{user}-{i}"}
                assert (await http.request("POST", "/v1/topups", body))[0] == 201
        await http.close()
        small, large = [], []
        for _ in range(options.runs):
            small.append(await read_latency("127.0.0.1", service.port, admin, 1, 500))
            large.append(await read_latency("127.0.0.1", service.port, admin, 2, 500))
    finally:
        service.stop()
    ratio = [b / a for a, b in zip(small, large, strict=True)]
    say(f"balance read: {statistics.median(small) * 1000:.2f} ms at 1,000, {statistics.median(large) * 1000:.2f} ms"
        f" at {options.read_postings:,} postings")  # fmt: skip
    books = await refresh_and_check(url, full_reconciliation=False, seal=False)
    return {
        "latency_ms_1k": summarize([s * 1000 for s in small]),
        "latency_ms_large": summarize([s * 1000 for s in large]),
        "large_over_small": summarize(ratio),
        "books": books,
    }


async def load_read_accounts(url: str, small: int, large: int) -> None:
    """Two users, one with `small` postings and one with `large`, written directly (balanced by construction)."""
    await execute(
        url,
        "SET session_replication_role = replica",  # the bulk load skips the per-row triggers; every entry balances
        f"""INSERT INTO entries (kind, user_id, hash, reference)
            SELECT 'topup', CASE WHEN g <= {small} THEN 1 ELSE 2 END, decode(md5(g::text) || md5(g::text), 'hex'),
                   'bulk-' || g
              FROM generate_series(1, {small + large}) g""",  # noqa: S608 - two integers
        """INSERT INTO postings (entry_id, ledger, account, amount)
            SELECT id, 'quota', 'user:' || user_id, 1 FROM entries WHERE reference LIKE 'bulk-%'
            UNION ALL
            SELECT id, 'quota', 'system:issuance', -1 FROM entries WHERE reference LIKE 'bulk-%'""",
        "SET session_replication_role = origin",
    )


async def read_latency(host: str, port: int, token: str, user: int, reads: int) -> float:
    """Median seconds of a balance read (GET /v1/users/{id}), one at a time."""
    http = HttpConnection(host, port, token)
    samples = []
    try:
        for _ in range(reads):
            started = time.perf_counter()
            status, _ = await http.request("GET", f"/v1/users/{user}")
            samples.append(time.perf_counter() - started)
            assert status == 200, status
    finally:
        await http.close()
    return statistics.median(samples)
