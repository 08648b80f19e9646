"""The service under test, with SERVICE_SETTINGS: `ledger-service serve` as a child process (Service), or its
objects built in this process (build_services, the one place the benchmark calls the service's constructors)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.bench.http import HttpConnection
from ledger_service.db.engine import create_engine
from ledger_service.db.lifecycle import SeenBalances, create_pool
from ledger_service.services.audit import AuditService
from ledger_service.services.batch import BatchService
from ledger_service.services.lifecycle import LifecycleService
from ledger_service.settings import Settings

if TYPE_CHECKING:
    from ledger_service.db.lifecycle import Pool

SERVICE_SETTINGS = {"LEDGER_TRUST_FACTOR": "0"}  # every hold really holds: the heavier, honest case
"""The settings the service under test runs with (and the `direct` scenario's planner), beyond the defaults."""


class Service:
    """`ledger-service serve` as a child process."""

    def __init__(
        self, database_url: str, admin_key: str, workers: int, coalesce_groups: int | None, pool_size: int | None = None
    ) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
        env.update(SERVICE_SETTINGS)
        env.update(
            LEDGER_DATABASE_URL=database_url,
            LEDGER_PORT=str(self.port),
            LEDGER_ADMIN_KEY=admin_key,
            LEDGER_WORKERS=str(workers),
            LEDGER_LOG_FORMAT="json",
        )
        if coalesce_groups is not None:
            env["LEDGER_COALESCE_GROUPS"] = str(coalesce_groups)
        if pool_size is not None:
            env["LEDGER_POOL_SIZE"] = str(pool_size)
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ledger_service", "serve"], env=env, stdout=self.log, stderr=self.log
        )

    async def ready(self, token: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                http = HttpConnection("127.0.0.1", self.port, token)
                status, _ = await http.request("GET", "/health")
                await http.close()
                if status == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"the service did not start:\n{self.log.read()[-4000:]}")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@dataclass(frozen=True)
class Services:
    """The service's objects in this process, on a lifecycle pool and an engine of their own."""

    batches: BatchService
    audit: AuditService
    pool: Pool
    engine: AsyncEngine

    async def close(self) -> None:
        await self.pool.close()
        await self.engine.dispose()


async def build_services(
    database_url: str, *, pool_size: int, engine_pool_size: int, command_timeout: float | None = 60
) -> Services:
    """The service's objects as `ledger-service serve` wires them (api/app.py), with SERVICE_SETTINGS: a lifecycle
    pool of up to `pool_size` connections and an engine of `engine_pool_size` whose statements may take up to
    `command_timeout` seconds."""
    settings = Settings.from_env(dict(SERVICE_SETTINGS, LEDGER_DATABASE_URL=database_url))
    seen = SeenBalances()
    pool = await create_pool(database_url, size=pool_size, on_connect=seen.forget)
    engine = create_engine(database_url, pool_size=engine_pool_size, command_timeout=command_timeout)
    audit = AuditService(
        engine,
        sweep_interval_seconds=settings.sweep_interval_seconds,
        snapshot_interval_seconds=settings.snapshot_interval_seconds,
    )
    return Services(BatchService(LifecycleService(pool, settings, seen)), audit, pool, engine)
