"""The auditors' web console over HTTP: sessions and their cookie, CSRF, expiry, revoked keys, roles, headers, logs,
and the pages (request lookup, statements and their CSV, errors as pages). The browser tests are tests/browser/."""

from __future__ import annotations

import csv
import io
import logging
import re
from datetime import UTC, datetime

import httpx
import pytest
from litestar import Litestar

from ledger_service.api.console.security import SESSION_COOKIE, SIGN_IN_COOKIE
from ledger_service.db.transactions import DatabaseUnavailable
from tests.console_support import a_reconciliation_run, a_settled_request, form_token, sign_in, signed_in
from tests.support import LedgerClient

HTML = "text/html"


def set_cookie(response: httpx.Response, name: str) -> str:
    found = [value for value in response.headers.get_list("set-cookie") if value.startswith(f"{name}=")]
    assert len(found) == 1, response.headers.get_list("set-cookie")
    return found[0]


def assert_security_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


async def test_an_auditor_signs_in_and_gets_a_strict_httponly_session_cookie(ledger: LedgerClient) -> None:
    client = ledger.client
    response = await sign_in(client, ledger.keys["auditor"])
    assert response.status_code == 303
    assert response.headers["location"] == "/console"
    cookie = set_cookie(response, SESSION_COOKIE).lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/console" in cookie
    assert "max-age=3600" in cookie
    assert "secure" not in cookie  # plain http here; see the next test
    secret = client.cookies.get(SESSION_COOKIE)
    assert secret
    assert await ledger.count("SELECT count(*) FROM console_sessions") == 1
    stored = await ledger.conn.fetchval("SELECT encode(secret_hash, 'hex') FROM console_sessions")
    assert secret not in stored
    assert len(stored) == 64
    overview = await client.get("/console")
    assert overview.status_code == 200
    assert overview.headers["content-type"].startswith(HTML)
    assert "Overview" in overview.text
    assert "test auditor" in overview.text


async def test_the_cookie_is_secure_when_the_request_came_over_https(ledger: LedgerClient) -> None:
    # uvicorn takes the scheme from X-Forwarded-Proto of a trusted proxy (loopback by default), as behind TLS.
    client = ledger.client
    https = {"X-Forwarded-Proto": "https"}
    form = await client.get("/console/sign-in", headers=https)
    assert "secure" in set_cookie(form, SIGN_IN_COOKIE).lower()
    # A Secure cookie goes back over https only: the proxy's leg is plain http, so it is sent here by hand.
    token_cookie = set_cookie(form, SIGN_IN_COOKIE).split(";")[0]
    client.cookies.clear()
    response = await client.post(
        "/console/sign-in",
        data={"csrf_token": form_token(form.text), "api_key": ledger.keys["auditor"]},
        headers={**https, "Cookie": token_cookie},
    )
    assert response.status_code == 303
    assert "; secure" in set_cookie(response, SESSION_COOKIE).lower()


async def test_an_admin_signs_in_and_a_relay_key_or_a_wrong_key_does_not(ledger: LedgerClient) -> None:
    for key in (ledger.keys["relay"], "lsk_not-a-key-at-all", ""):
        async with httpx.AsyncClient(base_url=ledger.client.base_url) as other:
            refused = await sign_in(other, key)
            assert refused.status_code == 401, refused.text
            assert "was not accepted" in refused.text
            if key:
                assert key not in refused.text  # never echoed
            assert SESSION_COOKIE not in other.cookies
    async with httpx.AsyncClient(base_url=ledger.client.base_url) as admin:
        assert (await sign_in(admin, ledger.keys["admin"])).status_code == 303


async def test_pages_without_a_session_send_to_the_sign_in_page(ledger: LedgerClient) -> None:
    for path in ("/console", "/console/requests?request_id=x", "/console/statement?address=user:1"):
        response = await ledger.client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/console/sign-in"
        assert_security_headers(response)
    forged = await ledger.client.get("/console", headers={"Cookie": f"{SESSION_COOKIE}=made-up"})
    assert forged.status_code == 303


