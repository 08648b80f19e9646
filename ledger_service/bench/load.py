"""The relay workload: what a relay client asks of the ledger, one call per operation (hold then settle 90%, hold
then refund 5%, consumption 5%) or in batches of BATCH_SIZE, and the funded users and tokens it runs against."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

from ledger_service.bench.http import HttpConnection
from ledger_service.bench.measurement import Tally

BATCH_SIZE = 100


@dataclass(frozen=True)
class Workload:
    clients: int
    users: int
    channels: int
    duration: float


async def fund(host: str, port: int, token: str, users: int) -> None:
    """Top up every user of the workload and give each a token numbered as the user: odd users' tokens are
    limited (floor.postings_of relies on it), even users' are not."""
    http = HttpConnection(host, port, token)
    try:
        for user in range(1, users + 1):
            status, body = await http.request(
                "POST", "/v1/topups", {"user_id": user, "amount": 10**15, "reference": f"bench-fund-{user}"}
            )
            assert status in (200, 201), body
            token_body = {"user_id": user, "unlimited": user % 2 == 0, "remaining": None if user % 2 == 0 else 10**15}
            status, body = await http.request("PUT", f"/v1/tokens/{user}", token_body)
            assert status in (200, 201), body
    finally:
        await http.close()


class Relay:
    """One relay client: its own connection, request ids and random choices."""

    def __init__(self, connection: HttpConnection | None, number: int, workload: Workload, run: str) -> None:
        self.connection = connection
        self.number = number
        self.workload = workload
        self.rng = random.Random(f"{run}-{number}")
        self.prefix = f"{run}-c{number}-"
        self.counter = 0

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"

    def pick(self) -> tuple[int, int]:
        user = self.rng.randrange(1, self.workload.users + 1)
        return user, self.rng.randrange(1, self.workload.channels + 1)

    def hold_body(self, request_id: str, user: int) -> dict[str, Any]:
        return {"request_id": request_id, "user_id": user, "token_id": user, "model": "gpt-4o-mini",
                "prompt_tokens": self.rng.randrange(10, 2000), "max_tokens": 500}  # fmt: skip

    def consume_body(self, request_id: str, user: int, channel: int) -> dict[str, Any]:
        return {"request_id": request_id, "user_id": user, "token_id": user, "channel_id": channel,
                "model": "gpt-4o-mini", "prompt_tokens": 300, "completion_tokens": 200}  # fmt: skip

    def settle_body(self, channel: int) -> dict[str, Any]:
        return {"channel_id": channel, "prompt_tokens": 300, "completion_tokens": self.rng.randrange(0, 800)}

    @property
    def http(self) -> HttpConnection:
        if self.connection is None:
            raise RuntimeError("this relay plans in process (the direct scenario): it has no HTTP connection")
        return self.connection

    async def call(self, tally: Tally, method: str, path: str, body: Any, operations: int = 1) -> tuple[int, bytes]:
        started = time.perf_counter()
        status, payload = await self.http.request(method, path, body)
        tally.record(status, time.perf_counter() - started, operations)
        return status, payload

    async def single_operations(self, tally: Tally, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            request_id = self.next_id()
            user, channel = self.pick()
            roll = self.rng.random()
            if roll < 0.05:
                await self.call(tally, "POST", "/v1/consumptions", self.consume_body(request_id, user, channel))
                continue
            status, _ = await self.call(tally, "POST", "/v1/holds", self.hold_body(request_id, user))
            if status >= 300:
                continue
            if roll < 0.10:
                await self.call(tally, "POST", f"/v1/holds/{request_id}/refund", {"reason": "upstream failed"})
            else:
                await self.call(tally, "POST", f"/v1/holds/{request_id}/settle", self.settle_body(channel))

    def next_batch(self, pending: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """BATCH_SIZE operations: settle or refund the `pending` holds (of the previous batch), then open new holds
        and consumptions. `pending` is replaced by the holds this batch opens."""
        operations: list[dict[str, Any]] = []
        for request_id, channel in pending:
            if self.rng.random() < 0.05:
                operations.append({"op": "refund", "request_id": request_id, "body": {"reason": "upstream"}})
            else:
                operations.append({"op": "settle", "request_id": request_id, "body": self.settle_body(channel)})
        pending.clear()
        while len(operations) < BATCH_SIZE:
            request_id = self.next_id()
            user, channel = self.pick()
            if self.rng.random() < 0.05:
                body = self.consume_body(request_id, user, channel)
                operations.append({"op": "consume", "request_id": request_id, "body": body})
            else:
                operations.append({"op": "hold", "request_id": request_id, "body": self.hold_body(request_id, user)})
                pending.append((request_id, channel))
        return operations

    async def batched_operations(self, tally: Tally, stop_at: float) -> None:
        """Each batch resolves the holds of the previous one and opens new ones: BATCH_SIZE operations."""
        pending: list[tuple[str, int]] = []
        while time.perf_counter() < stop_at:
            operations = self.next_batch(pending)
            status, payload = await self.call(tally, "POST", "/v1/batch", {"operations": operations}, len(operations))
            if status == 200:
                failed = sum(1 for result in json.loads(payload)["results"] if result["status"] >= 300)
                tally.operations -= failed
                tally.errors += failed
