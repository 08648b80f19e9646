"""What docs/api.md promises about content negotiation, CSV timestamps and encoded slashes, over HTTP."""

from __future__ import annotations

import csv
import io

import pytest

from tests.support import LedgerClient


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("text/csv", "text/csv"),
        ("application/json, text/csv", "application/json"),  # equal q: the type listed first
        ("text/csv, application/json", "text/csv"),
        ("application/json;q=0.5, text/csv", "text/csv"),  # a higher q wins wherever it is listed
        ("text/csv;q=0.5, application/json", "application/json"),
        ("text/csv;q=0", "application/json"),  # q=0: not acceptable
        ("text/*", "text/csv"),
        ("*/*", "application/json"),
        ("text/html", "application/json"),
    ],
)
async def test_the_usage_report_follows_the_accept_q_values(ledger: LedgerClient, accept: str, expected: str) -> None:
    headers = {**ledger.headers("auditor"), "Accept": accept}
    response = await ledger.client.get("/v1/reports/usage", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == expected


async def test_csv_bucket_start_is_written_as_in_json(ledger: LedgerClient) -> None:
    await ledger.fund(1, 1000)
    await ledger.token(1, 1)
    consumption = {"request_id": "c-1", "user_id": 1, "token_id": 1, "channel_id": 1, "model": "gpt-4o",
                   "prompt_tokens": 1, "completion_tokens": 1, "quota": 5}  # fmt: skip
    assert (await ledger.post("/v1/consumptions", consumption)).status_code == 201
    as_json = (await ledger.get("/v1/reports/usage?bucket=day", as_="auditor")).json()["rows"]
    headers = {**ledger.headers("auditor"), "Accept": "text/csv"}
    as_csv = (await ledger.client.get("/v1/reports/usage?bucket=day", headers=headers)).text
    start = next(csv.DictReader(io.StringIO(as_csv)))["bucket_start"]
    assert start == as_json[0]["bucket_start"]
    assert start.endswith("T00:00:00Z")


@pytest.mark.parametrize("path", ["/v1/holds/a%2Fb", "/v1/holds/a%2fb/settle", "/v1/users/1%2F2"])
async def test_an_encoded_slash_in_a_path_parameter_is_a_400(ledger: LedgerClient, path: str) -> None:
    response = await ledger.get(path, as_="admin")
    assert (response.status_code, response.json()["code"]) == (400, "validation_error"), response.text
    assert "%2F" in response.json()["detail"]


async def test_an_encoded_slash_still_works_where_a_route_takes_the_rest_of_the_path(ledger: LedgerClient) -> None:
    response = await ledger.put("/v1/pricing/models/openai%2Fgpt-4o", {"model_ratio": "1"}, as_="admin")
    assert response.status_code == 201, response.text
    assert "openai/gpt-4o" in (await ledger.get("/v1/pricing")).json()["models"]
