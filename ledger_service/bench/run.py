"""The benchmark from start to end, as `ledger-service bench` runs it (cli.py): set up the server, its databases
and the service under test; run the measured scenarios --runs times, pgbench after each run; check the books; run
the reads scenario; tear down; then print the summary and write --json (main_bench)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ledger_service.bench.books import refresh_and_check
from ledger_service.bench.cpu import cpu_ms_per_op, cpu_seconds, cpu_used, sample_service
from ledger_service.bench.direct import InProcessBatches
from ledger_service.bench.driver import drive
from ledger_service.bench.floor import FLOORS, FloorBatches
from ledger_service.bench.load import Workload, fund
from ledger_service.bench.measurement import Measurement
from ledger_service.bench.options import IN_PROCESS, MEASURED, Options
from ledger_service.bench.postgres import PGBENCH_CLIENTS, execute, pgbench, pgbench_init, url_for, url_parts
from ledger_service.bench.reads import read_scenario
from ledger_service.bench.report import books_ok, render, run_line, summarize_runs
from ledger_service.bench.service import Service
from ledger_service.database import EmbeddedPostgres, migrate

Say = Callable[[str], None]
"""Where progress goes (cli.py: stderr)."""


def main_bench(options: Options, json_path: str | None, say: Say) -> int:
    """Run the benchmark, print its summary, write --json; exit status 1 if the books do not balance or reconcile."""
    results = asyncio.run(run_benchmark(options, say))
    print(render(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return 0 if books_ok(results) else 1


async def run_benchmark(options: Options, say: Say) -> dict[str, Any]:
    """Every step of a benchmark, in order; the embedded server and the temporary folder go whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    server: EmbeddedPostgres | None = None
    try:
        server, server_url = await start_postgres(workdir, say)
        databases = await create_databases(server_url, say)
        results: dict[str, Any] = {"options": options.__dict__ | {"scenarios": list(options.scenarios)}}
        measured = await run_measured_scenarios(options, databases, say)
        if measured.profile is not None:
            results["profile"] = measured.profile
        results.update(summarize_runs(measured.runs, measured.tps))
        say("checking the books of the workload database")
        results["books"] = await refresh_and_check(databases.url(databases.ledger), full_reconciliation=True)
        if "reads" in options.scenarios:
            results["reads"] = await read_scenario(databases.url(databases.reads), options, say)
        return results
    finally:
        await stop_postgres(server, workdir)


# Set-up and tear-down ---------------------------------------------------------------------------------------------


async def start_postgres(workdir: Path, say: Say) -> tuple[EmbeddedPostgres | None, str]:
    """The server's URL: LEDGER_DATABASE_URL, or an embedded server's, started in `workdir` (and returned)."""
    url = os.environ.get("LEDGER_DATABASE_URL")
    if url:
        return None, url
    say(f"starting an embedded PostgreSQL in {workdir}")
    server = await asyncio.to_thread(EmbeddedPostgres, workdir / "pgdata", delete_on_stop=True)
    return server, server.url()


async def stop_postgres(server: EmbeddedPostgres | None, workdir: Path) -> None:
    if server is not None:
        await asyncio.to_thread(server.stop)
    shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class Databases:
    """The databases of one benchmark, created for it on the server (their names end in the same random suffix)."""

    server_url: str
    ledger: str
    """The workload's books: the service under test's database, which `direct` writes to as well."""
    reads: str
    pgbench: str
    floor: str
    """The floor scenarios' rows: never the workload's books."""

    def url(self, database: str) -> str:
        return url_for(self.server_url, database)


async def create_databases(server_url: str, say: Say) -> Databases:
    """Create the databases, migrate all but pgbench's, and initialise pgbench's."""
    suffix = secrets.token_hex(3)
    databases = Databases(
        server_url,
        ledger=f"bench_ledger_{suffix}",
        reads=f"bench_reads_{suffix}",
        pgbench=f"bench_tpcb_{suffix}",
        floor=f"bench_floor_{suffix}",
    )
    for database in (databases.ledger, databases.reads, databases.pgbench, databases.floor):
        await execute(server_url, f"CREATE DATABASE {database}")
    for database in (databases.ledger, databases.reads, databases.floor):
        await asyncio.to_thread(migrate, databases.url(database))
    say(f"initialising pgbench (scale {PGBENCH_CLIENTS})")
    await asyncio.to_thread(pgbench_init, url_parts(server_url), databases.pgbench)
    return databases


