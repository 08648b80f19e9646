"""Service settings, read once from environment variables.

Every setting has a default that works on a developer's machine; `Settings.from_env()` is the only place the
environment is read, so the rest of the code receives plain values and tests can build settings directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value <= maximum:  # also refuses nan
        raise SettingsError(f"{name} must be between {minimum} and {maximum}, got {raw}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _str(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


ADMIN_KEY_MIN_LENGTH = 16
"""Only the secret's unsalted SHA-256 is stored, so a short (human-chosen) secret could be guessed offline from a
leaked hash. 16 characters is a floor, not a recommendation: generate keys (docs/operations.md, section 5)."""


def _secret(env: Mapping[str, str], name: str) -> str | None:
    value = _str(env, name)
    if value is not None and len(value) < ADMIN_KEY_MIN_LENGTH:
        raise SettingsError(f"{name} must be at least {ADMIN_KEY_MIN_LENGTH} characters, got {len(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service can be configured with. Field docs name the environment variable."""

    database_url: str | None = None
    """LEDGER_DATABASE_URL: `postgresql://user:pass@host:port/db`. Unset: start the embedded PostgreSQL. A cluster's
    members may all be named (`postgresql://user@h1:5432,h2:5432,h3:5432/db`): writes go to whichever is the
    primary (`target_session_attrs=read-write`, added when the URL names several hosts and sets none)."""

    read_database_url: str | None = None
    """LEDGER_READ_DATABASE_URL: optional, a streaming replica of that database. The audit reads (entry feed,
    statements, account balances, reports, reconciliation) go there; relay-facing reads and every write stay on the
    primary. A reader that must see its own write passes the write's `Ledger-Position` as `min_position`
    (docs/operations.md, Reading from a replica)."""

    allow_async_replication: bool = False
    """LEDGER_ALLOW_ASYNC_REPLICATION: start even when the database is a cluster whose commits are not synchronous
    (an acknowledged write could then be lost with the primary); logged as an error and exported as
    `ledger_replication_synchronous 0`. Default false: such a cluster is refused at start."""

    pgbouncer: str = "off"
    """LEDGER_PGBOUNCER: `off` (default: the URL reaches PostgreSQL itself), `session` (through pgbouncer's session
    pooling: no startup parameter pgbouncer would refuse) or `transaction` (through its transaction pooling: also no
    prepared statement kept between transactions). Migrations take a session's lock: with `transaction`, run
    `ledger-service migrate` against PostgreSQL itself, and serve with LEDGER_AUTO_MIGRATE=false."""

    data_dir: Path = field(default_factory=lambda: Path(".ledger-data"))
    """LEDGER_DATA_DIR: where the embedded PostgreSQL keeps its files (default `./.ledger-data`)."""

    host: str = "127.0.0.1"
    """LEDGER_HOST: the address `serve` listens on."""

    port: int = 8080
    """LEDGER_PORT: the TCP port `serve` listens on."""

    auto_migrate: bool = True
    """LEDGER_AUTO_MIGRATE: apply pending migrations when `serve` starts (default true)."""

    admin_key: str | None = None
    """LEDGER_ADMIN_KEY: at start, make sure an admin API key with exactly this secret exists."""

    hold_ttl_seconds: int = 600
    """LEDGER_HOLD_TTL_SECONDS: how long a hold stays open when the request gives no `expires_in`."""

    trust_factor: int = 100
    """LEDGER_TRUST_FACTOR: hold nothing when the balances exceed this many estimates; 0 turns it off."""

    pre_consumed_quota: int = 500
    """LEDGER_PRE_CONSUMED_QUOTA: the fixed part of every estimate (one-api's PreConsumedQuota)."""

    snapshot_interval_seconds: int = 5
    """LEDGER_SNAPSHOT_INTERVAL_SECONDS: how often balance snapshots are refreshed in the background."""

    snapshot_history_seconds: int = 3600
    """LEDGER_SNAPSHOT_HISTORY_SECONDS: how often a snapshot refresh also keeps a history checkpoint, the starting
    point of balances at past instants (`as_of`). Smaller: faster `as_of` reads, more rows kept. 0: every refresh."""

    sweep_interval_seconds: int = 5
    """LEDGER_SWEEP_INTERVAL_SECONDS: how often expired holds are looked for and refunded."""

    pool_size: int = 20
    """LEDGER_POOL_SIZE: database connections each service process keeps open."""

    workers: int = 1
    """LEDGER_WORKERS: HTTP worker processes `serve` starts (each with its own pool)."""

    coalesce_groups: int = 1
    """LEDGER_COALESCE_GROUPS: how many groups of concurrent single lifecycle calls (holds, settlements, refunds,
    consumptions) each process applies at once. Calls that arrive while that many groups are in flight wait and
    are planned and committed together, as one batch of independent operations (docs/design.md). 0 turns
    coalescing off: every call is its own transaction."""

    max_body_bytes: int = 1_048_576
    """LEDGER_MAX_BODY_BYTES: the largest request body accepted; larger ones get 413 (default 1 MiB)."""

    rate_limit_per_second: float = 0.0
    """LEDGER_RATE_LIMIT_PER_SECOND: requests per second each API key may make, per process; 0 turns it off."""

    rate_limit_burst: int = 0
    """LEDGER_RATE_LIMIT_BURST: requests a key may make at once above its rate (default: one second's worth)."""

    log_format: str = "json"
    """LEDGER_LOG_FORMAT: `json` (one object per line, for log pipelines) or `text` (for a terminal)."""

    background_tasks: bool = True
    """LEDGER_BACKGROUND_TASKS: run the snapshotter and the expiry sweeper in this process (default true)."""

    read_timeout_seconds: int = 15
    """LEDGER_READ_TIMEOUT_SECONDS: `serve` closes a connection that has not sent a whole request (headers and
    body) this long after connecting or starting the request (default 15)."""

    keep_alive_seconds: int = 5
    """LEDGER_KEEP_ALIVE_SECONDS: `serve` closes a connection idle this long after its last response (default 5)."""

    max_connections: int = 1000
    """LEDGER_MAX_CONNECTIONS: open connections each `serve` worker takes requests from; a request on any
    connection beyond them gets uvicorn's plain 503 (default 1000)."""

    heavy_reports: int = 1
    """LEDGER_HEAVY_REPORTS: whole-journal reports (reconciliation, usage, trial balance `as_of`) each process runs
    at once, on as many connections of their own; one more is refused at once with 429 `busy` (default 1)."""

    quota_per_usd: int = 500_000
    """LEDGER_QUOTA_PER_USD: quota units per USD when the margin report prices what users were charged (default
    500,000, the relays' QuotaPerUnit)."""

    max_upload_bytes: int = 64 * 1_048_576
    """LEDGER_MAX_UPLOAD_BYTES: the largest provider file `POST /v1/external/uploads` accepts (default 64 MiB)."""

    console_session_seconds: int = 3600
    """LEDGER_CONSOLE_SESSION_SECONDS: how long a web console sign-in lasts (default an hour)."""

    @property
    def statement_cache(self) -> bool:
        """Whether connections may keep prepared statements (not behind pgbouncer's transaction pooling)."""
        return self.pgbouncer != "transaction"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every LEDGER_* variable; raise SettingsError naming the first bad one."""
        env = os.environ if env is None else env
        data_dir = _str(env, "LEDGER_DATA_DIR")
        settings = cls(
            database_url=_str(env, "LEDGER_DATABASE_URL"),
            read_database_url=_str(env, "LEDGER_READ_DATABASE_URL"),
            allow_async_replication=_bool(env, "LEDGER_ALLOW_ASYNC_REPLICATION", False),
            pgbouncer=_choice(env, "LEDGER_PGBOUNCER", "off", ("off", "session", "transaction")),
            data_dir=Path(data_dir) if data_dir else Path(".ledger-data"),
            host=_str(env, "LEDGER_HOST") or "127.0.0.1",
            port=_int(env, "LEDGER_PORT", 8080, minimum=0, maximum=65535),
            auto_migrate=_bool(env, "LEDGER_AUTO_MIGRATE", True),
            admin_key=_secret(env, "LEDGER_ADMIN_KEY"),
            hold_ttl_seconds=_int(env, "LEDGER_HOLD_TTL_SECONDS", 600, minimum=1, maximum=86400),
            trust_factor=_int(env, "LEDGER_TRUST_FACTOR", 100, minimum=0, maximum=10**6),
            pre_consumed_quota=_int(env, "LEDGER_PRE_CONSUMED_QUOTA", 500, minimum=0, maximum=10**9),
            snapshot_interval_seconds=_int(env, "LEDGER_SNAPSHOT_INTERVAL_SECONDS", 5, minimum=1, maximum=86400),
            snapshot_history_seconds=_int(env, "LEDGER_SNAPSHOT_HISTORY_SECONDS", 3600, minimum=0, maximum=10**7),
            sweep_interval_seconds=_int(env, "LEDGER_SWEEP_INTERVAL_SECONDS", 5, minimum=1, maximum=86400),
            pool_size=_int(env, "LEDGER_POOL_SIZE", 20, minimum=1, maximum=1000),
            workers=_int(env, "LEDGER_WORKERS", 1, minimum=1, maximum=64),
            coalesce_groups=_int(env, "LEDGER_COALESCE_GROUPS", 1, minimum=0, maximum=1000),
            max_body_bytes=_int(env, "LEDGER_MAX_BODY_BYTES", 1_048_576, minimum=1024, maximum=1 << 30),
            rate_limit_per_second=_float(env, "LEDGER_RATE_LIMIT_PER_SECOND", 0.0, minimum=0.0, maximum=1e6),
            rate_limit_burst=_int(env, "LEDGER_RATE_LIMIT_BURST", 0, minimum=0, maximum=10**6),
            log_format=_choice(env, "LEDGER_LOG_FORMAT", "json", ("json", "text")),
            background_tasks=_bool(env, "LEDGER_BACKGROUND_TASKS", True),
            read_timeout_seconds=_int(env, "LEDGER_READ_TIMEOUT_SECONDS", 15, minimum=1, maximum=3600),
            keep_alive_seconds=_int(env, "LEDGER_KEEP_ALIVE_SECONDS", 5, minimum=1, maximum=3600),
            max_connections=_int(env, "LEDGER_MAX_CONNECTIONS", 1000, minimum=1, maximum=100_000),
            heavy_reports=_int(env, "LEDGER_HEAVY_REPORTS", 1, minimum=1, maximum=64),
            quota_per_usd=_int(env, "LEDGER_QUOTA_PER_USD", 500_000, minimum=1, maximum=10**12),
            max_upload_bytes=_int(env, "LEDGER_MAX_UPLOAD_BYTES", 64 * 1_048_576, minimum=1024, maximum=1 << 32),
            console_session_seconds=_int(env, "LEDGER_CONSOLE_SESSION_SECONDS", 3600, minimum=60, maximum=7 * 86400),
        )
        if settings.pgbouncer == "transaction" and settings.auto_migrate:
            raise SettingsError(
                "LEDGER_PGBOUNCER=transaction needs LEDGER_AUTO_MIGRATE=false: migrations hold a session's advisory"
                " lock, which transaction pooling breaks; run `ledger-service migrate` against PostgreSQL itself"
            )
        if settings.pgbouncer == "transaction" and settings.database_url is None:
            raise SettingsError("LEDGER_PGBOUNCER=transaction needs LEDGER_DATABASE_URL (pgbouncer's address)")
        return settings
