"""The CSV the service writes: relay-supplied text cannot become a spreadsheet formula, numbers stay numbers."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

import httpx

from tests.support import LedgerClient, unique

FORMULAS = ['=HYPERLINK("http://x","y")', "=cmd|' /C calc'!A0", "@SUM(1+1)", "+1+1", "-2+3"]


async def usage_csv(ledger: LedgerClient, query: str) -> httpx.Response:
    headers = {**ledger.headers("auditor"), "Accept": "text/csv"}
    response = await ledger.client.get(f"/v1/reports/usage?{query}", headers=headers)
    assert (response.status_code, response.headers["content-type"][:8]) == (200, "text/csv"), response.text
    return response


async def test_model_names_that_look_like_formulas_are_exported_as_text(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000_000)
    await ledger.token(1, 1)
    for model in FORMULAS:
        held = await ledger.hold(request_id=unique(), model=model, max_tokens=10)
        assert held.status_code == 201, held.text
        settled = await ledger.post(f"/v1/holds/{held.json()['request_id']}/settle", {"channel_id": 1,
                                    "prompt_tokens": 10, "completion_tokens": 1})  # fmt: skip
        assert settled.status_code == 200, settled.text
        consumption = {"request_id": unique(), "user_id": 1, "token_id": 1, "channel_id": 1, "model": model,
                       "prompt_tokens": 10, "completion_tokens": 1}  # fmt: skip
        assert (await ledger.post("/v1/consumptions", consumption)).status_code == 201

    response = await usage_csv(ledger, "group_by=model")
    lines = response.text.splitlines()
    assert lines[0] == "key,bucket_start,requests,prompt_tokens,completion_tokens,quota"
    # Every cell that starts like a formula is quoted and begins with a single quote, so no line starts one.
    assert all(line.startswith("\"'") for line in lines[1:]), response.text
    keys = [row["key"] for row in csv.DictReader(io.StringIO(response.text))]
    assert sorted(keys) == sorted("'" + model for model in FORMULAS)


async def test_negative_numbers_stay_numbers(ledger: LedgerClient) -> None:
    """A charge reversed after `from` counts only its reversal: -1 request, -150 quota, written as numbers."""
    await ledger.fund(1, 1000)
    await ledger.token(1, 1)
    rid = unique()
    consumption = {"request_id": rid, "user_id": 1, "token_id": 1, "channel_id": 1, "model": "gpt-4o",
                   "prompt_tokens": 10, "completion_tokens": 1, "quota": 150}  # fmt: skip
    assert (await ledger.post("/v1/consumptions", consumption)).status_code == 201
    entry = (await ledger.get(f"/v1/holds/{rid}", as_="admin")).json()["entries"][0]
    reversed_ = await ledger.post(f"/v1/entries/{entry['id']}/reverse", {"reference": unique("rev")}, as_="admin")
    assert reversed_.status_code == 201, reversed_.text

    after = datetime.fromisoformat(entry["created_at"]) + timedelta(microseconds=1)
    query = "group_by=channel&from=" + after.isoformat().replace("+00:00", "Z")
    response = await usage_csv(ledger, query)
    assert response.text.splitlines()[1] == "1,,-1,-10,-1,-150"
