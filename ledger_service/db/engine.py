"""Creating the async engine from a `postgresql://` URL."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def async_url(url: str) -> str:
    """`postgresql://...` (as users and libpq write it) to SQLAlchemy's `postgresql+asyncpg://...`."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres", "postgresql+asyncpg"}:
        query = dict(parsed.query)
        if "sslmode" in query:  # libpq's name for it; asyncpg calls it ssl and takes the same values
            query["ssl"] = query.pop("sslmode")
        return parsed.set(drivername="postgresql+asyncpg", query=query).render_as_string(hide_password=False)
    raise ValueError(f"not a PostgreSQL URL: {parsed.drivername}://...")


def asyncpg_dsn(url: str) -> str:
    """`postgresql://...` in the form asyncpg itself connects with (it reads libpq's sslmode as it is)."""
    parsed = make_url(url)
    if parsed.drivername not in {"postgresql", "postgres", "postgresql+asyncpg"}:
        raise ValueError(f"not a PostgreSQL URL: {parsed.drivername}://...")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(
    url: str, *, pool_size: int = 20, application_name: str = "ledger-service", command_timeout: float | None = 60
) -> AsyncEngine:
    """A pooled engine. Pool size is fixed (no overflow) so the connection budget per process is known.
    `command_timeout` bounds each statement, in seconds (None: unbounded, for whole-journal checks run by hand)."""
    return create_async_engine(
        async_url(url),
        # Pinned, whatever the server's default_transaction_isolation: the hold's correctness rests on READ
        # COMMITTED (each statement after the user lock sees the last holder's commit; docs/accounting.md).
        isolation_level="READ COMMITTED",
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=10,
        pool_recycle=1800,
        connect_args={
            "server_settings": {"application_name": application_name},
            "timeout": 5,
            "command_timeout": command_timeout,
        },
    )
