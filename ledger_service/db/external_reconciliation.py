"""The SQL of external reconciliation runs and the margin report: provider records, the channel map, provider
prices, the ledger's charges per channel, model and bucket, and the runs with their items and explanations."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.domain.external_matching import Item, Key, LedgerUsage, Price, ProviderRecord

# Provider side ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadRow:
    id: int
    source: str
    sha256: bytes


async def upload(conn: AsyncConnection, upload_id: int) -> UploadRow | None:
    row = (
        await conn.execute(text("SELECT id, source, sha256 FROM external_uploads WHERE id = :id"), {"id": upload_id})
    ).first()
    return None if row is None else UploadRow(int(row.id), str(row.source), bytes(row.sha256))


async def last_upload_id(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("SELECT coalesce(max(id), 0) FROM external_uploads"))).scalar_one())


_RECORDS = """
    SELECT r.upload_id, r.line, u.source, r.bucket_start, r.bucket_end, r.api_key_id, r.project_id, r.channel_id,
           r.model, r.input_tokens, r.output_tokens, r.cached_tokens, r.requests, r.cost_usd, r.line_item,
           u.channel_id AS upload_channel_id
      FROM external_records r JOIN external_uploads u ON u.id = r.upload_id
"""


def _record(row: Any) -> ProviderRecord:
    return ProviderRecord(
        upload_id=int(row.upload_id),
        line=int(row.line),
        source=str(row.source),
        bucket_start=row.bucket_start,
        bucket_end=row.bucket_end,
        api_key_id=row.api_key_id,
        project_id=row.project_id,
        channel_id=None if row.channel_id is None else int(row.channel_id),
        model=row.model,
        input_tokens=_int(row.input_tokens),
        output_tokens=_int(row.output_tokens),
        cached_tokens=_int(row.cached_tokens),
        requests=_int(row.requests),
        cost_usd=None if row.cost_usd is None else Decimal(row.cost_usd),
        line_item=row.line_item,
        upload_channel_id=_int(row.upload_channel_id),
    )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


async def upload_records(conn: AsyncConnection, upload_id: int) -> list[ProviderRecord]:
    rows = await conn.execute(text(_RECORDS + " WHERE r.upload_id = :id ORDER BY r.line"), {"id": upload_id})
    return [_record(row) for row in rows]


async def window_records(
    conn: AsyncConnection, *, since: datetime, until: datetime, max_upload_id: int, costs_only: bool = False
) -> list[ProviderRecord]:
    """Records whose whole bucket lies in [since, until), from uploads up to `max_upload_id`."""
    sql = (
        _RECORDS
        + """ WHERE r.bucket_start >= :since AND r.bucket_end <= :until AND r.upload_id <= :max_upload_id"""
        + (" AND r.cost_usd IS NOT NULL" if costs_only else "")
        + " ORDER BY r.upload_id, r.line"
    )
    rows = await conn.execute(text(sql), {"since": since, "until": until, "max_upload_id": max_upload_id})
    return [_record(row) for row in rows]


async def channel_map(conn: AsyncConnection) -> dict[tuple[str, str], int]:
    rows = await conn.execute(text("SELECT source, external_key, channel_id FROM external_channel_map"))
    return {(str(row.source), str(row.external_key)): int(row.channel_id) for row in rows}


async def prices(conn: AsyncConnection) -> dict[str, Price]:
    rows = await conn.execute(
        text(
            "SELECT model, input_usd_per_mtok, output_usd_per_mtok, cached_input_usd_per_mtok, request_usd"
            " FROM provider_prices"
        )
    )
    return {
        str(row.model): Price(
            input_usd_per_mtok=Decimal(row.input_usd_per_mtok),
            output_usd_per_mtok=Decimal(row.output_usd_per_mtok),
            cached_input_usd_per_mtok=None
            if row.cached_input_usd_per_mtok is None
            else Decimal(row.cached_input_usd_per_mtok),
            request_usd=Decimal(row.request_usd),
        )
        for row in rows
    }


# Ledger side -----------------------------------------------------------------------------------------------

_USAGE = """
       count(*) FILTER (WHERE e.kind <> 'reversal') - count(*) FILTER (WHERE e.kind = 'reversal') AS requests,
       coalesce(sum((e.details->>'prompt_tokens')::bigint), 0) AS prompt_tokens,
       coalesce(sum((e.details->>'completion_tokens')::bigint), 0) AS completion_tokens,
       coalesce(sum(coalesce((e.details->>'cached_tokens')::bigint, -(o.details->>'cached_tokens')::bigint)), 0)
           AS cached_tokens,
       count(*) FILTER (WHERE e.details->>'cached_tokens' IS NULL AND o.details->>'cached_tokens' IS NULL)
           AS cached_unknown,
       coalesce(sum(e.charged), 0) AS quota
