"""What the ledger survives: a SIGKILL under load, and its database going away and coming back.

Both drive real service processes over HTTP with clients that behave like relays: every call is retried with the
same request_id and body until it gets a definite answer, so nothing is lost and nothing counts twice.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ledger_service.database import EmbeddedPostgres, migrate
from tests.processes import AUTH, ServiceProcess, eventually

RETRYABLE = {502, 503, 504}


async def until_answered(http: httpx.AsyncClient, method: str, path: str, body: Any) -> httpx.Response:
    """Send the call until it gets a definite answer: anything but a transport error or a retryable 5xx."""
    async with asyncio.timeout(120):
        while True:
            try:
                response = await http.request(method, path, json=body, headers=AUTH)
            except httpx.TransportError:
                await asyncio.sleep(0.05)  # the service is restarting: back off a little, as a relay would
                continue
            assert response.status_code != 500, response.text
            if response.status_code not in RETRYABLE:
                return response
            assert response.json()["code"] == "unavailable"
            assert "retry-after" in response.headers
            await asyncio.sleep(0.05)


async def relay(http: httpx.AsyncClient, client: int, requests: int, done: dict[str, str]) -> None:
    """One relay: holds then settles (90%), refunds (5%), or records a consumption (5%); remembers each answer."""
    rng = random.Random(client)
    for i in range(requests):
        request_id = f"c{client}-r{i}"
        roll = rng.random()
        if roll < 0.05:
            body = {"request_id": request_id, "user_id": client, "token_id": client, "channel_id": 1 + i % 3,
                    "model": "gpt-4o-mini", "prompt_tokens": 100, "completion_tokens": 50}  # fmt: skip
            response = await until_answered(http, "POST", "/v1/consumptions", body)
            assert response.status_code in (200, 201), response.text
            done[request_id] = "consumed"
            continue
        hold = {"request_id": request_id, "user_id": client, "token_id": client, "model": "gpt-4o",
                "prompt_tokens": 100, "max_tokens": 100}  # fmt: skip
        response = await until_answered(http, "POST", "/v1/holds", hold)
        assert response.status_code in (200, 201), response.text
        if roll < 0.10:
            response = await until_answered(http, "POST", f"/v1/holds/{request_id}/refund", {"reason": "upstream"})
            assert response.json()["status"] == "refunded", response.text
            done[request_id] = "refunded"
        else:
            settle = {"channel_id": 1 + i % 3, "prompt_tokens": 100, "completion_tokens": rng.randrange(200)}
            response = await until_answered(http, "POST", f"/v1/holds/{request_id}/settle", settle)
            assert response.json()["status"] == "settled", response.text
            done[request_id] = "settled"


async def check_books(conn: asyncpg.Connection[Any], done: dict[str, str]) -> None:
    rows = await conn.fetch("SELECT request_id, kind, status FROM requests")
    stored = {row["request_id"]: "consumed" if row["kind"] == "consumption" else row["status"] for row in rows}
    assert stored == done  # every acknowledged operation is there, in the state it was acknowledged in
    per_request = await conn.fetch(
        "SELECT request_id, kind, count(*) AS n FROM entries"
        " WHERE request_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1"
    )
    assert per_request == []  # nothing applied twice
    totals = await conn.fetch("SELECT ledger, sum(amount) AS total FROM postings GROUP BY ledger")
    assert {row["total"] for row in totals} <= {0}


async def funded(http: httpx.AsyncClient, clients: int) -> None:
    for client in range(1, clients + 1):
        topup = {"user_id": client, "amount": 10**9, "reference": f"fund-{client}"}
        assert (await until_answered(http, "POST", "/v1/topups", topup)).status_code in (200, 201)
        token = {"user_id": client, "unlimited": False, "remaining": 10**8}
        assert (await until_answered(http, "PUT", f"/v1/tokens/{client}", token)).status_code in (200, 201)


async def test_sigkill_under_load_loses_nothing_and_doubles_nothing(database_url: str) -> None:
    clients, per_client = 6, 40
    settings = {"LEDGER_TRUST_FACTOR": "0", "LEDGER_LOG_FORMAT": "text"}
    first = ServiceProcess(database_url, settings=settings)
    second = ServiceProcess(database_url, port=first.port, settings=settings)
    conn = await asyncpg.connect(database_url)
    try:
        await first.start()
        done: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
            await funded(http, clients)
            load = asyncio.gather(*(relay(http, c, per_client, done) for c in range(1, clients + 1)))

            async def some_work_done() -> bool:
                return len(done) >= clients * per_client // 4

            await eventually(some_work_done)
            await first.kill()  # mid-load: requests in flight, transactions open
            assert len(done) < clients * per_client
            await second.start()
            await load
            assert len(done) == clients * per_client
            await check_books(conn, done)
            report = (await http.get("/v1/reports/reconciliation", headers=AUTH)).json()
            assert report["ok"], report
    finally:
        await conn.close()
        await first.stop()
        await second.stop()
        first.close()
        second.close()


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A PostgreSQL server of this test's own, so that it can be stopped without disturbing the others."""
    server = await asyncio.to_thread(EmbeddedPostgres, tmp_path / "pgdata", delete_on_stop=True)
    try:
        await asyncio.to_thread(migrate, server.url())
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_database_outage_answers_503_and_recovers_by_itself(own_postgres: EmbeddedPostgres) -> None:
    url = own_postgres.url()
    service = ServiceProcess(url, settings={"LEDGER_TRUST_FACTOR": "0", "LEDGER_LOG_FORMAT": "text"})
    try:
        await service.start()
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
            await funded(http, 1)
            hold = {"request_id": "before", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 10}
            assert (await http.post("/v1/holds", json=hold, headers=AUTH)).status_code == 201

            # Requests in flight while the database goes down.
            in_flight = [
                http.post("/v1/holds", json={**hold, "request_id": f"during-{i}"}, headers=AUTH) for i in range(20)
            ]
            racing = asyncio.gather(*in_flight)
            await asyncio.to_thread(own_postgres.pause)
            for response in await racing:
                assert response.status_code in (201, 503), response.text

            # During the outage: a prompt 503 with Retry-After, for writes, reads and health; never a 500.
            for method, path, body in (
                ("POST", "/v1/holds", {**hold, "request_id": "outage"}),
                ("POST", "/v1/holds/before/settle", {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": 1}),
                ("GET", "/v1/users/1", None),
                ("GET", "/v1/reports/trial-balance", None),
            ):
                response = await http.request(method, path, json=body, headers=AUTH)  # bounded by the 30 s timeout
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "unavailable"
                assert int(response.headers["retry-after"]) > 0
            health = await http.get("/health")
            assert (health.status_code, health.json()["database"]) == (503, "unreachable")

            # The database comes back: the service recovers without a restart.
            await asyncio.to_thread(own_postgres.resume)

            async def serving_again() -> bool:
                response = await http.post("/v1/holds", json={**hold, "request_id": "after"}, headers=AUTH)
                return response.status_code in (200, 201)

            await eventually(serving_again)
            assert (await http.get("/health")).status_code == 200
            # Relays retry what failed; every hold ends up exactly once.
            for i in range(20):
                answer = await until_answered(http, "POST", "/v1/holds", {**hold, "request_id": f"during-{i}"})
                assert answer.status_code in (200, 201)
            report = (await http.get("/v1/reports/reconciliation", headers=AUTH)).json()
            assert report["ok"], report
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM requests") == 22  # before, 20 during, after
            assert await conn.fetchval("SELECT count(*) FROM entries WHERE kind = 'hold'") == 22
        finally:
            await conn.close()
        assert "unhandled error" not in service.logged()  # every failure was answered as a problem, none as a 500
    finally:
        await service.stop()
        service.close()
