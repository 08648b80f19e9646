"""Real service processes (`python -m ledger_service serve`) sharing one database."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import httpx

from tests.support import ADMIN_SECRET

AUTH = {"Authorization": f"Bearer {ADMIN_SECRET}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 60.0) -> None:
    """Poll a condition until it holds; fail after `within` seconds. Waits for outcomes, never for time."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - the condition lives in another process
            await asyncio.sleep(0.2)


@asynccontextmanager
async def service_process(database_url: str, **settings: str) -> AsyncIterator[httpx.AsyncClient]:
    """A `ledger-service serve` process on a free port; stopped with SIGINT (a graceful shutdown) at the end."""
    port = free_port()
    env = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_PORT": str(port),
        "LEDGER_ADMIN_KEY": ADMIN_SECRET,
        **settings,
    }
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks on a full pipe
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ledger_service", "serve", env=env, stdout=log, stderr=log
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

                async def healthy() -> bool:
                    if process.returncode is not None:
                        log.seek(0)
                        raise AssertionError(f"the service exited:\n{log.read()}")
                    try:
                        return (await client.get("/health")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(healthy)
                yield client
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_two_processes_expire_every_hold_exactly_once(database_url: str) -> None:
    # Trust rule off: every hold really holds, so every expiry posts an entry to count.
    fast = {"LEDGER_SWEEP_INTERVAL_SECONDS": "1", "LEDGER_SNAPSHOT_INTERVAL_SECONDS": "1", "LEDGER_TRUST_FACTOR": "0"}
    conn = await asyncpg.connect(database_url)
    try:
        async with service_process(database_url, **fast) as one, service_process(database_url, **fast) as two:
            topup = {"user_id": 1, "amount": 10_000_000, "reference": "fund"}
            assert (await one.post("/v1/topups", json=topup, headers=AUTH)).status_code == 201
            token = {"user_id": 1, "unlimited": False, "remaining": 5_000_000}
            assert (await two.put("/v1/tokens/1", json=token, headers=AUTH)).status_code == 201

            async def hold(client: httpx.AsyncClient, i: int) -> None:
                body = {"request_id": f"x{i}", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 10,
                        "amount": 1000 + i, "expires_in": 1}  # fmt: skip
                response = await client.post("/v1/holds", json=body, headers=AUTH)
                assert response.status_code == 201, response.text

            await asyncio.gather(*(hold(one if i % 2 else two, i) for i in range(120)))

            async def all_expired() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM requests WHERE status = 'open'") == 0)

            await eventually(all_expired)

            expiries = await conn.fetch(
                "SELECT request_id, count(*) AS n FROM entries WHERE kind = 'expire' GROUP BY request_id"
            )
            assert len(expiries) == 120
            assert {row["n"] for row in expiries} == {1}
            user = (await one.get("/v1/users/1", headers=AUTH)).json()
            assert (user["available"], user["held"]) == (10_000_000, 0)
            tokens = (await two.get("/v1/tokens/1", headers=AUTH)).json()
            assert (tokens["remaining"], tokens["held"]) == (5_000_000, 0)
            totals = await conn.fetch("SELECT ledger, sum(amount) AS total FROM postings GROUP BY ledger")
            assert {row["total"] for row in totals} == {0}
            # Both processes' snapshotters ran too, without counting anything twice.
            assert await conn.fetchval("SELECT count(*) FROM snapshot_runs") > 0
            mismatched = await conn.fetchval(
                """SELECT count(*) FROM balance_snapshots s
                    WHERE s.balance <> (SELECT coalesce(sum(amount), 0) FROM postings p
                                         WHERE p.account = s.account AND p.ledger = s.ledger AND p.txid < s.horizon)"""
            )
            assert mismatched == 0
    finally:
        await conn.close()
