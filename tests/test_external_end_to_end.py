"""From the providers' own files to a reconciliation run, over HTTP only: every shape uploaded, channels mapped,
one difference of each kind planted, and the run finds exactly those.

The ledger side is today's traffic (consumptions with cached tokens); the provider side is built from the fields
the providers document (tests/external_fixtures.py), uploaded as an operator would.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from tests.external_fixtures import (
    anthropic_cost_result,
    anthropic_page,
    anthropic_usage_result,
    csv_file,
    encode,
    json_lines,
    openai_cost_result,
    openai_page,
    openai_usage_result,
)
from tests.support import LedgerClient, unique

GPT = "gpt-4o-2024-08-06"
CLAUDE = "claude-sonnet-4-20250514"


async def upload(ledger: LedgerClient, source: str, content: bytes) -> dict[str, Any]:
    response = await ledger.client.post(
        f"/v1/external/uploads?source={source}", content=content, headers=ledger.headers("admin")
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def map_key(ledger: LedgerClient, source: str, key: str, channel_id: int) -> None:
    response = await ledger.put(f"/v1/external/channel-map/{source}/{key}", {"channel_id": channel_id}, as_="admin")
    assert response.status_code in (200, 201), response.text


async def consume(ledger: LedgerClient, channel: int, model: str, prompt: int, completion: int, cached: int) -> None:
    body = {
        "request_id": unique("e2e"),
        "user_id": 1,
        "token_id": 1,
        "channel_id": channel,
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
    }
    response = await ledger.post("/v1/consumptions", body)
    assert response.status_code == 201, response.text


async def test_provider_files_reconcile_against_the_ledger(ledger: LedgerClient) -> None:
    day: datetime = await ledger.conn.fetchval("SELECT date_trunc('day', now(), 'UTC')")
    start = int(day.timestamp())
    yesterday = start - 86400
    await ledger.token(1, 1)

    # Ledger, today. Channel 1 (OpenAI): two calls, 1500 prompt tokens of which 100 cached, 300 completion.
    await consume(ledger, 1, GPT, 1000, 200, 100)
    await consume(ledger, 1, GPT, 500, 100, 0)
    # Channel 2 (Anthropic): one call of 3000 prompt tokens, 200 read from the cache.
    await consume(ledger, 2, CLAUDE, 3000, 500, 200)
    # Channel 3 (a CSV provider): one call. Channel 4: a call no provider file mentions.
    await consume(ledger, 3, "gpt-4o-mini", 400, 40, 0)
    await consume(ledger, 4, "deepseek-chat", 100, 10, 0)

    # OpenAI usage as JSON Lines: yesterday (no ledger usage: only_provider) and today, two api keys of one
    # project, mapped to channel 1 by the project: matched, cached tokens included.
    openai = json_lines(
        [
            openai_page(
                [
                    [openai_usage_result(input_tokens=10, output_tokens=5, requests=1, model=GPT, api_key_id="key_a")],
                    [
                        openai_usage_result(input_tokens=1000, output_tokens=200, cached=100, requests=1, model=GPT,
                                            api_key_id="key_a", project_id="proj_abc"),
                        openai_usage_result(input_tokens=500, output_tokens=100, cached=0, requests=1, model=GPT,
                                            api_key_id="key_b", project_id="proj_abc"),
                    ],
                ],
                start=yesterday,
            )
        ]
    )  # fmt: skip
    await map_key(ledger, "openai_usage", "proj_abc", 1)
    # Anthropic usage today, its api key mapped to channel 2: 1500 uncached + 200 read + 1500 written to the cache
    # is 3200 input tokens against the ledger's 3000: differs.
    anthropic = encode(anthropic_page([[anthropic_usage_result(model=CLAUDE, api_key_id="apikey_2")]], start=start))
    await map_key(ledger, "anthropic_usage", "apikey_2", 2)
    # CSV today for channel 3: the tokens agree, the requests do not (5 against 1): differs.
    csv = csv_file([f"{day.date().isoformat()},3,gpt-4o-mini,400,40,5,"])
    for source, content in (("openai_usage", openai), ("anthropic_usage", anthropic), ("csv", csv)):
        await upload(ledger, source, content)

    # The cost exports are stored as they came, their money exact.
    costs = await upload(
        ledger, "openai_costs", encode(openai_page([[openai_cost_result("0.0625", line_item=f"{GPT}, input")]]))
    )
    anthropic_costs = await upload(
        ledger, "anthropic_costs", encode(anthropic_page([[anthropic_cost_result("123.78912", model=CLAUDE)]]))
    )
    assert (costs["records"], anthropic_costs["records"]) == (1, 1)
    stored = await ledger.get(f"/v1/external/uploads/{anthropic_costs['upload_id']}", as_="admin")
    assert stored.status_code == 200, stored.text
    assert "1.2378912" in stored.text  # cents to USD, every digit kept

    # One run over yesterday and today, every usage file together.
    window = {
        "since": datetime.fromtimestamp(yesterday, day.tzinfo).isoformat(),
        "until": (day + timedelta(days=1)).isoformat(),
        "strategy": "many_to_one",
        "tolerance": {"tokens_pct": 1, "requests": 0},
    }
    response = await ledger.post("/v1/external/reconciliations", window, as_="admin")
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["status"] == "completed"
    found = {(item["class"], item["channel_id"], item["model"], item["bucket_start"][:10]) for item in run["items"]}
    today, before = day.date().isoformat(), (day - timedelta(days=1)).date().isoformat()
    assert found == {
        ("matched", 1, GPT, today),
        ("only_provider", 1, GPT, before),  # yesterday: the provider saw a call, the ledger none
        ("differs", 2, CLAUDE, today),
        ("differs", 3, "gpt-4o-mini", today),
        ("only_ledger", 4, "deepseek-chat", today),
    }  # the cost files' buckets (November) are outside the window
    items = {(item["channel_id"], item["bucket_start"][:10]): item for item in run["items"]}
    channel_1 = items[(1, today)]
    assert channel_1["provider"]["cached_tokens"] == channel_1["ledger"]["cached_tokens"] == 100
    assert channel_1["provider"]["api_key_ids"] == ["key_a", "key_b"]
    assert items[(2, today)]["difference"]["input_tokens"] == -200
    assert items[(3, today)]["difference"]["requests"] == -4

    # The same input is the same run.
    again = await ledger.post("/v1/external/reconciliations", window, as_="admin")
    assert (again.status_code, again.json()["id"]) == (200, run["id"])
