"""Signing in to the web console over HTTP, as a browser's form would, for the console's tests."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import asyncpg
import httpx

from tests.support import LedgerClient, unique

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def form_token(html: str) -> str:
    found = TOKEN.search(html)
    assert found is not None, html
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    """Fetch the sign-in form (which sets its double-submit cookie) and post the key with its token."""
    form = await client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    return await client.post(
        "/console/sign-in", data={"csrf_token": form_token(form.text), "api_key": key}, follow_redirects=False
    )


async def signed_in(client: httpx.AsyncClient, key: str) -> str:
    """Sign in; returns the session's CSRF token (from the overview's sign-out form)."""
    response = await sign_in(client, key)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/console"
    overview = await client.get("/console")
    assert overview.status_code == 200, overview.text
    return form_token(overview.text)


async def a_settled_request(
    ledger: LedgerClient, *, user_id: int = 7, token_id: int = 70, request_id: str | None = None
) -> str:
    """A funded user and a limited token, one hold and its settlement: the request id."""
    await ledger.fund(user_id, 20_000)  # little enough that the trust rule holds the estimate
    await ledger.token(token_id, user_id, remaining=500_000)
    request_id = request_id or unique("con")
    response = await ledger.hold(request_id=request_id, user_id=user_id, token_id=token_id, max_tokens=200)
    assert response.status_code == 201, response.text
    settled = await ledger.post(
        f"/v1/holds/{request_id}/settle", {"channel_id": 3, "prompt_tokens": 100, "completion_tokens": 50}
    )
    assert settled.status_code == 200, settled.text
    return request_id


async def a_reconciliation_run(conn: asyncpg.Connection[Any]) -> int:
    """A completed external reconciliation run with a matched, a differing and a provider-only item, and a cost
    record of the provider for channel 3 this month: written straight into their tables."""
    run_id = int(
        await conn.fetchval(
            "INSERT INTO external_reconciliations (fingerprint, params, status, matched, differs, only_provider,"
            " completed_at, drift) VALUES ($1, $2, 'completed', 1, 1, 1, now(), $3) RETURNING id",
            os.urandom(32),
            json.dumps({"strategy": "many_to_one", "since": "2026-12-01T00:00:00Z"}),
            json.dumps([]),
        )
    )
    ledger = {
        "requests": 10,
        "input_tokens": 1000,
        "output_tokens": 500,
        "cached_tokens": 0,
        "quota": 7500,
        "estimated_cost_usd": "0.0125",
    }
    provider = {
        "requests": 10,
        "input_tokens": 1000,
        "output_tokens": 500,
        "cached_tokens": 0,
        "cost_usd": "0.0125",
        "records": [{"upload_id": 1, "line": 2}],
        "api_key_ids": ["key_abc"],
    }
    items = [
        (1, "matched", ledger, provider, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": "0"}),
        (
            2,
            "differs",
            {**ledger, "output_tokens": 450},
            provider,
            {
                "requests": 0,
                "input_tokens": 0,
                "output_tokens": -50,
                "cost_usd": "-0.0005",
                "reasons": ["output_tokens"],
            },
        ),
        (3, "only_provider", None, provider, None),
    ]
    for item_id, klass, ours, theirs, difference in items:
        await conn.execute(
            "INSERT INTO external_reconciliation_items (run_id, id, class, channel_id, model, bucket_start,"
            " bucket_end, ledger, provider, difference)"
            " VALUES ($1, $2, $3, 3, 'gpt-4o', date_trunc('day', now()), date_trunc('day', now()) + interval '1 day',"
            " $4, $5, $6)",
            run_id,
            item_id,
            klass,
            None if ours is None else json.dumps(ours),
            json.dumps(theirs),
            None if difference is None else json.dumps(difference),
        )
    upload = await conn.fetchval(
        "INSERT INTO external_uploads (source, sha256, content, records) VALUES ('openai_costs', $1, ''::bytea, 1)"
        " RETURNING id",
        os.urandom(32),
    )
    await conn.execute(
        "INSERT INTO external_records (upload_id, line, bucket_start, bucket_end, channel_id, model, cost_usd, raw)"
        " VALUES ($1, 1, date_trunc('day', now()), date_trunc('day', now()) + interval '1 day', 3, 'gpt-4o', 0.0005,"
        " '{}')",
        upload,
    )
    return run_id