async def test_sign_out_ends_the_session(ledger: LedgerClient) -> None:
    client = ledger.client
    token = await signed_in(client, ledger.keys["auditor"])
    secret = client.cookies.get(SESSION_COOKIE)
    out = await client.post("/console/sign-out", data={"csrf_token": token})
    assert out.status_code == 303
    assert out.headers["location"] == "/console/sign-in"
    assert "max-age=0" in set_cookie(out, SESSION_COOKIE).lower()
    assert await ledger.count("SELECT count(*) FROM console_sessions WHERE ended_at IS NOT NULL") == 1
    again = await client.get("/console", headers={"Cookie": f"{SESSION_COOKIE}={secret}"})
    assert again.status_code == 303


async def test_an_expired_session_sends_to_the_sign_in_page(ledger: LedgerClient) -> None:
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    await ledger.conn.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
    response = await client.get("/console")
    assert response.status_code == 303
    assert response.headers["location"] == "/console/sign-in"


async def test_revoking_the_key_ends_its_sessions_at_once(ledger: LedgerClient) -> None:
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    key_id = await ledger.conn.fetchval("SELECT api_key_id FROM console_sessions")
    assert (await ledger.client.delete(f"/v1/api-keys/{key_id}", headers=ledger.headers("admin"))).status_code == 204
    response = await client.get("/console")
    assert response.status_code == 303


async def test_a_post_without_the_sessions_csrf_token_is_refused(ledger: LedgerClient) -> None:
    client = ledger.client
    token = await signed_in(client, ledger.keys["auditor"])
    for data in ({}, {"csrf_token": "wrong"}, {"csrf_token": token[:-1]}):
        refused = await client.post("/console/sign-out", data=data)
        assert refused.status_code == 403, data
        assert refused.headers["content-type"].startswith(HTML)
        assert "Form refused" in refused.text
        assert_security_headers(refused)
    assert await ledger.count("SELECT count(*) FROM console_sessions WHERE ended_at IS NULL") == 1


async def test_the_sign_in_form_is_defended_against_cross_site_posts(ledger: LedgerClient) -> None:
    key = ledger.keys["auditor"]
    async with httpx.AsyncClient(base_url=ledger.client.base_url) as fresh:
        # No sign-in cookie (a page on another site cannot read or set it): refused even with a token.
        no_cookie = await fresh.post("/console/sign-in", data={"csrf_token": "x" * 43, "api_key": key})
        assert no_cookie.status_code == 403
        form = await fresh.get("/console/sign-in")
        token = form_token(form.text)
        own = f"{fresh.base_url.scheme}://{fresh.base_url.netloc.decode()}"
        for headers in (
            {"Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site", "Origin": "null"},
            {"Sec-Fetch-Site": "cross-site", "Origin": own},
        ):
            refused = await fresh.post("/console/sign-in", data={"csrf_token": token, "api_key": key}, headers=headers)
            assert refused.status_code == 403, headers
        wrong = await fresh.post("/console/sign-in", data={"csrf_token": token + "x", "api_key": key})
        assert wrong.status_code == 403
        fine = await fresh.post(
            "/console/sign-in",
            data={"csrf_token": token, "api_key": key},
            headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"},  # Chrome's, under no-referrer
        )
        assert fine.status_code == 303
    assert await ledger.count("SELECT count(*) FROM console_sessions") == 1


async def test_failed_sign_ins_are_limited_per_client(ledger: LedgerClient) -> None:
    for _ in range(10):
        assert (await sign_in(ledger.client, "lsk_wrong")).status_code == 401
    limited = await sign_in(ledger.client, ledger.keys["auditor"])
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    assert SESSION_COOKIE not in ledger.client.cookies


