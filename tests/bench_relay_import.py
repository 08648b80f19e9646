"""The import benchmark: a one-api SQLite database of N users and N tokens, imported by the command, timed.

    .venv/bin/python -m tests.bench_relay_import --users 100000

It builds the relay database, starts an embedded PostgreSQL in a temporary directory (or uses
LEDGER_DATABASE_URL), migrates it, then runs `ledger-service import-relay` twice as an operator would: the first
run posts everything, the second finds nothing moved. Prints both wall-clock times and the peak memory of each
run. Everything it made is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ledger_service.database import EmbeddedPostgres, migrate
from ledger_service.domain.relays import RelayKind, RelayToken, RelayUser
from tests.relay_support import build_relay_db


async def build_source(directory: Path, users: int) -> str:
    db = await build_relay_db(RelayKind.ONE_API, "sqlite", directory=directory)
    rng = random.Random(15)
    chunk = 10_000
    for start in range(1, users + 1, chunk):
        ids = range(start, min(start + chunk, users + 1))
        await db.add_users(RelayUser(i, rng.randint(-5_000, 50_000_000)) for i in ids)
        await db.add_tokens(RelayToken(i, i, rng.randint(0, 10_000_000), unlimited=i % 3 == 0, status=1) for i in ids)
    await db.set_option("ModelRatio", '{"gpt-4o": 2.5, "gpt-4o-mini": 0.075, "gpt-4(1)": 15}')
    await db.set_option("GroupRatio", '{"default": 1, "vip": 0.8}')
    await db.close()
    return db.url


def timed_import(source: str, database_url: str) -> tuple[float, float, str]:
    """(seconds, peak MiB of the command, its summary) of one `import-relay` run."""
    env = {**os.environ, "LEDGER_DATABASE_URL": database_url}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "ledger_service", "import-relay", source],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = "\n".join(line for line in result.stdout.splitlines()[:9] if line.strip())
    return seconds, peak, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000, help="users, and as many tokens (default 100000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        directory = Path(tmp)
        source = asyncio.run(build_source(directory, args.users))
        server = None
        database_url = os.environ.get("LEDGER_DATABASE_URL")
        if database_url is None:
            server = EmbeddedPostgres(directory / "pgdata", delete_on_stop=True)
            server.psql("CREATE DATABASE ledger_bench;")
            database_url = server.url("ledger_bench")
        try:
            migrate(database_url)
            for label in ("first run (everything posted)", "second run (nothing moved)"):
                seconds, peak, summary = timed_import(source, database_url)
                print(f"{label}: {seconds:.1f} s, peak {peak:.0f} MiB\n{summary}\n", flush=True)
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
