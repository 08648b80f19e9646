"""Provider files over HTTP and the CLI: uploads (once per file), malformed files, roles, body limits, concurrency,
the channel map and provider prices. Real PostgreSQL, real server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger_service.settings import Settings
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
from tests.support import ADMIN_SECRET, LedgerClient, assert_problem

MAX_BODY = 2048
MAX_UPLOAD = 256 * 1024


@pytest.fixture
def settings(database_url: str) -> Settings:
    """The usual test settings, with a small global body limit and a larger one for uploads."""
    return Settings(
        database_url=database_url,
        admin_key=ADMIN_SECRET,
        background_tasks=False,
        pool_size=20,
        max_body_bytes=MAX_BODY,
        max_upload_bytes=MAX_UPLOAD,
    )


def usage_file(**fields: Any) -> bytes:
    return encode(openai_page([[openai_usage_result(**fields), openai_usage_result(api_key_id="key_other")]]))


async def upload_raw(
    ledger: LedgerClient,
    content: bytes,
    query: str,
    *,
    as_: str | None = "admin",
    content_type: str = "application/json",
) -> httpx.Response:
    headers = {**ledger.headers(as_), "Content-Type": content_type}
    return await ledger.client.post(f"/v1/external/uploads?{query}", content=content, headers=headers)


async def upload_form(
    ledger: LedgerClient, content: bytes, fields: dict[str, str], *, filename: str = "usage.json"
) -> httpx.Response:
    files = {"file": (filename, content, "application/octet-stream")}
    return await ledger.client.post("/v1/external/uploads", data=fields, files=files, headers=ledger.headers("admin"))


async def stored(ledger: LedgerClient) -> tuple[int, int]:
    uploads = await ledger.count("SELECT count(*) FROM external_uploads")
    records = await ledger.count("SELECT count(*) FROM external_records")
    return uploads, records


async def test_an_upload_is_stored_once_with_its_records(ledger: LedgerClient) -> None:
    content = usage_file(input_tokens=5000, cached=4000)
    first = await upload_raw(ledger, content, "source=openai_usage&channel_id=7&filename=nov.json")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body == {
        "upload_id": body["upload_id"],
        "records": 2,
        "source": "openai_usage",
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    again = await upload_raw(ledger, content, "source=openai_usage")
    assert again.status_code == 200, again.text
    assert again.json() == body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await stored(ledger) == (1, 2)

    row = await ledger.conn.fetchrow("SELECT * FROM external_uploads")
    assert row is not None
    assert bytes(row["content"]) == content
    assert (row["filename"], row["channel_id"], row["records"], row["source"]) == ("nov.json", 7, 2, "openai_usage")
    admin_id = await ledger.conn.fetchval("SELECT id FROM api_keys WHERE role = 'admin' ORDER BY id LIMIT 1")
    assert row["uploaded_by"] == admin_id
    record = await ledger.conn.fetchrow("SELECT * FROM external_records WHERE line = 1")
    assert record is not None
    assert (record["input_tokens"], record["cached_tokens"], record["api_key_id"]) == (5000, 4000, "key_abc")


async def test_the_same_bytes_under_another_source_are_a_conflict(ledger: LedgerClient) -> None:
    content = usage_file()
    assert (await upload_raw(ledger, content, "source=openai_usage")).status_code == 201
    problem = assert_problem(await upload_raw(ledger, content, "source=csv"), 409, "upload_conflict")
    assert "openai_usage" in problem["detail"]
    assert await stored(ledger) == (1, 2)


async def test_a_malformed_file_stores_nothing_and_names_its_first_bad_field(ledger: LedgerClient) -> None:
    bad = encode(openai_page([[openai_usage_result()], [openai_usage_result(), openai_usage_result(input_tokens=-3)]]))
    problem = assert_problem(await upload_raw(ledger, bad, "source=openai_usage"), 400, "validation_error")
    assert problem["detail"] == (
        "openai_usage file: data[1].results[1].input_tokens: expected a non-negative integer (at most 10^15), got -3"
    )
    csv_bad = csv_file(["2026-11-01,1,gpt-4o,1,1,1,0", "2026-11-01,1,gpt-4o,-3,1,1,0"])
    problem = assert_problem(
        await upload_raw(ledger, csv_bad, "source=csv", content_type="text/csv"), 400, "validation_error"
    )
    assert 'line 3: input_tokens: expected a non-negative integer (at most 10^15), got "-3"' in problem["detail"]
    assert await stored(ledger) == (0, 0)


async def test_multipart_and_raw_bodies_of_every_source(ledger: LedgerClient) -> None:
    files = {
        "openai_usage": json_lines([openai_page([[openai_usage_result()]]), openai_page([[openai_usage_result()]])]),
        "openai_costs": encode(openai_page([[openai_cost_result("0.06"), openai_cost_result("1.25")]])),
        "anthropic_usage": encode(anthropic_page([[anthropic_usage_result()]])),
        "anthropic_costs": encode(anthropic_page([[anthropic_cost_result("123.45")]])),
        "csv": csv_file(["2026-11-01,3,gpt-4o,100,20,2,0.5"]),
    }
    for n, (source, content) in enumerate(files.items()):
        if n % 2:
            response = await upload_form(ledger, content, {"source": source, "channel_id": "5"}, filename=f"{source}.x")
        else:
            response = await upload_raw(ledger, content, f"source={source}", content_type="application/octet-stream")
        assert response.status_code == 201, (source, response.text)
        assert response.json()["source"] == source
    rows = await ledger.conn.fetch("SELECT source, filename, channel_id, records FROM external_uploads ORDER BY id")
    assert [tuple(row) for row in rows] == [
        ("openai_usage", None, None, 2),
        ("openai_costs", "openai_costs.x", 5, 2),
        ("anthropic_usage", None, None, 1),
        ("anthropic_costs", "anthropic_costs.x", 5, 1),
        ("csv", None, None, 1),
    ]
    costs = await ledger.conn.fetch("SELECT cost_usd::text FROM external_records WHERE cost_usd IS NOT NULL ORDER BY 1")
    assert sorted(row[0] for row in costs) == sorted(["0.06", "1.25", "1.2345", "0.5"])


async def test_upload_requests_that_are_refused(ledger: LedgerClient) -> None:
    content = usage_file()
    assert_problem(await upload_raw(ledger, content, "source=openai_usage", as_=None), 401, "unauthorized")
    assert_problem(await upload_raw(ledger, content, "source=openai_usage", as_="relay"), 403, "forbidden")
    assert_problem(await upload_raw(ledger, content, "source=openai_usage", as_="auditor"), 403, "forbidden")
    assert_problem(await upload_raw(ledger, content, "source=nonsense"), 400, "validation_error")
    assert_problem(await upload_raw(ledger, content, ""), 400, "validation_error")  # no source
    assert_problem(await upload_raw(ledger, content, "source=csv&colour=red"), 400, "validation_error")
    assert_problem(await upload_raw(ledger, content, "source=openai_usage&channel_id=0"), 400, "validation_error")
    no_file = await ledger.client.post(
        "/v1/external/uploads", data={"source": "csv"}, files={"other": ("x", b"1")}, headers=ledger.headers("admin")
    )
    assert_problem(no_file, 400, "validation_error")
    assert await stored(ledger) == (0, 0)


async def test_the_upload_route_has_its_own_body_limit(ledger: LedgerClient) -> None:
    rows = [f"2026-11-01,1,gpt-4o,{n},1,1,0.{n}" for n in range(1, 400)]
    content = csv_file(rows)
    assert MAX_BODY < len(content) < MAX_UPLOAD  # over the global limit, under the upload limit
    response = await upload_raw(ledger, content, "source=csv", content_type="text/csv")
    assert response.status_code == 201, response.text
    assert response.json()["records"] == 399

    too_big = csv_file([f"2026-11-01,1,gpt-4o,{n},1,1,0" for n in range(1, 12000)])
    assert len(too_big) > MAX_UPLOAD
    assert_problem(await upload_raw(ledger, too_big, "source=csv", content_type="text/csv"), 413, "payload_too_large")
    multipart = await ledger.client.post(
        "/v1/external/uploads",
        data={"source": "csv"},
        files={"file": ("big.csv", too_big, "text/csv")},
        headers=ledger.headers("admin"),
    )
    assert_problem(multipart, 413, "payload_too_large")
    # Every other route keeps the global limit.
    padded = {"input_usd_per_mtok": "2.5", "output_usd_per_mtok": "10", "pad": "x" * MAX_BODY}
    assert_problem(await ledger.put("/v1/external/provider-prices/gpt-4o", padded, as_="admin"), 413)
    assert await stored(ledger) == (1, 399)


async def test_a_file_of_many_records_is_stored_whole(ledger: LedgerClient) -> None:
    content = csv_file([f"2026-11-01,1,m,{n},1,1,0" for n in range(6001)])  # over one executemany's 5000
    assert len(content) < MAX_UPLOAD
    response = await upload_raw(ledger, content, "source=csv", content_type="text/csv")
    assert response.status_code == 201, response.text
    assert response.json()["records"] == 6001
    total = await ledger.conn.fetchrow("SELECT count(*), sum(input_tokens), max(line) FROM external_records")
    assert total is not None
    assert tuple(total) == (6001, sum(range(6001)), 6002)  # CSV lines: the header is line 1


async def test_two_identical_uploads_at_once_store_one(ledger: LedgerClient) -> None:
    for attempt in range(3):
        content = csv_file([f"2026-11-0{attempt + 1},1,gpt-4o,{n},1,1,0.1" for n in range(1, 200)])
        responses = await asyncio.gather(
            *(upload_raw(ledger, content, "source=csv", content_type="text/csv") for _ in range(2))
        )
        assert sorted(response.status_code for response in responses) == [200, 201], [r.text for r in responses]
        assert len({response.json()["upload_id"] for response in responses}) == 1
    assert await stored(ledger) == (3, 3 * 199)


async def test_uploads_are_listed_newest_first_and_read_with_their_records(ledger: LedgerClient) -> None:
    ids = []
    for day in range(1, 4):
        content = csv_file([f"2026-11-0{day},1,gpt-4o,10,1,1,0.000000000000000000001", f"2026-11-0{day},2,o3,5,1,1,"])
        ids.append((await upload_raw(ledger, content, "source=csv", content_type="text/csv")).json()["upload_id"])
    page = (await ledger.get("/v1/external/uploads?limit=2", as_="auditor")).json()
    assert [item["id"] for item in page["items"]] == [ids[2], ids[1]]
    rest = (await ledger.get(f"/v1/external/uploads?limit=2&cursor={page['next_cursor']}", as_="auditor")).json()
    assert [item["id"] for item in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None
    assert_problem(await ledger.get("/v1/external/uploads", as_="relay"), 403, "forbidden")
    assert_problem(await ledger.get("/v1/external/uploads?cursor=bogus", as_="auditor"), 400, "validation_error")

    detail = (await ledger.get(f"/v1/external/uploads/{ids[0]}?limit=1", as_="auditor")).json()
    assert (detail["id"], detail["records"], detail["source"]) == (ids[0], 2, "csv")
    [first] = detail["items"]
    assert (first["line"], first["channel_id"], first["model"]) == (2, 1, "gpt-4o")
    assert first["cost_usd"] == "0.000000000000000000001"
    assert first["raw"] == {
        "date": "2026-11-01",
        "channel": "1",
        "model": "gpt-4o",
        "input_tokens": "10",
        "output_tokens": "1",
        "requests": "1",
        "cost_usd": "0.000000000000000000001",
    }
    more = (await ledger.get(f"/v1/external/uploads/{ids[0]}?cursor={detail['next_cursor']}", as_="auditor")).json()
    assert [(item["line"], item["cost_usd"]) for item in more["items"]] == [(3, None)]
    assert_problem(await ledger.get("/v1/external/uploads/999999", as_="auditor"), 404, "upload_not_found")


async def test_the_channel_map_decides_a_records_channel(ledger: LedgerClient) -> None:
    content = encode(
        openai_page(
            [
                [
                    openai_usage_result(api_key_id="key_mapped", project_id="proj_mapped"),
                    openai_usage_result(api_key_id="key_unmapped", project_id="proj_mapped"),
                    openai_usage_result(api_key_id="key_unmapped", project_id="proj_unmapped"),
                ]
            ]
        )
    )
    upload_id = (await upload_raw(ledger, content, "source=openai_usage&channel_id=9")).json()["upload_id"]
    first = await ledger.put("/v1/external/channel-map/openai_usage/key_mapped", {"channel_id": 1}, as_="admin")
    assert first.status_code == 201, first.text
    assert first.json() == {
        "source": "openai_usage",
        "external_key": "key_mapped",
        "channel_id": 1,
        "updated_at": first.json()["updated_at"],
    }
    assert first.json()["updated_at"].endswith(("Z", "+00:00"))
    assert (
        await ledger.put("/v1/external/channel-map/openai_usage/proj_mapped", {"channel_id": 3}, as_="admin")
    ).status_code == 201
    # Another source's entry does not apply.
    assert (
        await ledger.put("/v1/external/channel-map/openai_costs/proj_unmapped", {"channel_id": 4}, as_="admin")
    ).status_code == 201
    detail = (await ledger.get(f"/v1/external/uploads/{upload_id}", as_="auditor")).json()
    assert [item["channel_id"] for item in detail["items"]] == [1, 3, 9]
    # Changed: 200, and the records follow the map as it is now.
    changed = await ledger.put("/v1/external/channel-map/openai_usage/key_mapped", {"channel_id": 2}, as_="admin")
    assert changed.status_code == 200
    detail = (await ledger.get(f"/v1/external/uploads/{upload_id}", as_="auditor")).json()
    assert [item["channel_id"] for item in detail["items"]] == [2, 3, 9]

    listing = (await ledger.get("/v1/external/channel-map", as_="auditor")).json()
    assert [(e["source"], e["external_key"], e["channel_id"]) for e in listing["items"]] == [
        ("openai_costs", "proj_unmapped", 4),
        ("openai_usage", "key_mapped", 2),
        ("openai_usage", "proj_mapped", 3),
    ]
    assert all(entry["updated_at"] for entry in listing["items"])
    refused = [
        (await ledger.put("/v1/external/channel-map/openai_usage/k", {"channel_id": 1}, as_="auditor"), 403),
        (await ledger.put("/v1/external/channel-map/nonsense/k", {"channel_id": 1}, as_="admin"), 400),
        (await ledger.put("/v1/external/channel-map/csv/k", {"channel_id": 0}, as_="admin"), 400),
        (await ledger.put("/v1/external/channel-map/csv/k", {"channel_id": "1"}, as_="admin"), 400),
        (await ledger.get("/v1/external/channel-map", as_="relay"), 403),
    ]
    for response, status in refused:
        assert_problem(response, status)


async def test_provider_prices_are_kept_exactly(ledger: LedgerClient) -> None:
    body = {
        "input_usd_per_mtok": "2.5",
        "output_usd_per_mtok": 10,
        "cached_input_usd_per_mtok": "1.25000000000000000001",
    }
    first = await ledger.put("/v1/external/provider-prices/openai/gpt-4o", body, as_="admin")
    assert first.status_code == 201, first.text
    assert first.json() == {
        "model": "openai/gpt-4o",
        "input_usd_per_mtok": "2.5",
        "output_usd_per_mtok": "10",
        "cached_input_usd_per_mtok": "1.25000000000000000001",
        "request_usd": "0",
        "updated_at": first.json()["updated_at"],
    }
    assert first.json()["updated_at"] is not None
    raw_body = b'{"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6, "request_usd": 0.0001}'
    headers = {**ledger.headers("admin"), "Content-Type": "application/json"}
    second = await ledger.client.put("/v1/external/provider-prices/gpt-4o-mini", content=raw_body, headers=headers)
    assert second.status_code == 201, second.text
    again = await ledger.client.put("/v1/external/provider-prices/gpt-4o-mini", content=raw_body, headers=headers)
    assert again.status_code == 200
    stored_row = await ledger.conn.fetchrow(
        "SELECT input_usd_per_mtok::text, output_usd_per_mtok::text, cached_input_usd_per_mtok, request_usd::text"
        " FROM provider_prices WHERE model = 'gpt-4o-mini'"
    )
    assert stored_row is not None
    assert tuple(stored_row) == ("0.15", "0.6", None, "0.0001")
    listing = (await ledger.get("/v1/external/provider-prices", as_="auditor")).json()
    assert [item["model"] for item in listing["items"]] == ["gpt-4o-mini", "openai/gpt-4o"]
    assert listing["items"][1]["cached_input_usd_per_mtok"] == "1.25000000000000000001"
    refused = [
        (await ledger.put("/v1/external/provider-prices/m", {"input_usd_per_mtok": "1"}, as_="admin"), 400),
        (await ledger.put("/v1/external/provider-prices/m", {**body, "input_usd_per_mtok": "-1"}, as_="admin"), 400),
        (await ledger.put("/v1/external/provider-prices/m", {**body, "input_usd_per_mtok": "2_5"}, as_="admin"), 400),
        (await ledger.put("/v1/external/provider-prices/m", {**body, "colour": 1}, as_="admin"), 400),
        (await ledger.put("/v1/external/provider-prices/m", body, as_="auditor"), 403),
        (await ledger.get("/v1/external/provider-prices", as_="relay"), 403),
    ]
    for response, status in refused:
        assert_problem(response, status)


# The CLI -----------------------------------------------------------------------------------------------------


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "ledger_service", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_cli_uploads_once_and_refuses_a_bad_file_in_one_line(
    ledger: LedgerClient, database_url: str, tmp_path: Path
) -> None:
    good = tmp_path / "usage.jsonl"
    good.write_bytes(json_lines([openai_page([[openai_usage_result()]]), openai_page([[openai_usage_result()]])]))
    digest = hashlib.sha256(good.read_bytes()).hexdigest()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("external", "upload", *args, LEDGER_DATABASE_URL=database_url)

    first = await asyncio.to_thread(cli, str(good), "--source", "openai_usage", "--channel", "4")
    assert first.returncode == 0, first.stderr
    upload_id = await ledger.conn.fetchval("SELECT id FROM external_uploads")
    assert first.stdout == f"upload {upload_id}: 2 records (openai_usage, sha256 {digest})\n"
    again = await asyncio.to_thread(cli, str(good), "--source", "openai_usage")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"already uploaded as upload {upload_id}:")
    row = await ledger.conn.fetchrow("SELECT filename, channel_id, uploaded_by FROM external_uploads")
    assert row is not None
    assert tuple(row) == ("usage.jsonl", 4, None)

    bad = tmp_path / "bad.csv"
    bad.write_bytes(csv_file(["2026-11-01,1,gpt-4o,1,1,1,0", "2026-11-01,1,gpt-4o,-3,1,1,0"]))
    failures = [
        (await asyncio.to_thread(cli, str(bad), "--source", "csv"), "line 3: input_tokens"),
        (await asyncio.to_thread(cli, str(tmp_path / "missing.json"), "--source", "csv"), "cannot read"),
        (await asyncio.to_thread(cli, str(good), "--source", "csv"), "already uploaded as upload"),
        (await asyncio.to_thread(cli, str(good), "--source", "nonsense"), "invalid choice"),
        (await asyncio.to_thread(cli, str(good)), "--source"),
        (await asyncio.to_thread(cli, str(good), "--source", "csv", "--channel", "0"), "--channel"),
    ]
    for result, expected in failures:
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1, result.stderr
        assert expected in result.stderr, result.stderr
        assert result.stderr.startswith("ledger-service external upload: ")
    assert await ledger.count("SELECT count(*) FROM external_uploads") == 1
