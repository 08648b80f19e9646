"""Provider uploads, records, channel-map entries and provider prices written straight into the tables, for the
reconciliation and margin tests (the upload API is tested on its own), and ledger traffic over HTTP."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from tests.support import LedgerClient, unique

RECORD_FIELDS = (
    "bucket_start",
    "bucket_end",
    "api_key_id",
    "project_id",
    "channel_id",
    "model",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "requests",
    "cost_usd",
    "line_item",
)


async def insert_upload(
    conn: asyncpg.Connection[Any], source: str, records: list[dict[str, Any]], *, channel_id: int | None = None
) -> int:
    """An upload of `source` holding `records` (dicts of external_records' columns); its id."""
    content = json.dumps({"nonce": unique("upload"), "records": records}, default=str).encode()
    upload_id: int = await conn.fetchval(
        """INSERT INTO external_uploads (source, sha256, filename, channel_id, content, records)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
        source,
        hashlib.sha256(content).digest(),
        f"{source}.json",
        channel_id,
        content,
        len(records),
    )
    for line, record in enumerate(records, start=1):
        unknown = set(record) - set(RECORD_FIELDS)
        assert not unknown, unknown
        values = [record.get(name) for name in RECORD_FIELDS]
        await conn.execute(
            f"""INSERT INTO external_records (upload_id, line, {", ".join(RECORD_FIELDS)}, raw)
                VALUES ($1, $2, {", ".join(f"${n}" for n in range(3, 3 + len(RECORD_FIELDS)))},
                        ${3 + len(RECORD_FIELDS)})""",
            upload_id,
            line,
            *values,
            json.dumps(record, default=str),
        )
    return upload_id


def record(start: datetime, end: datetime, model: str, **fields: Any) -> dict[str, Any]:
    return {"bucket_start": start, "bucket_end": end, "model": model, **fields}


async def map_channel(conn: asyncpg.Connection[Any], source: str, external_key: str, channel_id: int) -> None:
    await conn.execute(
        "INSERT INTO external_channel_map (source, external_key, channel_id) VALUES ($1, $2, $3)",
        source,
        external_key,
        channel_id,
    )


async def set_price(
    conn: asyncpg.Connection[Any],
    model: str,
    input_per_mtok: str,
    output_per_mtok: str,
    cached_per_mtok: str | None = None,
    request_usd: str = "0",
) -> None:
    await conn.execute(
        """INSERT INTO provider_prices (model, input_usd_per_mtok, output_usd_per_mtok, cached_input_usd_per_mtok,
                                        request_usd) VALUES ($1, $2, $3, $4, $5)""",
        model,
        Decimal(input_per_mtok),
        Decimal(output_per_mtok),
        None if cached_per_mtok is None else Decimal(cached_per_mtok),
        Decimal(request_usd),
    )


async def consume(
    ledger: LedgerClient, channel_id: int, model: str, prompt: int, completion: int, *, user_id: int = 1
) -> dict[str, Any]:
    """A consumption over HTTP; the consume entry."""
    request_id = unique("c")
    body = {
        "request_id": request_id,
        "user_id": user_id,
        "token_id": user_id,
        "channel_id": channel_id,
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }
    response = await ledger.post("/v1/consumptions", body)
    assert response.status_code == 201, response.text
    return await charge_entry(ledger, request_id)


async def charge_entry(ledger: LedgerClient, request_id: str) -> dict[str, Any]:
    view = (await ledger.get(f"/v1/holds/{request_id}")).json()
    entry: dict[str, Any] = next(e for e in view["entries"] if e["kind"] in ("settle", "consume"))
    return entry


async def reverse(ledger: LedgerClient, entry_id: int) -> dict[str, Any]:
    response = await ledger.post(f"/v1/entries/{entry_id}/reverse", {"reference": unique("rev")}, as_="admin")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body
