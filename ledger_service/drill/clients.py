"""Retrying relay clients, as a relay behaves during a failover: each holds then settles with a fresh request_id,
and retries the SAME request (same request_id, same body) after a connection error, a timeout or a 503 until it
gets an answer. They record every write they were told succeeded, every request they had to retry, and the time of
every attempt, from which the time to the first write after a kill is read."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRY_PAUSE = 0.2
"""Seconds between two attempts of a request (with up to as much again of jitter)."""
ATTEMPT_TIMEOUT = 20.0
GIVE_UP_AFTER = 180.0
"""A request still unanswered after this long is recorded as unexpected: the drill fails rather than hang."""


@dataclass
class Records:
    """What the clients saw, across the rounds."""

    acknowledged: set[tuple[str, str]] = field(default_factory=set)
    """(request_id, "hold" or "settle") the service answered with success."""
    retried: set[tuple[str, str]] = field(default_factory=set)
    replayed: set[tuple[str, str]] = field(default_factory=set)
    """Retried requests whose success answer was a replay: written before, the first answer lost."""
    started: set[str] = field(default_factory=set)
    retries: int = 0
    unexpected: list[str] = field(default_factory=list)
    attempts: list[tuple[float, float, bool]] = field(default_factory=list)
    """(sent, answered, success) of every attempt, time.monotonic()."""


class RelayClient:
    def __init__(self, base_url: str, token: str, number: int, users: int, prefix: str, records: Records) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=ATTEMPT_TIMEOUT
        )
        self.number, self.users, self.prefix, self.records = number, users, prefix, records
        self.rng = random.Random(f"{prefix}-{number}")
        self.counter = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Request after request until `stop`; the request under way is finished first."""
        try:
            while not stop.is_set():
                self.counter += 1
                request_id = f"{self.prefix}-c{self.number}-{self.counter}"
                user = self.rng.randrange(1, self.users + 1)
                self.records.started.add(request_id)
                hold = {"request_id": request_id, "user_id": user, "token_id": user, "model": "gpt-4o-mini",
                        "prompt_tokens": self.rng.randrange(10, 2000), "max_tokens": 500}  # fmt: skip
                if not await self.call(request_id, "hold", "/v1/holds", hold):
                    continue
                settle = {"channel_id": self.rng.randrange(1, 11), "prompt_tokens": 300,
                          "completion_tokens": self.rng.randrange(0, 800)}  # fmt: skip
                await self.call(request_id, "settle", f"/v1/holds/{request_id}/settle", settle)
        finally:
            await self.http.aclose()

    async def call(self, request_id: str, op: str, path: str, body: dict[str, Any]) -> bool:
        """True once the service says the write succeeded; False (recorded as unexpected) for any other answer."""
        first = time.monotonic()
        tries = 0
        while True:
            sent = time.monotonic()
            try:
                answer = await self.http.post(path, json=body)
                status = answer.status_code
            except httpx.TransportError as error:  # refused, reset, timed out, closed mid-answer
                status, answer_text, replay = 0, type(error).__name__, False
            else:
                answer_text, replay = answer.text[:200], bool(answer.headers.get("Idempotent-Replayed"))
            ended = time.monotonic()
            self.records.attempts.append((sent, ended, 200 <= status < 300))
            if 200 <= status < 300:
                self.records.acknowledged.add((request_id, op))
                if tries:
                    self.records.retried.add((request_id, op))
                    if replay:
                        self.records.replayed.add((request_id, op))
                return True
            if status not in (0, 503) or ended - first > GIVE_UP_AFTER:
                self.records.unexpected.append(f"{op} {request_id}: {status} {answer_text}")
                return False
            tries += 1
            self.records.retries += 1
            await asyncio.sleep(RETRY_PAUSE * (1 + self.rng.random()))


class Load:
    """`clients` relay clients running until stopped."""

    def __init__(self, base_url: str, token: str, clients: int, users: int, prefix: str, records: Records) -> None:
        self.stop_event = asyncio.Event()
        self.clients = [RelayClient(base_url, token, n, users, prefix, records) for n in range(clients)]
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(client.run(self.stop_event)) for client in self.clients]

    async def stop(self) -> None:
        """Let each client finish the request it is on (retrying until answered), then end."""
        self.stop_event.set()
        await asyncio.gather(*self.tasks)
