"""The web console's page times on a journal of about 1,000,000 postings.

    .venv/bin/python -m tests.bench_console [--requests 200000] [--rounds 20]

Starts an embedded PostgreSQL in a temporary directory (or uses LEDGER_DATABASE_URL, which must name an empty,
migratable database), migrates it, and loads --requests settled requests spread over the last 30 days, one
transaction and one snapshot refresh (a history checkpoint, as the hourly ones in production) per day. Each
request is a hold and a settlement: 5 postings, so 200,000 requests are 1,000,000 postings. Half the requests are
user 1's (a hot account of 200,000 postings); all go through channel 1 (200,000 postings). Then it serves the app
with uvicorn on a loopback port, signs in to the console as an auditor, and times each page: the median and the
worst of --rounds requests, measured at the client on loopback (so an upper bound of the server's time), plus the
server's own time from the access log's duration_ms. Nothing is sealed, so the overview counts unsealed entries up
to its cap. Everything it made is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn

from ledger_service.api.app import create_app
from ledger_service.database import EmbeddedPostgres, migrate
from ledger_service.db.engine import create_engine
from ledger_service.services.housekeeping import refresh_snapshots
from ledger_service.settings import Settings
from tests.console_support import form_token

ADMIN = "bench-console-admin-secret"
DAYS = 30


def _day_sql(first: int, last: int, days_ago: int) -> list[str]:
    """The requests first..last, created `days_ago` days ago: request rows, hold and settle entries, postings."""
    when = f"now() - interval '{days_ago} days' + (g % 86000) * interval '1 second' - interval '23 hours'"
    user = "CASE WHEN g % 2 = 0 THEN 1 ELSE 2 + g % 99 END"
    return [
        f"""INSERT INTO requests (request_id, kind, status, user_id, token_id, token_limited, group_name, model,
                prompt_tokens, max_tokens, amount, trusted, model_ratio, completion_ratio, group_ratio, channel_id,
                settled_prompt_tokens, completion_tokens, charged, request_fingerprint, created_at, expires_at,
                resolved_at)
            SELECT 'b-' || g, 'hold', 'settled', {user}, 1, false, 'default', 'gpt-4o', 100, 200, 2000, false, 2.5,
                   4, 1, 1, 100, 50, 750, '\\x00'::bytea, {when}, {when} + interval '10 minutes', {when}
              FROM generate_series({first}, {last}) g""",
        f"""INSERT INTO entries (kind, request_id, user_id, token_id, channel_id, charged, details, hash, created_at)
            SELECT kind, 'b-' || g, {user}, 1, CASE WHEN kind = 'settle' THEN 1 END,
                   CASE WHEN kind = 'settle' THEN 750 END,
                   CASE WHEN kind = 'settle'
                        THEN '{{"model": "gpt-4o", "prompt_tokens": 100, "completion_tokens": 50}}'::jsonb
                        ELSE '{{"model": "gpt-4o"}}'::jsonb END,
                   decode(md5(g::text || kind) || md5(kind || g::text), 'hex'), {when}
              FROM generate_series({first}, {last}) g, (VALUES ('hold'), ('settle')) k(kind)""",
        """INSERT INTO postings (entry_id, ledger, account, amount)
            SELECT e.id, 'quota', p.account, p.amount
              FROM entries e
             CROSS JOIN LATERAL (VALUES
                   ('user:' || e.user_id, -2000, 'hold'), ('hold:' || e.request_id, 2000, 'hold'),
                   ('hold:' || e.request_id, -2000, 'settle'), ('channel:1', 750, 'settle'),
                   ('user:' || e.user_id, 1250, 'settle')) p(account, amount, kind)
             WHERE e.request_id BETWEEN 'b-' AND 'b-~' AND e.txid = pg_current_xact_id() AND p.kind = e.kind""",
    ]


async def load(url: str, requests: int, say: Any) -> None:
    engine = create_engine(url, pool_size=2)
    conn = await asyncpg.connect(url)
    try:
        per_day = requests // DAYS
        for day in range(DAYS):
            first, last = day * per_day + 1, (day + 1) * per_day
            async with conn.transaction():
                await conn.execute("SET LOCAL session_replication_role = replica")  # the bulk load skips triggers
                for statement in _day_sql(first, last, DAYS - 1 - day):
                    await conn.execute(statement)
            await refresh_snapshots(engine, checkpoint_every=0)  # each day a history checkpoint
            say(f"day {day + 1}/{DAYS}: requests {first:,}..{last:,}")
        await conn.execute("ANALYZE")
        postings = await conn.fetchval("SELECT count(*) FROM postings")
        say(f"{postings:,} postings, {await conn.fetchval('SELECT count(*) FROM entries'):,} entries")
    finally:
        await conn.close()
        await engine.dispose()


class Durations(logging.Handler):
    """The access log's server-side duration of each request, by route."""

    def __init__(self) -> None:
        super().__init__()
        self.by_route: dict[str, list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and "duration_ms" in fields:
            self.by_route.setdefault(str(fields["route"]), []).append(float(fields["duration_ms"]))


async def measure(url: str, rounds: int, say: Any) -> list[tuple[str, float, float, float]]:
    settings = Settings(database_url=url, admin_key=ADMIN, background_tasks=False)
    app = create_app(settings)
    durations = Durations()
    access = logging.getLogger("ledger_service.access")
    access.addHandler(durations)
    access.setLevel(logging.INFO)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    results = []
    try:
        while not server.started:
            if serving.done():
                serving.result()  # startup failed: raise its error here
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            created = await http.post(
                "/v1/api-keys",
                json={"name": "bench auditor", "role": "auditor"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            key = created.json()["key"]
            form = await http.get("/console/sign-in")
            signed = await http.post("/console/sign-in", data={"csrf_token": form_token(form.text), "api_key": key})
            assert signed.status_code == 303, signed.text
            recent = f"b-{await _last_request(url)}"
            statement_day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 10 * 86400))
            pages = [
                ("overview, first (usage chart computed)", "/console", 1),
                ("overview (usage chart cached)", "/console", rounds),
                ("overview, a minute later (past days kept, today read again)", "/console", rounds),
                ("request lookup, recent request of user:1", f"/console/requests?request_id={recent}", rounds),
                ("request lookup, oldest request", "/console/requests?request_id=b-2", rounds),
                ("statement user:1, first page", "/console/statement?address=user:1", rounds),
                (
                    "statement user:1, one day 10 days ago",
                    f"/console/statement?address=user:1&from={statement_day}&to={statement_day}",
                    rounds,
                ),
                (
                    "statement channel:1, last day",
                    f"/console/statement?address=channel:1&from={time.strftime('%Y-%m-%d', time.gmtime())}",
                    rounds,
                ),
                ("runs", "/console/runs", rounds),
                ("margin, this month", "/console/margin", rounds),
                ("margin, last month", f"/console/margin?month={_last_month()}", rounds),
            ]
            for name, path, count in pages:
                samples = []
                durations.by_route.clear()
                for _ in range(count):
                    if "a minute later" in name:
                        app.state.console._usage = None  # as when USAGE_CACHE_SECONDS have passed
                    started = time.perf_counter()
                    response = await http.get(path)
                    samples.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200, (path, response.status_code, response.text[:500])
                server_side = [d for values in durations.by_route.values() for d in values]
                results.append((name, statistics.median(samples), max(samples), statistics.median(server_side)))
                say(f"{name}: median {statistics.median(samples):.1f} ms, max {max(samples):.1f} ms (client);"
                    f" server {statistics.median(server_side):.1f} ms")  # fmt: skip
    finally:
        server.should_exit = True
        await serving
        sock.close()
        access.removeHandler(durations)
    return results


def _last_month() -> str:
    now = time.gmtime()
    return f"{now.tm_year - 1}-12" if now.tm_mon == 1 else f"{now.tm_year}-{now.tm_mon - 1:02d}"


async def _last_request(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT max(substr(request_id, 3)::bigint) FROM requests WHERE user_id = 1"))
    finally:
        await conn.close()


async def run(url: str, requests: int, rounds: int) -> None:
    def say(message: str) -> None:
        print(message, flush=True)

    started = time.perf_counter()
    await load(url, requests, say)
    say(f"loaded in {time.perf_counter() - started:.0f} s")
    results = await measure(url, rounds, say)
    print()
    print("| page | median (client) | max (client) | median (server, access log) |")
    print("|---|---:|---:|---:|")
    for name, median, worst, server in results:
        print(f"| {name} | {median:.1f} ms | {worst:.1f} ms | {server:.1f} ms |")
    print(json.dumps({name: round(server, 1) for name, _, _, server in results}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000, help="settled requests (5 postings each)")
    parser.add_argument("--rounds", type=int, default=20, help="requests per page")
    args = parser.parse_args()
    url = os.environ.get("LEDGER_DATABASE_URL")
    if url:
        migrate(url)
        asyncio.run(run(url, args.requests, args.rounds))
        return 0
    root = Path(tempfile.mkdtemp(prefix="ledger-bench-console-"))
    server = EmbeddedPostgres(root / "pgdata", delete_on_stop=True)
    try:
        server.psql("CREATE DATABASE bench;")
        migrate(server.url("bench"))
        asyncio.run(run(server.url("bench"), args.requests, args.rounds))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
