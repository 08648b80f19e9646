"""The failover drill's own parts that need no cluster: how the time to the first write is read from the clients'
attempts, and the relay that cuts a node off from etcd (a black hole, lifted again). The drill itself is
`make ha-drill` (docs/operations.md, "The failover drill")."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ledger_service.drill.clients import Records
from ledger_service.drill.processes import free_ports
from ledger_service.drill.proxy import CuttableProxy, Proxies
from ledger_service.drill.rounds import timing


def test_time_to_first_write_counts_from_the_strike_to_a_success_sent_after_the_first_failure() -> None:
    records = Records()
    struck = 100.0
    records.attempts = [
        (99.0, 99.5, True),  # before the strike: not counted
        (100.1, 100.2, True),  # after the strike, before any failure (an isolated primary still writing)
        (100.3, 103.0, False),  # the outage begins
        (102.0, 104.0, True),  # sent before the first failure ended: a write that was under way, not the first
        (103.5, 112.5, True),  # the first write
        (104.0, 113.0, True),
    ]
    found = timing(records, struck)
    assert found is not None
    assert found.first_failure == pytest.approx(3.0)
    assert found.first_write == pytest.approx(12.5)
    assert found.acknowledged_before_outage == 1


def test_no_first_write_until_one_succeeds_after_a_failure() -> None:
    records = Records()
    records.attempts = [(10.0, 10.1, True), (10.2, 10.3, False)]
    assert timing(records, 10.0) is None
    found = timing(Records(attempts=[(10.0, 10.1, True)]), 10.0, require_failure=False)
    assert found is not None
    assert found.first_failure is None


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _round_trip(port: int, payload: bytes, wait: float) -> bytes | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(1024), wait)
        except TimeoutError:
            return None
    finally:
        writer.close()


async def test_a_cut_relay_is_a_black_hole_until_the_cut_is_lifted() -> None:
    upstream_port, listen_port = free_ports(2)
    upstream = await asyncio.start_server(_echo, "127.0.0.1", upstream_port)
    proxies = Proxies([CuttableProxy(listen_port, [upstream_port])])
    proxies.start()
    try:
        assert await _round_trip(listen_port, b"ping", 2) == b"ping"
        proxies.set_cut(0, True)  # returns once the cut is in place
        # Accepted, but nothing comes back: a request times out, as across a dead link.
        assert await _round_trip(listen_port, b"ping", 0.5) is None
        proxies.set_cut(0, False)
        assert await _round_trip(listen_port, b"pong", 2) == b"pong"
    finally:
        proxies.stop()
        upstream.close()
        await upstream.wait_closed()
