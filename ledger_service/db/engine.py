"""Creating the async engine from a `postgresql://` URL, of one server or of a cluster.

Every connection of the service, SQLAlchemy's and the lifecycle pool's alike, is opened by `asyncpg.connect` on the
same DSN (`asyncpg_dsn`), so both take the same URLs: libpq's multi-host form
(`postgresql://u@h1:5432,h2:5432/db`, or `?host=h1,h2&port=5432,5432`), and its `target_session_attrs`. With
several hosts and no `target_session_attrs` of the user's, `read-write` is added: the service writes, and only the
primary accepts writes (docs/operations.md, High availability).
"""

from __future__ import annotations

import uuid
from collections.abc import Coroutine
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger_service.db.transactions import READ_ONLY_SQL_TRANSACTION

POSTGRES_SCHEMES = frozenset({"postgresql", "postgres", "postgresql+asyncpg"})
READ_WRITE = "read-write"
PREFER_STANDBY = "prefer-standby"


def async_url(url: str) -> str:
    """`postgresql://...` (as users and libpq write it) to SQLAlchemy's `postgresql+asyncpg://...` (one host)."""
    parsed = make_url(url)
    if parsed.drivername in POSTGRES_SCHEMES:
        query = dict(parsed.query)
        if "sslmode" in query:  # libpq's name for it; asyncpg calls it ssl and takes the same values
            query["ssl"] = query.pop("sslmode")
        return parsed.set(drivername="postgresql+asyncpg", query=query).render_as_string(hide_password=False)
    raise ValueError(f"not a PostgreSQL URL: {parsed.drivername}://...")


def _split(url: str) -> tuple[str, str, str, list[tuple[str, str]], str]:
    """(scheme, netloc, path, query pairs, fragment), refusing anything but PostgreSQL."""
    scheme, netloc, path, query, fragment = urlsplit(url)
    if scheme not in POSTGRES_SCHEMES:
        raise ValueError(f"not a PostgreSQL URL: {scheme}://...")
    return scheme, netloc, path, parse_qsl(query, keep_blank_values=True), fragment


def hosts_of(url: str) -> list[str]:
    """The servers a URL names, as `host:port` or `host` (a Unix socket directory counts as a host)."""
    _, netloc, _, pairs, _ = _split(url)
    hostlist = netloc.rpartition("@")[2]
    hosts = [unquote(host) for host in hostlist.split(",") if host]
    for key, value in pairs:
        if key == "host":
            hosts += [host for host in value.split(",") if host]
    return hosts


def is_multi_host(url: str) -> bool:
    return len(hosts_of(url)) > 1


def asyncpg_dsn(url: str, *, several_hosts_target: str = READ_WRITE) -> str:
    """`postgresql://...` in the form asyncpg itself connects with (it reads libpq's sslmode and multi-host forms).

    `ssl=` (asyncpg's keyword, which this service's URLs have always taken) becomes libpq's `sslmode=`, the one
    asyncpg reads from a DSN; the values are the same. SQLAlchemy's multi-host form (`?host=h1:p1&host=h2:p2`)
    becomes libpq's (`?host=h1,h2&port=p1,p2`); with several hosts, `target_session_attrs=read-write`
    (`several_hosts_target`) is added unless the URL sets it.
    """
    _, netloc, path, pairs, fragment = _split(url)
    hosts = [value for key, value in pairs if key == "host"]
    if len(hosts) > 1:  # SQLAlchemy's form: each `host=h:p`; asyncpg would keep only the last
        if any(key == "port" for key, _ in pairs):
            raise ValueError("a URL with several host= parameters must give each one's port as host=h:port")
        names, ports = zip(*(host.rpartition(":")[::2] if ":" in host else (host, "") for host in hosts), strict=True)
        pairs = [(key, value) for key, value in pairs if key != "host"]
        pairs.append(("host", ",".join(names)))
        if any(ports):
            pairs.append(("port", ",".join(port or "5432" for port in ports)))
    if not any(key == "sslmode" for key, _ in pairs):  # asyncpg's own name, which its DSN parser does not read
        pairs = [("sslmode" if key == "ssl" else key, value) for key, value in pairs]
    if is_multi_host(url) and not any(key == "target_session_attrs" for key, _ in pairs):
        pairs.append(("target_session_attrs", several_hosts_target))
    return urlunsplit(("postgresql", netloc, path, urlencode(pairs, safe="/,:"), fragment))


