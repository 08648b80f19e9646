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


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 60.0, every: float = 0.2) -> None:
    """Poll a condition until it holds; fail after `within` seconds. Waits for outcomes, never for time."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - the condition lives in another process
            await asyncio.sleep(every)


class ServiceProcess:
    """`python -m ledger_service serve` on a fixed port; can be killed outright and started again on that port."""

    def __init__(self, database_url: str | None, *, port: int = 0, settings: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
        env.update({"LEDGER_PORT": str(self.port), "LEDGER_ADMIN_KEY": ADMIN_SECRET, **(settings or {})})
        if database_url is not None:
            env["LEDGER_DATABASE_URL"] = database_url
        self.env = env
        # A file, not a pipe: a chatty child never blocks on a full pipe. Closed by close().
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait until it serves."""
        await self.launch()
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:

            async def healthy() -> bool:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise AssertionError(f"the service exited:\n{self.logged()}")
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(healthy)

    async def launch(self) -> None:
        """Start the process, and return at once."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ledger_service", "serve", env=self.env, stdout=self.log, stderr=self.log
        )

    async def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as in a crash or an OOM kill."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        """SIGINT: a graceful shutdown (and SIGKILL if it does not finish in 30 s)."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                await self.process.wait()
        except TimeoutError:
            await self.kill()

    def logged(self) -> str:
        self.log.seek(0)
        text = self.log.read()
        self.log.seek(0, os.SEEK_END)
        return text

    def close(self) -> None:
        self.log.close()


@asynccontextmanager
async def service_process(database_url: str | None, **settings: str) -> AsyncIterator[httpx.AsyncClient]:
    """A service process on a free port, with a client for it; stopped gracefully at the end."""
    service = ServiceProcess(database_url, settings=settings)
    try:
        await service.start()
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            yield client
    finally:
        await service.stop()
        service.close()