# The measured scenarios -------------------------------------------------------------------------------------------


async def run_measured_scenarios(options: Options, databases: Databases, say: Say) -> MeasuredScenarios:
    """Start the service under test on the workload's database, fund the workload's users, run every measured
    scenario --runs times, stop the service."""
    admin = secrets.token_urlsafe(24)
    service = Service(
        databases.url(databases.ledger), admin, options.workers, options.coalesce_groups, options.pool_size
    )
    try:
        await service.ready(admin)
        await fund("127.0.0.1", service.port, admin, options.users)
        measured = MeasuredScenarios(options, databases, service, admin, say)
        for run in range(options.runs):
            await measured.one_run(run)
        return measured
    finally:
        service.stop()


@dataclass
class MeasuredScenarios:
    """The measured scenarios against one service under test: their figures run by run, pgbench's tps after each
    run, and the service's profile if --profile asked for it."""

    options: Options
    databases: Databases
    service: Service
    admin: str
    say: Say
    runs: dict[str, list[Measurement]] = field(default_factory=lambda: {name: [] for name in MEASURED})
    tps: list[float] = field(default_factory=list)
    profile: dict[str, float] | None = None

    async def one_run(self, run: int) -> None:
        """One run: each chosen measured scenario in order, then pgbench."""
        for name in MEASURED:
            if name in self.options.scenarios:
                self.runs[name].append(await self.run_scenario(name, run))
        await execute(self.databases.server_url, "CHECKPOINT")
        parts = url_parts(self.databases.server_url)
        self.tps.append(await asyncio.to_thread(pgbench, parts, self.databases.pgbench, self.options.duration))
        self.say(f"run {run + 1}/{self.options.runs} pgbench TPC-B: {self.tps[-1]:.0f} tps")

    async def run_scenario(self, name: str, run: int) -> Measurement:
        """One run of one scenario: driven for --duration seconds between two CPU readings."""
        options = self.options
        channels = 1 if name == "hot" else options.channels
        workload = Workload(options.clients, options.users, channels, options.duration)
        # Every phase starts vacuumed and from a checkpoint, so none pays for the autovacuum or the writeback the
        # one before it left behind (pgbench's initialisation alone dirties hundreds of megabytes). pgbench vacuums
        # its own tables before it runs, for the same reason.
        database = self.databases.floor if name in FLOORS else self.databases.ledger
        await execute(self.databases.url(database), "VACUUM (ANALYZE)")
        await execute(self.databases.server_url, "CHECKPOINT")
        in_process = await self.open_in_process(name, workload.clients)
        try:
            label = f"r{run}-{name}"
            driving = (
                in_process.drive(workload, label)
                if in_process is not None
                else drive("127.0.0.1", self.service.port, self.admin, workload, label, name == "batch")
            )
            before = cpu_seconds(self.service.process.pid)
            sampled = bool(options.profile) and name == options.scenarios[0] and run == 0
            measured = await (self.profiled(driving) if sampled else driving)
            after = cpu_seconds(self.service.process.pid)
        finally:
            if in_process is not None:
                await in_process.close()
        operations = max(1.0, measured.ops_per_second * options.duration)
        cpu = cpu_ms_per_op(cpu_used(before, after), operations, IN_PROCESS.get(name))
        measured = replace(measured, cpu_ms_per_op=cpu)
        self.say(run_line(run, options.runs, name, measured))
        return measured

    async def open_in_process(self, name: str, clients: int) -> InProcessBatches | FloorBatches | None:
        """The driver of a scenario this process runs without the service (IN_PROCESS); None for the HTTP ones."""
        if name == "direct":
            return await InProcessBatches.open(self.databases.url(self.databases.ledger), clients)
        if name in FLOORS:
            return await FloorBatches.open(name, self.databases.url(self.databases.floor), clients)
        return None

    async def profiled(self, driving: Awaitable[Measurement]) -> Measurement:
        """`driving`, with py-spy sampling the service meanwhile (--profile)."""
        assert self.options.profile is not None
        sampled = sample_service(self.service.process.pid, self.options.duration - 1, self.options.profile)
        measured, self.profile = await asyncio.gather(driving, sampled)
        self.say(f"service CPU by library (py-spy): {self.profile}")
        return measured