async def test_console_pages_carry_the_security_headers(ledger: LedgerClient) -> None:
    client = ledger.client
    form = await client.get("/console/sign-in")
    assert_security_headers(form)
    await signed_in(client, ledger.keys["auditor"])
    for path in ("/console", "/console/requests", "/console/statement", "/console/requests?request_id=nope"):
        response = await client.get(path)
        assert_security_headers(response)
        assert "<script" not in response.text  # no script at all, so nothing inline for the policy to allow
    css = await client.get("/console/static/console.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


async def test_the_key_and_the_session_secret_are_never_logged(
    ledger: LedgerClient, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    client = ledger.client
    key = ledger.keys["auditor"]
    await sign_in(client, "lsk_" + "w" * 40)
    token = await signed_in(client, key)
    secret = client.cookies.get(SESSION_COOKIE) or ""
    await client.get("/console/requests?request_id=missing")
    await client.post("/console/sign-out", data={"csrf_token": token})
    # Every record the service and its server wrote (the test's own HTTP client logs its requests' headers at DEBUG:
    # that is the browser's side, not the service's).
    records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    written = "".join(f"{r.getMessage()} {r.__dict__}" for r in records) + "".join(capfd.readouterr())
    assert "/console/sign-in" in written  # the access lines are there...
    for secret_text in (key, key[4:], secret, token, "w" * 40):
        assert secret_text not in written  # ...and no secret in them


async def test_request_lookup_shows_the_hold_its_entries_ratios_and_balances(ledger: LedgerClient) -> None:
    request_id = await a_settled_request(ledger)
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    page = await client.get("/console/requests", params={"request_id": request_id})
    assert page.status_code == 200, page.text
    text = page.text
    assert f"Request <code>{request_id}</code>" in text
    assert "settled" in text
    for name in ("model_ratio", "completion_ratio", "group_ratio"):
        assert name in text
    entries = (await ledger.get(f"/v1/holds/{request_id}", as_="admin")).json()["entries"]
    assert [e["kind"] for e in entries] == ["hold", "settle"]
    for entry in entries:
        assert f"Entry {entry['id']}: {entry['kind']}" in text
    # The balance after the settlement of the user's account is its balance now.
    user = (await ledger.get("/v1/users/7")).json()
    settle_table = text.split(f"Entry {entries[1]['id']}: settle")[1]
    rows = re.findall(
        r'address=user%3A7">user:7</a></td>\s*<td class="num">([-\d,]+)</td><td class="num">([-\d,]+)', settle_table
    )
    assert rows, settle_table
    assert int(rows[0][1].replace(",", "")) == user["available"]
    hold_rows = re.findall(
        rf"hold:{request_id}</a></td>\s*<td class=\"num\">([-\d,]+)</td><td class=\"num\">([-\d,]+)", settle_table
    )
    assert all(int(after.replace(",", "")) == 0 for _, after in hold_rows)


async def test_an_unknown_request_id_is_a_404_page_not_an_error(ledger: LedgerClient) -> None:
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    response = await client.get("/console/requests", params={"request_id": "no-such-request"})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(HTML)
    assert "No request with id" in response.text
    bad = await client.get("/console/statement", params={"address": "nonsense"})
    assert bad.status_code == 400
    assert bad.headers["content-type"].startswith(HTML)
    assert "address must be an account" in bad.text


async def test_the_statement_and_its_csv_match_the_api(ledger: LedgerClient) -> None:
    for _ in range(3):
        await a_settled_request(ledger)
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    api = (await ledger.get("/v1/accounts/user:7/postings?limit=1000", as_="auditor")).json()["items"]
    page = await client.get("/console/statement", params={"address": "user:7"})
    assert page.status_code == 200
    assert "Download CSV" in page.text
    download = await client.get("/console/statement.csv", params={"address": "user:7"})
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("text/csv")
    assert 'filename="statement-user_7.csv"' in download.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(download.text)))
    assert [(int(r["entry_id"]), int(r["amount"]), int(r["balance_after"])) for r in rows] == [
        (item["entry_id"], item["amount"], item["balance_after"]) for item in api
    ]
    today = rows[0]["created_at"][:10]
    same_day = await client.get("/console/statement.csv", params={"address": "user:7", "from": today, "to": today})
    assert len(list(csv.DictReader(io.StringIO(same_day.text)))) == len(rows)
    later = await client.get("/console/statement.csv", params={"address": "user:7", "from": "2999-01-01"})
    assert list(csv.DictReader(io.StringIO(later.text))) == []
    earlier = await client.get("/console/statement", params={"address": "user:7", "to": "2000-01-01"})
    assert "No postings in this range." in earlier.text
    backwards = await client.get(
        "/console/statement", params={"address": "user:7", "from": "2020-01-02", "to": "2020-01-01"}
    )
    assert backwards.status_code == 400


