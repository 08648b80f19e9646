"""Real service processes (`python -m ledger_service serve`) sharing one database."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from tests.processes import AUTH, eventually, service_process


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
