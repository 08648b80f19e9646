"""Connections of `ledger-service serve`: a client that sends nothing, or only part of a request, is closed after
LEDGER_READ_TIMEOUT_SECONDS; a client that hangs up mid-body is logged as 499, not counted as a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import AUTH, ServiceProcess, eventually

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def service(database_url: str) -> AsyncIterator[ServiceProcess]:
    process = ServiceProcess(
        database_url, settings={"LEDGER_READ_TIMEOUT_SECONDS": "1", "LEDGER_BACKGROUND_TASKS": "false"}
    )
    try:
        await process.start()
        yield process
    finally:
        await process.stop()
        process.close()


async def closed_by_server(service: ServiceProcess, sent: bytes) -> bool:
    """Connect, send `sent`, and wait (30 s at most, far above the 1 s timeout) for the server to close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        writer.write(sent)
        await writer.drain()
        async with asyncio.timeout(30):
            return await reader.read() == b""  # read() returns at EOF: the server closed without an answer
    except TimeoutError:
        return False
    finally:
        writer.close()


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half the headers"])
async def test_a_connection_that_sends_no_whole_request_is_closed(service: ServiceProcess, sent: bytes) -> None:
    assert await closed_by_server(service, sent)


async def errors_counted(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ledger_http_requests_error_total"
    )


async def test_a_client_that_hangs_up_mid_body_is_not_a_server_error(service: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        before = await errors_counted(client)
        _, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(
            b"POST /v1/topups HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
            + f"Authorization: {AUTH['Authorization']}\r\n\r\n".encode()
            + b'{"user_id"'
        )
        await writer.drain()
        writer.close()  # 10 bytes of the 1000 announced, then gone

        def topup_lines() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in service.logged().splitlines() if line.startswith("{")]
            return [line for line in lines if line.get("route") == "/v1/topups"]

        async def logged() -> bool:
            return bool(topup_lines())

        await eventually(logged, within=30)
        assert [line["status"] for line in topup_lines()] == [499]
        assert await errors_counted(client) == before
