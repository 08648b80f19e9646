"""A 3-member etcd cluster on loopback (Debian's etcd 3.4: the v3 API, which Patroni's `etcd3` store speaks)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ledger_service.drill.processes import DrillError, RunAs, own_dir, spawn


@dataclass(frozen=True)
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path


class EtcdCluster:
    def __init__(self, etcd: Path, base: Path, ports: list[int], run_as: RunAs) -> None:
        self.etcd, self.base, self.run_as = etcd, base, run_as
        self.members = [
            EtcdMember(f"etcd{i + 1}", ports[2 * i], ports[2 * i + 1], base / f"etcd{i + 1}") for i in range(3)
        ]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def client_ports(self) -> list[int]:
        return [member.client_port for member in self.members]

    def start(self) -> None:
        cluster = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        for member in self.members:
            own_dir(member.data_dir, self.run_as)
            argv = [
                str(self.etcd), "--name", member.name, "--data-dir", str(member.data_dir / "data"),
                "--listen-client-urls", f"http://127.0.0.1:{member.client_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{member.client_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{member.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{member.peer_port}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", "ledger-drill",
            ]  # fmt: skip
            self.processes.append(
                spawn(self.run_as.command(argv), cwd=member.data_dir, log=self.base / f"{member.name}.log")
            )

    def stop(self) -> None:
        """SIGTERM to each member, SIGKILL after 5 s (the sweep ends whatever is left)."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()

    async def healthy(self, within: float = 60) -> None:
        """Every member answers /health with a leader elected."""
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                ok = 0
                for member in self.members:
                    try:
                        answer = await http.get(f"http://127.0.0.1:{member.client_port}/health")
                        ok += answer.status_code == 200 and answer.json().get("health") == "true"
                    except (httpx.HTTPError, ValueError):
                        pass
                if ok == len(self.members):
                    return
                if any(process.poll() is not None for process in self.processes) or time.monotonic() > deadline:
                    raise DrillError(f"etcd did not become healthy (logs in {self.base}/etcd*.log)")
                await asyncio.sleep(0.3)
