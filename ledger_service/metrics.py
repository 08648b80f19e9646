"""Prometheus metrics: the HTTP requests (recorded by api/middleware.py) and the ledger's own work.

Counters move only after the transaction that did the work has committed (see db/transactions.after_commit), so
a rolled-back or retried attempt is never counted.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# HTTP requests, by route template. The names and labels are those Litestar's Prometheus middleware used to
# export (app_name="ledger"), so dashboards keep working; recording them in our access-log middleware spares a
# middleware layer and its label lookups on every request.
HTTP_LABELS = ["app_name", "method", "path", "status_code"]
HTTP_REQUESTS = Counter("ledger_http_requests_total", "Responses by route template and status", HTTP_LABELS)
HTTP_ERRORS = Counter("ledger_http_requests_error_total", "Responses with a status of 500 or above", HTTP_LABELS)
HTTP_DURATION = Histogram("ledger_http_request_duration_seconds", "Time to the response", HTTP_LABELS)
HTTP_IN_PROGRESS = Gauge(
    "ledger_http_requests_in_progress",
    "Requests being served",
    ["app_name", "method", "path"],
    multiprocess_mode="livesum",
)

HOLDS_OPENED = Counter("ledger_holds_opened_total", "Holds created (trusted ones included)", ["trusted"])
HOLDS_SETTLED = Counter("ledger_holds_settled_total", "Holds settled", ["late"])
HOLDS_REFUNDED = Counter("ledger_holds_refunded_total", "Holds refunded by a refund call")
HOLDS_EXPIRED = Counter("ledger_holds_expired_total", "Holds expired (by the sweeper or the first call after expiry)")
CONSUMPTIONS = Counter("ledger_consumptions_total", "Charges recorded without a hold")
# The gauges read the database, so every process reports the same value: with several workers, the largest live one.
SWEEPER_LAG = Gauge(
    "ledger_sweeper_lag_seconds",
    "How long the most overdue open hold has been past its expiry (0: none overdue)",
    multiprocess_mode="livemax",
)
SNAPSHOT_AGE = Gauge(
    "ledger_snapshot_age_seconds", "Time since the latest snapshot refresh (any process)", multiprocess_mode="livemax"
)
UNSEALED_ENTRIES = Gauge(
    "ledger_unsealed_entries", "Entries not yet sealed into the hash chain", multiprocess_mode="livemax"
)
BACKGROUND_FAILURES = Counter("ledger_background_failures_total", "Failed rounds of a background job", ["job"])
RATE_LIMITED = Counter("ledger_rate_limited_total", "Requests refused by the per-key rate limit")
LIFECYCLE_GROUP_SIZE = Histogram(
    "ledger_lifecycle_group_size",
    "Lifecycle operations planned and committed together (a coalesced group of single calls, or a batch)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
STALE_PLANS = Counter(
    "ledger_stale_plans_total", "Plans whose premises no longer held when applied, planned again under locks"
)
REPLICATION_SYNCHRONOUS = Gauge(
    "ledger_replication_synchronous",
    "1: every acknowledged write is on a synchronous standby too, or there is no replica at all; 0: the database is"
    " a cluster replicating asynchronously (started with LEDGER_ALLOW_ASYNC_REPLICATION=true)",
    multiprocess_mode="livemin",
)
REPLICA_FALLBACKS = Counter(
    "ledger_replica_fallbacks_total",
    "Audit reads meant for LEDGER_READ_DATABASE_URL served by the primary instead: the replica had not replayed"
    " the asked min_position in time (behind), or could not be reached (unavailable)",
    ["reason"],
)