"""
"""Charges (settle, consume) net of their reversals, as the usage report counts them. A reversal's cached tokens
are its own detail, else the reversed entry's negated; an entry without one makes the aggregate's unknown."""


def _usage(row: Any) -> LedgerUsage:
    return LedgerUsage(
        input_tokens=int(row.prompt_tokens),
        output_tokens=int(row.completion_tokens),
        cached_tokens=None if int(row.cached_unknown) > 0 else int(row.cached_tokens),
        requests=int(row.requests),
        quota=int(row.quota),
    )


def _key_arrays(keys: Sequence[Key]) -> dict[str, Any]:
    return {
        "channels": [key.channel_id for key in keys],
        "models": [key.model for key in keys],
        "starts": [key.bucket_start for key in keys],
        "ends": [key.bucket_end for key in keys],
    }


_KEYS = """
    SELECT * FROM unnest(CAST(:channels AS bigint[]), CAST(:models AS text[]), CAST(:starts AS timestamptz[]),
                         CAST(:ends AS timestamptz[])) WITH ORDINALITY AS k(channel_id, model, bucket_start,
                                                                          bucket_end, n)
"""


async def ledger_in_keys(conn: AsyncConnection, keys: Sequence[Key], *, as_of: datetime) -> dict[Key, LedgerUsage]:
    """The ledger's charges inside each key (channel, model, [bucket_start, bucket_end)), made before `as_of`."""
    keys = [key for key in keys if key.channel_id is not None and key.model is not None]
    if not keys:
        return {}
    sql = f"""
        WITH k AS ({_KEYS})
        SELECT k.n, {_USAGE}
          FROM k
          JOIN entries e ON e.channel_id = k.channel_id AND e.details->>'model' = k.model
                        AND e.created_at >= k.bucket_start AND e.created_at < k.bucket_end
          LEFT JOIN entries o ON o.id = e.reverses
         WHERE e.charged IS NOT NULL AND e.created_at < :as_of
         GROUP BY k.n
    """  # noqa: S608 - fixed fragments only
    rows = await conn.execute(text(sql), {**_key_arrays(keys), "as_of": as_of})
    return {keys[int(row.n) - 1]: _usage(row) for row in rows}


async def ledger_outside_keys(
    conn: AsyncConnection,
    keys: Sequence[Key],
    *,
    start: datetime,
    end: datetime,
    as_of: datetime,
    hours: bool,
) -> dict[Key, LedgerUsage]:
    """The ledger's charges in [start, end) that no key covers, per channel, model and UTC hour or day (the
    bucket clipped to [start, end))."""
    keys = [key for key in keys if key.channel_id is not None and key.model is not None]
    grid = "hour" if hours else "day"
    sql = f"""
        WITH k AS ({_KEYS})
        SELECT e.channel_id, e.details->>'model' AS model, date_trunc('{grid}', e.created_at, 'UTC') AS bucket,
               date_trunc('{grid}', e.created_at, 'UTC') + interval '1 {grid}' AS bucket_end, {_USAGE}
          FROM entries e
          LEFT JOIN entries o ON o.id = e.reverses
         WHERE e.charged IS NOT NULL AND e.created_at >= :start AND e.created_at < :end AND e.created_at < :as_of
           AND NOT EXISTS (SELECT 1 FROM k WHERE k.channel_id = e.channel_id AND k.model = e.details->>'model'
                              AND e.created_at >= k.bucket_start AND e.created_at < k.bucket_end)
         GROUP BY 1, 2, 3, 4
    """  # noqa: S608 - fixed fragments only
    rows = await conn.execute(text(sql), {**_key_arrays(keys), "start": start, "end": end, "as_of": as_of})
    result: dict[Key, LedgerUsage] = {}
    for row in rows:
        key = Key(
            channel_id=int(row.channel_id),
            model=row.model,
            bucket_start=max(row.bucket, start),
            bucket_end=min(row.bucket_end, end),
        )
        result[key] = _usage(row)
    return result


async def ledger_by_channel_model(
    conn: AsyncConnection, *, start: datetime, end: datetime
) -> dict[tuple[int | None, str | None], LedgerUsage]:
    """The margin report's charges: per channel and model in [start, end), as the usage report counts them."""
    sql = f"""
        SELECT e.channel_id, e.details->>'model' AS model, {_USAGE}
          FROM entries e
          LEFT JOIN entries o ON o.id = e.reverses
         WHERE e.charged IS NOT NULL AND e.created_at >= :start AND e.created_at < :end
         GROUP BY 1, 2
    """  # noqa: S608 - fixed fragments only
    rows = await conn.execute(text(sql), {"start": start, "end": end})
    return {(int(row.channel_id), row.model): _usage(row) for row in rows}


