"""A 3-node Patroni cluster of Debian's PostgreSQL 15 on loopback: each node's configuration, its processes (Patroni
and the postmaster it starts), and what Patroni's REST API says about the cluster.

The settings that decide what a 201 means and how fast a failover is (docs/operations.md, "The failover drill"):
`synchronous_mode` and `synchronous_mode_strict` with `synchronous_commit: on` (a commit is acknowledged once a
synchronous standby has flushed it, and with no standby left, commits wait rather than go on alone); `ttl`,
`loop_wait` and `retry_timeout` (how long a dead leader's key lives, how often each node looks, how long a node
keeps trying the store before it demotes itself); `use_pg_rewind` with `wal_log_hints` (an old primary comes back
as a replica without a new base backup)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ledger_service.drill.processes import DrillError, RunAs, own_dir, postmaster_pid, signal_quietly, spawn

SCOPE = "ledger-drill"
PASSWORD = "drill"  # noqa: S105 - loopback only, and every connection is trusted (pg_hba below)


def dcs(ttl: int, loop_wait: int, retry_timeout: int) -> dict[str, Any]:
    """Patroni's cluster-wide settings, written to the store once at bootstrap. Patroni wants
    loop_wait + 2 x retry_timeout <= ttl."""
    return {
        "ttl": ttl,
        "loop_wait": loop_wait,
        "retry_timeout": retry_timeout,
        "maximum_lag_on_failover": 16 * 1024 * 1024,
        "synchronous_mode": True,
        "synchronous_mode_strict": True,
        "postgresql": {
            "use_pg_rewind": True,
            "use_slots": True,
            "parameters": {
                "synchronous_commit": "on",
                "wal_log_hints": "on",
                "wal_level": "replica",
                "hot_standby": "on",
                "max_connections": 100,
                "max_wal_senders": 10,
                "max_replication_slots": 10,
                "wal_keep_size": "256MB",
                "shared_buffers": "64MB",
            },
        },
    }


@dataclass
class Node:
    name: str
    index: int
    pg_port: int
    rest_port: int
    proxy_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def url(self, database: str) -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.pg_port}/{database}"

    def config(self, pg_bin: Path, bootstrap_dcs: dict[str, Any]) -> dict[str, Any]:
        trust = ["local all all trust", "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]
        return {
            "scope": SCOPE,
            "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{self.rest_port}", "connect_address": f"127.0.0.1:{self.rest_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{self.proxy_port}"], "use_proxies": True, "protocol": "http"},
            "bootstrap": {"dcs": bootstrap_dcs, "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}]},
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(pg_bin),
                "pgpass": str(self.directory / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": PASSWORD},
                    "replication": {"username": "replicator", "password": PASSWORD},
                },
                "parameters": {"unix_socket_directories": str(self.directory)},
                "pg_hba": trust,
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }

    def start(self, patroni: Path, pg_bin: Path, run_as: RunAs, bootstrap_dcs: dict[str, Any]) -> None:
        own_dir(self.directory, run_as)
        config = self.directory / "patroni.yml"
        config.write_text(json.dumps(self.config(pg_bin, bootstrap_dcs), indent=2))  # JSON is YAML
        run_as.own(config)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.directory), "LC_ALL": "C.UTF-8"}
        argv = run_as.command([str(patroni), str(config)])
        self.process = spawn(argv, cwd=self.directory, log=self.directory / "patroni.log", env=env)

    def postmaster(self) -> int | None:
        return postmaster_pid(self.data_dir)

    def kill_postmaster(self) -> int:
        pid = self.postmaster()
        if pid is None:
            raise DrillError(f"{self.name}: no postmaster to kill")
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_patroni(self) -> None:
        """SIGKILL to Patroni and its postmaster at once: the machine is gone, as far as anyone can tell."""
        postmaster = self.postmaster()
        if self.process is not None:
            signal_quietly(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if postmaster is not None:
            signal_quietly(postmaster, signal.SIGKILL)


class Cluster:
    def __init__(self, base: Path, ports: Sequence[int], proxy_ports: Sequence[int]) -> None:
        self.nodes = [
            Node(f"pg{i + 1}", i, ports[2 * i], ports[2 * i + 1], proxy_ports[i], base / f"pg{i + 1}") for i in range(3)
        ]

    def multi_host_url(self, database: str) -> str:
        """The service's URL: every node, writes to whichever is the primary (asyncpg's target_session_attrs)."""
        hosts = ",".join(f"127.0.0.1:{node.pg_port}" for node in self.nodes)
        return f"postgresql://postgres:{PASSWORD}@{hosts}/{database}?target_session_attrs=read-write"

    def by_name(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    async def members(self, *, avoid: Sequence[Node] = ()) -> list[dict[str, Any]]:
        """The cluster as the store sees it, asked of a node's REST API (not one of `avoid`: a node cut off from the
        store only knows its last view). Empty when nobody answers."""
        async with httpx.AsyncClient(timeout=2) as http:
            for node in self.nodes:
                if node in avoid:
                    continue
                try:
                    answer = await http.get(f"http://127.0.0.1:{node.rest_port}/cluster")
                    members: list[dict[str, Any]] = answer.json().get("members", [])
                    return members
                except (httpx.HTTPError, ValueError):
                    continue
        return []

    async def wait_leader(
        self, *, other_than: str | None = None, avoid: Sequence[Node] = (), within: float = 90
    ) -> Node:
        """The running leader (one that is not `other_than`, when given)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for member in await self.members(avoid=avoid):
                running_leader = member.get("role") == "leader" and member.get("state") == "running"
                if running_leader and member["name"] != other_than:
                    return self.by_name(member["name"])
            await asyncio.sleep(0.5)
        raise DrillError(f"no running leader{f' other than {other_than}' if other_than else ''} after {within:.0f} s")

    async def wait_healthy(self, within: float = 120) -> tuple[Node, Node]:
        """Three running members: a leader, a synchronous standby, a replica. Returns the leader and the sync
        standby."""
        deadline = time.monotonic() + within
        members: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            members = await self.members()
            roles = {member["name"]: member.get("role") for member in members if member.get("state") == "running"}
            if len(roles) == 3 and "leader" in roles.values() and "sync_standby" in roles.values():
                leader = next(name for name, role in roles.items() if role == "leader")
                sync = next(name for name, role in roles.items() if role == "sync_standby")
                return self.by_name(leader), self.by_name(sync)
            await asyncio.sleep(0.5)
        raise DrillError(f"the cluster did not become healthy in {within:.0f} s: {members}")