async def test_the_statement_pages_with_a_running_balance(ledger: LedgerClient) -> None:
    for _ in range(120):  # 120 top-ups of user:7: two pages of 100
        await ledger.fund(7, 10)
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    first = await client.get("/console/statement", params={"address": "user:7"})
    cursor = re.search(r'cursor=([^"&]+)" rel="next"', first.text)
    assert cursor is not None
    second = await client.get(f"/console/statement?address=user%3A7&cursor={cursor.group(1)}")
    assert second.status_code == 200
    balances = re.findall(r'<td class="num">([-\d,]+)</td></tr>', first.text + second.text)
    assert [int(b.replace(",", "")) for b in balances] == [10 * n for n in range(1, 121)]


async def test_the_overview_shows_counts_and_the_usage_chart(ledger: LedgerClient) -> None:
    await a_settled_request(ledger)
    open_hold = await ledger.hold(request_id="still-open", user_id=7, token_id=70)
    assert open_hold.status_code == 201
    await ledger.backdate("still-open")
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    page = await client.get("/console")
    text = page.text
    assert "<svg" in text
    assert 'role="img"' in text
    assert text.count('<rect class="bar"') == 30
    assert "Usage per day as a table" in text
    assert "1 overdue" in text
    assert "still-open" in text
    assert "None yet" in text  # no external reconciliation


async def test_schema_ui_loads_nothing_from_other_hosts(client: httpx.AsyncClient) -> None:
    page = await client.get("/schema")
    assert page.status_code == 200
    references = re.findall(r'(?:src|href)=["\']([^"\']+)', page.text)
    assert references, page.text
    assert all(ref.startswith("/") for ref in references), references
    assert "cdn." not in page.text
    assert "unpkg" not in page.text
    for ref in references:
        asset = await client.get(ref)
        assert asset.status_code == 200, ref


async def test_runs_and_a_run_side_by_side_with_a_class_filter(ledger: LedgerClient) -> None:
    run_id = await a_reconciliation_run(ledger.conn)
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    listing = await client.get("/console/runs")
    assert listing.status_code == 200
    assert f'href="/console/runs/{run_id}"' in listing.text
    whole = await client.get(f"/console/runs/{run_id}")
    assert whole.status_code == 200
    assert_security_headers(whole)
    for item_id in (1, 2, 3):
        assert f'id="item-{item_id}"' in whole.text
    assert "Output tokens" in whole.text
    assert re.search(
        r"Output tokens</th><td class=\"num\">450</td>\s*<td class=\"num\">500</td>\s*<td class=\"num diff-neg\">-50",
        whole.text,
    )
    differs = await client.get(f"/console/runs/{run_id}", params={"class": "differs"})
    assert 'id="item-2"' in differs.text
    assert 'id="item-1"' not in differs.text
    assert 'id="item-3"' not in differs.text
    assert (await client.get(f"/console/runs/{run_id}", params={"class": "bogus"})).status_code == 400
    missing = await client.get(f"/console/runs/{run_id + 1000}")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith(HTML)


async def test_explaining_a_difference_keeps_the_note_with_its_author(ledger: LedgerClient) -> None:
    run_id = await a_reconciliation_run(ledger.conn)
    client = ledger.client
    token = await signed_in(client, ledger.keys["auditor"])
    url = f"/console/runs/{run_id}/items/2/explain"
    assert (await client.post(url, data={"note": "forged"})).status_code == 403
    assert (await client.post(url, data={"csrf_token": token, "note": "   "})).status_code == 400
    assert (
        await client.post(f"/console/runs/{run_id}/items/99/explain", data={"csrf_token": token, "note": "x"})
    ).status_code == 404
    note = "Provider counted a retried call <twice>"
    done = await client.post(url, data={"csrf_token": token, "note": note, "class": "differs"})
    assert done.status_code == 303
    assert done.headers["location"] == f"/console/runs/{run_id}?class=differs&explained=2#item-2"
    stored = await ledger.conn.fetchrow("SELECT note, author, author_key FROM external_explanations")
    assert stored is not None
    assert stored["note"] == note
    assert stored["author"] == "test auditor"
    page = await client.get(done.headers["location"].split("#")[0])
    assert "Provider counted a retried call &lt;twice&gt;" in page.text  # escaped
    assert "— test auditor" in page.text


