"""The ledger service under the drill: `ledger-service serve` as a child process, pointed at every node of the
cluster; its migrations are applied once, by its own start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ledger_service.drill.processes import DrillError, spawn

SERVICE_SETTINGS = {
    "LEDGER_TRUST_FACTOR": "0",  # every hold really holds: each request writes a hold and a settlement
    "LEDGER_LOG_FORMAT": "json",
    "LEDGER_POOL_SIZE": "10",
}


class Service:
    def __init__(self, database_url: str, port: int, admin_key: str, directory: Path) -> None:
        self.database_url, self.port, self.admin_key, self.directory = database_url, port, admin_key, directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
        env.update(SERVICE_SETTINGS)
        env.update(LEDGER_DATABASE_URL=self.database_url, LEDGER_PORT=str(self.port), LEDGER_ADMIN_KEY=self.admin_key)
        self.directory.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "ledger_service", "serve"]
        self.process = spawn(argv, cwd=self.directory, log=self.directory / "service.log", env=env)

    async def ready(self, within: float = 90) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                try:
                    if (await http.get(f"{self.base_url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert self.process is not None
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.directory / "service.log").read_text(errors="replace")[-1500:]
                    raise DrillError(f"the service did not start; the end of its log:\n{tail}")
                await asyncio.sleep(0.3)

    async def fund(self, users: int) -> None:
        """Top up every user and give each an unlimited token numbered as the user."""
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30) as http:
            for user in range(1, users + 1):
                topup = {"user_id": user, "amount": 10**15, "reference": f"drill-fund-{user}"}
                answer = await http.post("/v1/topups", json=topup)
                if answer.status_code not in (200, 201):
                    raise DrillError(f"funding user {user}: {answer.status_code} {answer.text[:200]}")
                answer = await http.put(f"/v1/tokens/{user}", json={"user_id": user, "unlimited": True})
                if answer.status_code not in (200, 201):
                    raise DrillError(f"token of user {user}: {answer.status_code} {answer.text[:200]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