def connect_options(
    *, application_name: str, command_timeout: float | None, statement_cache: bool = True
) -> dict[str, Any]:
    """`asyncpg.connect` arguments besides the DSN, the same for every connection of the service.

    Without `statement_cache` (pgbouncer's transaction pooling), asyncpg keeps no prepared statements between
    calls: a server connection of pgbouncer's may not be the one that prepared them."""
    options: dict[str, Any] = {
        "server_settings": {"application_name": application_name},
        "timeout": 5,
        "command_timeout": command_timeout,
    }
    if not statement_cache:
        options["statement_cache_size"] = 0
    return options


def create_engine(
    url: str,
    *,
    pool_size: int = 20,
    application_name: str = "ledger-service",
    command_timeout: float | None = 60,
    statement_cache: bool = True,
    reads_only: bool = False,
) -> AsyncEngine:
    """A pooled engine. Pool size is fixed (no overflow) so the connection budget per process is known.
    `command_timeout` bounds each statement, in seconds (None: unbounded, for whole-journal checks run by hand).

    Its connections are opened by asyncpg on `asyncpg_dsn(url)` (SQLAlchemy's own URL parsing knows neither
    libpq's multi-host form nor target_session_attrs). Without `statement_cache` (pgbouncer's transaction
    pooling), SQLAlchemy keeps no prepared statements either, and names each one uniquely: two client connections
    may share a server connection. An engine for `reads_only` (LEDGER_READ_DATABASE_URL) prefers a standby among
    several hosts."""
    dsn = asyncpg_dsn(url, several_hosts_target=PREFER_STANDBY if reads_only else READ_WRITE)
    options = connect_options(
        application_name=application_name, command_timeout=command_timeout, statement_cache=statement_cache
    )

    def connect() -> Coroutine[Any, Any, asyncpg.Connection[asyncpg.Record]]:
        return asyncpg.connect(dsn, **options)

    adapter: dict[str, Any] = {"async_creator_fn": connect}
    if not statement_cache:
        adapter.update(prepared_statement_cache_size=0, prepared_statement_name_func=_unique_statement_name)

    def creator() -> Any:
        # What create_async_engine's async_creator does, plus the adapter's arguments it cannot pass.
        dbapi = cast("Any", engine.sync_engine.dialect.dbapi)
        return dbapi.connect(**adapter)

    engine: AsyncEngine = create_async_engine(
        "postgresql+asyncpg://",
        creator=creator,
        # Pinned, whatever the server's default_transaction_isolation: the hold's correctness rests on READ
        # COMMITTED (each statement after the user lock sees the last holder's commit; docs/accounting.md).
        isolation_level="READ COMMITTED",
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=10,
        pool_recycle=1800,
    )
    event.listen(engine.sync_engine, "handle_error", _read_only_is_a_disconnect)
    return engine


def _read_only_is_a_disconnect(context: ExceptionContext) -> None:
    """A write refused as read-only: invalidate the connection, and with it the pool's older ones (SQLAlchemy does
    that for disconnects), so the retry and every later call connect anew, to the new primary."""
    state = getattr(context.original_exception, "sqlstate", None)
    if state == READ_ONLY_SQL_TRANSACTION:
        context.is_disconnect = True


def _unique_statement_name() -> str:
    return f"__ledger_{uuid.uuid4().hex}__"
