"""Running the service as real processes, for tests that need more than one, or the real command line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

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
async def service_process(database_url: str | None, **settings: str) -> AsyncIterator[httpx.AsyncClient]:
    """A `ledger-service serve` process on a free port; stopped with SIGINT (a graceful shutdown) at the end."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
    env.update(
        {
            "LEDGER_PORT": str(port),
            "LEDGER_ADMIN_KEY": ADMIN_SECRET,
            **settings,
        }
    )
    if database_url is not None:
        env["LEDGER_DATABASE_URL"] = database_url
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
