"""The console's sessions, CSRF checks and security headers, on the HTTP side.

- The session cookie (`ledger_console`) holds a random secret; the database holds its SHA-256. HttpOnly, SameSite
  Strict, Path /console, Secure when the request came over https (uvicorn takes the scheme from a trusted proxy's
  X-Forwarded-Proto), Max-Age LEDGER_CONSOLE_SESSION_SECONDS.
- Every POST form carries the session's CSRF token in a hidden field, compared in constant time. The sign-in form,
  before there is a session, carries a token that must equal a short-lived cookie of its own (double submit), and a
  cross-site Origin or Sec-Fetch-Site is refused outright.
- Every console response gets the headers in `SECURITY_HEADERS`.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request
from litestar.datastructures import Cookie
from litestar.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "ledger_console"
SIGN_IN_COOKIE = "ledger_console_signin"
SIGN_IN_COOKIE_SECONDS = 900
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"

SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "cross-origin-opener-policy": "same-origin",
}


def security_headers_middleware(app: ASGIApp) -> ASGIApp:
    """Set the console's security headers on every response it sends (pages, redirects, errors, downloads)."""
    encoded = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
    names = {name for name, _ in encoded}

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if bytes(k).lower() not in names]
                message["headers"] = headers + encoded
            await send(message)

        await app(scope, receive, sending)

    return middleware


def is_https(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https"


def session_cookie(request: Request[Any, Any, Any], secret: str, seconds: int) -> Cookie:
    return Cookie(
        key=SESSION_COOKIE,
        value=secret,
        path=COOKIE_PATH,
        max_age=seconds,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def sign_in_cookie(request: Request[Any, Any, Any], token: str) -> Cookie:
    return Cookie(
        key=SIGN_IN_COOKIE,
        value=token,
        path=COOKIE_PATH,
        max_age=SIGN_IN_COOKIE_SECONDS,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def expired_cookie(request: Request[Any, Any, Any], key: str) -> Cookie:
    return Cookie(
        key=key, value="", path=COOKIE_PATH, max_age=0, httponly=True, samesite="strict", secure=is_https(request)
    )


def same_token(sent: object, expected: str) -> bool:
    """Constant-time comparison of a submitted token with the expected one."""
    if not isinstance(sent, str) or not sent or not expected:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def cross_site(request: Request[Any, Any, Any]) -> bool:
    """Whether the browser says the request came from another site.

    Sec-Fetch-Site, which no page can set, decides when it is there. Otherwise an Origin naming another site is
    refused. `Origin: null` says nothing: it is what a browser sends for its own form under `Referrer-Policy:
    no-referrer` (the console's), so it is left to the double-submit token, whose SameSite=Strict cookie a page on
    another site can neither read nor have sent.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return False
    host = request.headers.get("host", "")
    return origin.lower() != f"{request.url.scheme}://{host}".lower()
