"""The client loops of one measurement: --clients relays at once until --duration is up, either over HTTP against
the service under test (drive) or handing each batch to an in-process `apply` (drive_batches: the direct and
floor scenarios)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ledger_service.bench.http import HttpConnection
from ledger_service.bench.load import Relay, Workload
from ledger_service.bench.measurement import Measurement, Tally, measure


async def drive(host: str, port: int, token: str, workload: Workload, run: str, batched: bool) -> Measurement:
    relays = [Relay(HttpConnection(host, port, token), n, workload, run) for n in range(workload.clients)]
    tally = Tally()
    started = time.perf_counter()
    stop_at = started + workload.duration
    try:
        if batched:
            await asyncio.gather(*(relay.batched_operations(tally, stop_at) for relay in relays))
        else:
            await asyncio.gather(*(relay.single_operations(tally, stop_at) for relay in relays))
    finally:
        for relay in relays:
            await relay.http.close()
    return measure(tally, time.perf_counter() - started)


async def drive_batches(
    workload: Workload, run: str, apply: Callable[[list[dict[str, Any]]], Awaitable[int]]
) -> Measurement:
    """The in-process batch scenarios: each client hands its batches (Relay.next_batch) to `apply`, one after
    another, until the duration is up. `apply` returns how many operations of the batch were refused."""
    tally = Tally()

    async def client(relay: Relay, stop_at: float) -> None:
        pending: list[tuple[str, int]] = []
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            operations = relay.next_batch(pending)
            refused = await apply(operations)
            tally.record(200, time.perf_counter() - started, len(operations) - refused)
            tally.errors += refused

    relays = [Relay(None, n, workload, run) for n in range(workload.clients)]
    started = time.perf_counter()
    await asyncio.gather(*(client(relay, started + workload.duration) for relay in relays))
    return measure(tally, time.perf_counter() - started)