async def test_the_margin_page_per_channel_and_month(ledger: LedgerClient) -> None:
    await a_settled_request(ledger)  # channel 3, gpt-4o, charged 750 quota this month
    await a_reconciliation_run(ledger.conn)  # a recorded cost of 0.0005 USD for channel 3, gpt-4o
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    page = await client.get("/console/margin")
    assert page.status_code == 200
    text = page.text
    assert "<td>3</td><td>gpt-4o</td>" in text
    assert "0.001500" in text  # 750 / 500,000 USD
    assert "0.000500" in text
    assert "0.001000" in text  # the margin
    assert (await client.get("/console/margin", params={"month": "2026-13"})).status_code == 400
    empty = await client.get("/console/margin", params={"month": "2001-01"})
    assert "Nothing was charged" in empty.text


async def test_the_statement_csv_carries_no_formula(ledger: LedgerClient) -> None:
    await a_settled_request(ledger, request_id="-2-3")  # a request id a spreadsheet would compute
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    download = await client.get("/console/statement.csv", params={"address": "user:7"})
    assert '"\'-2-3"' in download.text
    assert [row["request_id"] for row in csv.DictReader(io.StringIO(download.text))][-1] == "'-2-3"


async def test_signing_in_again_ends_the_earlier_session(ledger: LedgerClient) -> None:
    await signed_in(ledger.client, ledger.keys["auditor"])
    first = ledger.client.cookies.get(SESSION_COOKIE)
    async with httpx.AsyncClient(base_url=ledger.client.base_url) as browser:
        form = await browser.get("/console/sign-in")
        token = form_token(form.text)
        cookies = f"{SIGN_IN_COOKIE}={browser.cookies.get(SIGN_IN_COOKIE)}; {SESSION_COOKIE}={first}"
        again = await browser.post(
            "/console/sign-in",
            data={"csrf_token": token, "api_key": ledger.keys["admin"]},
            headers={"Cookie": cookies},
        )
        assert again.status_code == 303
    assert await ledger.count("SELECT count(*) FROM console_sessions WHERE ended_at IS NULL") == 1
    stale = await ledger.client.get("/console")
    assert stale.status_code == 303


async def test_the_usage_chart_is_kept_a_minute_and_past_days_longer(ledger: LedgerClient, app: Litestar) -> None:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    row = re.compile(rf'<tr><td>{today}</td><td class="num">([\d,]+)</td><td class="num">([\d,]+)</td></tr>')
    await a_settled_request(ledger)  # 750 quota today
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])
    first = row.search((await client.get("/console")).text)
    assert first is not None
    assert first.groups() == ("1", "750")
    await a_settled_request(ledger, user_id=8, token_id=80)
    kept = row.search((await client.get("/console")).text)
    assert kept is not None
    assert kept.groups() == ("1", "750")  # within the minute: the same chart
    console = app.state.console
    assert len(console._closed) >= 28  # the past days are kept for good (yesterday too, 10 minutes after midnight)
    console._usage = None  # the minute is over
    fresh = row.search((await client.get("/console")).text)
    assert fresh is not None
    assert fresh.groups() == ("2", "1,500")


async def test_a_database_outage_is_a_503_page(
    ledger: LedgerClient, app: Litestar, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = ledger.client
    await signed_in(client, ledger.keys["auditor"])

    async def unreachable(secret: str) -> None:
        raise DatabaseUnavailable("connection refused")

    monkeypatch.setattr(app.state.console, "session", unreachable)
    response = await client.get("/console")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith(HTML)
    assert response.headers["retry-after"] == "2"
    assert "The database is unavailable" in response.text
    assert_security_headers(response)
