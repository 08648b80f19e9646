"""Signing in to the web console over HTTP, as a browser's form would, for the console's tests."""

from __future__ import annotations

import re

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


async def a_settled_request(ledger: LedgerClient, *, user_id: int = 7, token_id: int = 70) -> str:
    """A funded user and a limited token, one hold and its settlement: the request id."""
    await ledger.fund(user_id, 20_000)  # little enough that the trust rule holds the estimate
    await ledger.token(token_id, user_id, remaining=500_000)
    request_id = unique("con")
    response = await ledger.hold(request_id=request_id, user_id=user_id, token_id=token_id, max_tokens=200)
    assert response.status_code == 201, response.text
    settled = await ledger.post(
        f"/v1/holds/{request_id}/settle", {"channel_id": 3, "prompt_tokens": 100, "completion_tokens": 50}
    )
    assert settled.status_code == 200, settled.text
    return request_id