async def database_now(conn: AsyncConnection) -> datetime:
    value: datetime = (await conn.execute(text("SELECT now()"))).scalar_one()
    return value


# Runs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRow:
    id: int
    params: dict[str, Any]
    status: str
    progress: dict[str, Any] | None
    matched: int
    differs: int
    only_provider: int
    only_ledger: int
    drift: list[dict[str, Any]] | None
    error: str | None
    created_by: int | None
    created_at: datetime
    heartbeat_at: datetime
    completed_at: datetime | None
    stale: bool


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


_RUN = """
    SELECT id, params, status, progress, matched, differs, only_provider, only_ledger, drift, error, created_by,
           created_at, heartbeat_at, completed_at, heartbeat_at < now() - make_interval(secs => :stale) AS stale
      FROM external_reconciliations
"""


def _run(row: Any) -> RunRow:
    return RunRow(
        id=int(row.id),
        params=_json(row.params),
        status=str(row.status),
        progress=_json(row.progress),
        matched=int(row.matched),
        differs=int(row.differs),
        only_provider=int(row.only_provider),
        only_ledger=int(row.only_ledger),
        drift=_json(row.drift),
        error=row.error,
        created_by=_int(row.created_by),
        created_at=row.created_at,
        heartbeat_at=row.heartbeat_at,
        completed_at=row.completed_at,
        stale=bool(row.stale),
    )


async def run_by_fingerprint(conn: AsyncConnection, fingerprint: bytes, *, stale_seconds: float) -> RunRow | None:
    row = (
        await conn.execute(text(_RUN + " WHERE fingerprint = :f"), {"f": fingerprint, "stale": stale_seconds})
    ).first()
    return None if row is None else _run(row)


async def run(conn: AsyncConnection, run_id: int, *, stale_seconds: float = 60, lock: bool = False) -> RunRow | None:
    sql = _RUN + " WHERE id = :id" + (" FOR UPDATE" if lock else "")
    row = (await conn.execute(text(sql), {"id": run_id, "stale": stale_seconds})).first()
    return None if row is None else _run(row)


async def insert_run(
    conn: AsyncConnection, *, fingerprint: bytes, params: dict[str, Any], progress: dict[str, Any], created_by: int
) -> int | None:
    """The new run's id, or None when a run with this fingerprint exists already."""
    row = (
        await conn.execute(
            text(
                """INSERT INTO external_reconciliations (fingerprint, params, progress, created_by)
                   VALUES (:f, CAST(:params AS jsonb), CAST(:progress AS jsonb), :by)
                   ON CONFLICT (fingerprint) DO NOTHING RETURNING id"""
            ),
            {"f": fingerprint, "params": json.dumps(params), "progress": json.dumps(progress), "by": created_by},
        )
    ).first()
    return None if row is None else int(row.id)


async def claim_run(conn: AsyncConnection, run_id: int, *, stale_seconds: float) -> bool:
    """Take over a failed run, or a running one whose heartbeat is stale (its process died)."""
    row = (
        await conn.execute(
            text(
                """UPDATE external_reconciliations
                      SET status = 'running', error = NULL, heartbeat_at = now()
                    WHERE id = :id AND (status = 'failed'
                          OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => :stale)))
                RETURNING id"""
            ),
            {"id": run_id, "stale": stale_seconds},
        )
    ).first()
    return row is not None


async def write_chunk(
    conn: AsyncConnection, run_id: int, items: Sequence[Item], *, progress: dict[str, Any], counts: dict[str, int]
) -> None:
    """Insert a chunk of items and move the run's cursor past them, in the caller's transaction."""
    if items:
        await conn.execute(
            text(
                """INSERT INTO external_reconciliation_items
                       (run_id, id, class, channel_id, model, bucket_start, bucket_end, ledger, provider, difference)
                   VALUES (:run_id, :id, :class, :channel_id, :model, :bucket_start, :bucket_end,
                           CAST(:ledger AS jsonb), CAST(:provider AS jsonb), CAST(:difference AS jsonb))"""
            ),
            [
                {
                    "run_id": run_id,
                    "id": item.id,
                    "class": item.klass,
                    "channel_id": item.key.channel_id,
                    "model": item.key.model,
                    "bucket_start": item.key.bucket_start,
                    "bucket_end": item.key.bucket_end,
                    "ledger": None if item.ledger is None else json.dumps(item.ledger),
                    "provider": None if item.provider is None else json.dumps(item.provider),
                    "difference": json.dumps(item.difference),
                }
                for item in items
            ],
        )
    await conn.execute(
        text(
            """UPDATE external_reconciliations
                  SET progress = CAST(:progress AS jsonb), heartbeat_at = now(), matched = :matched,
                      differs = :differs, only_provider = :only_provider, only_ledger = :only_ledger
                WHERE id = :id"""
        ),
        {"id": run_id, "progress": json.dumps(progress), **counts},
    )


async def complete_run(conn: AsyncConnection, run_id: int, drift: list[dict[str, Any]]) -> None:
    await conn.execute(
        text(
            """UPDATE external_reconciliations
                  SET status = 'completed', drift = CAST(:drift AS jsonb), heartbeat_at = now(), completed_at = now()
                WHERE id = :id"""
        ),
        {"id": run_id, "drift": json.dumps(drift)},
    )


async def fail_run(conn: AsyncConnection, run_id: int, error: str) -> None:
    await conn.execute(
        text(
            "UPDATE external_reconciliations SET status = 'failed', error = :error, heartbeat_at = now() WHERE id = :id"
        ),
        {"id": run_id, "error": error[:2000]},
    )


async def runs(conn: AsyncConnection, *, before_id: int | None, limit: int) -> list[RunRow]:
    sql = _RUN + (" WHERE id < :before" if before_id is not None else "") + " ORDER BY id DESC LIMIT :limit"
    rows = await conn.execute(text(sql), {"before": before_id, "limit": limit, "stale": 60})
    return [_run(row) for row in rows]


@dataclass(frozen=True, slots=True)
class ItemRow:
    id: int
    klass: str
    channel_id: int | None
    model: str | None
    bucket_start: datetime
    bucket_end: datetime
    ledger: dict[str, Any] | None
    provider: dict[str, Any] | None
    difference: dict[str, Any] | None


async def items(
    conn: AsyncConnection, run_id: int, *, klass: str | None, after_id: int | None, limit: int | None
) -> list[ItemRow]:
    clauses = ["run_id = :run_id"]
    if klass is not None:
        clauses.append("class = :class")
    if after_id is not None:
        clauses.append("id > :after")
    sql = f"""SELECT id, class, channel_id, model, bucket_start, bucket_end, ledger, provider, difference
                FROM external_reconciliation_items WHERE {" AND ".join(clauses)} ORDER BY id"""  # noqa: S608
    if limit is not None:
        sql += " LIMIT :limit"
    rows = await conn.execute(text(sql), {"run_id": run_id, "class": klass, "after": after_id, "limit": limit})
    return [
        ItemRow(
            id=int(row.id),
            klass=str(row._mapping["class"]),
            channel_id=_int(row.channel_id),
            model=row.model,
            bucket_start=row.bucket_start,
            bucket_end=row.bucket_end,
            ledger=_json(row.ledger),
            provider=_json(row.provider),
            difference=_json(row.difference),
        )
        for row in rows
    ]


async def item_exists(conn: AsyncConnection, run_id: int, item_id: int) -> bool:
    row = await conn.execute(
        text("SELECT 1 FROM external_reconciliation_items WHERE run_id = :r AND id = :i"), {"r": run_id, "i": item_id}
    )
    return row.first() is not None


@dataclass(frozen=True, slots=True)
class ExplanationRow:
    item_id: int
    note: str
    author: str
    author_key: int | None
    created_at: datetime


async def explanations(conn: AsyncConnection, run_id: int, item_ids: Sequence[int]) -> list[ExplanationRow]:
    if not item_ids:
        return []
    rows = await conn.execute(
        text(
            """SELECT item_id, note, author, author_key, created_at FROM external_explanations
                WHERE run_id = :r AND item_id = ANY(CAST(:ids AS integer[])) ORDER BY id"""
        ),
        {"r": run_id, "ids": list(item_ids)},
    )
    return [
        ExplanationRow(int(row.item_id), str(row.note), str(row.author), _int(row.author_key), row.created_at)
        for row in rows
    ]


async def insert_explanation(
    conn: AsyncConnection, run_id: int, item_id: int, *, note: str, author: str, author_key: int
) -> ExplanationRow:
    row = (
        await conn.execute(
            text(
                """INSERT INTO external_explanations (run_id, item_id, note, author_key, author)
                   VALUES (:r, :i, :note, :key, :author) RETURNING created_at"""
            ),
            {"r": run_id, "i": item_id, "note": note, "key": author_key, "author": author},
        )
    ).one()
    return ExplanationRow(item_id, note, author, author_key, row.created_at)
