"""ASGI middleware: one structured access-log line and the HTTP metrics per request; and the `/v1` before-request
hook: the key check (api/auth.py), then unknown query parameters and non-JSON bodies refused."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any
from urllib.parse import unquote_to_bytes

from litestar import Request
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send
from prometheus_client import Gauge

from ledger_service import metrics
from ledger_service.api.auth import require_role
from ledger_service.api.problems import CLIENT_GONE
from ledger_service.domain import errors
from ledger_service.observability import HTTP_METHODS, log_request, request_id_var

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_APP_NAME = "ledger"
_UNMEASURED = frozenset({"/metrics"})
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class _RouteMetrics:
    """The metric series of one (method, route, status): looked up once, not on every request."""

    def __init__(self, method: str, route: str, status: int) -> None:
        labels = (_APP_NAME, method, route, str(status))
        self.requests = metrics.HTTP_REQUESTS.labels(*labels)
        self.duration = metrics.HTTP_DURATION.labels(*labels)
        self.errors = metrics.HTTP_ERRORS.labels(*labels) if status >= 500 else None


_route_metrics: dict[tuple[str, str, int], _RouteMetrics] = {}
_in_progress: dict[tuple[str, str], Gauge] = {}


def _record(method: str, route: str, status: int, seconds: float) -> None:
    key = (method, route, status)
    series = _route_metrics.get(key)
    if series is None:
        series = _route_metrics[key] = _RouteMetrics(method, route, status)
    series.requests.inc()
    series.duration.observe(seconds)
    if series.errors is not None:
        series.errors.inc()


class _ResponseStatus:
    """The `send` of a request, noting the status of its response on the way: 500 until a response starts (an
    exception with nothing sent yet is answered 500 by the server)."""

    __slots__ = ("send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        await self.send(message)


_LOGGED = "ledger_access_logged"
"""Set in a request's scope state once access_log_middleware has taken the request (unrouted_middleware's cue)."""


def access_log_middleware(app: ASGIApp) -> ASGIApp:
    """Log each request and record its metrics, by route template (not path: one series per route)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id_var.set(None)
        scope.setdefault("state", {})[_LOGGED] = True
        method = str(scope.get("method", ""))
        route = str(scope.get("path_template") or "unmatched")
        gauge: Gauge | None = None
        if route not in _UNMEASURED:
            gauge = _in_progress.get((method, route))
            if gauge is None:
                gauge = _in_progress[(method, route)] = metrics.HTTP_IN_PROGRESS.labels(_APP_NAME, method, route)
            gauge.inc()

        state = scope["state"]

        async def receiving() -> ReceiveMessage:
            message = await receive()
            if message["type"] == "http.disconnect":
                state[CLIENT_GONE] = True  # the hang-up Litestar raises as a 500 is answered 499 (api/problems.py)
            return message

        response = _ResponseStatus(send)
        try:
            await app(scope, receiving, response)
        finally:
            if gauge is not None:
                gauge.dec()
                _record(method, route, response.status, time.perf_counter() - started)
            principal = scope.get("state", {}).get("principal")
            log_request(method, route, response.status, started, getattr(principal, "key_id", None))

    return middleware


def unrouted_middleware(app: ASGIApp) -> ASGIApp:
    """Log and count the requests no route took, as route `unmatched`: an unknown path (404) or a method the path
    does not serve (405). Litestar runs app middleware around route handlers only, so these never reach
    access_log_middleware; this one wraps the whole app (create_app), and leaves every other request to it."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id_var.set(None)  # no route will bind one: a line must not carry an earlier call's

        response = _ResponseStatus(send)
        try:
            await app(scope, receive, response)
        finally:
            if not scope.get("state", {}).get(_LOGGED):
                method = str(scope.get("method", ""))
                # Any method reaches here, not only the ones a route serves: a label per unknown method would
                # grow the series without bound (and publish whatever the client sent) on the open /metrics.
                label = method if method in HTTP_METHODS else "OTHER"
                _record(label, "unmatched", response.status, time.perf_counter() - started)
                log_request(method, "unmatched", response.status, started, None)  # which redacts an unknown method

    return middleware


async def admit_request(request: Request[Any, Any, Any]) -> None:
    """The `/v1` routes' before-request hook: who calls and whether its role may (401, 429, 403), then the shape of
    the request (400, 415), all before the body is read."""
    await require_role(request)
    await check_request(request)


async def check_request(request: Request[Any, Any, Any]) -> None:
    """Before any parsing: refuse query parameters the route does not take or that are repeated (400), and bodies
    not sent as JSON (415).

    Routes list the query parameters they take in `opt["query"]`; an unknown one is refused like an unknown field
    of a body, rather than silently ignored (a misspelt filter would otherwise widen an audit query unnoticed).
    """
    check_path_encoding(request.scope.get("raw_path") or b"")
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = set(names) - request.route_handler.opt.get("query", frozenset())
    if unknown:
        raise errors.ValidationFailed(f"unknown query parameters: {', '.join(sorted(unknown))}")
    if len(names) != len(set(names)):  # `?user_id=42&user_id=43`: which one a hop reads is up to it
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        raise errors.ValidationFailed(f"repeated query parameters: {', '.join(repeated)}")
    if request.method not in _BODY_METHODS:
        return
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if not chunked and (length is None or length.strip() == "0"):
        return
    if request.route_handler.opt.get("any_body"):  # a provider file upload: multipart, JSON or CSV as it came
        return
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
        return
    raise errors.UnsupportedMediaType(
        f"the body was sent as {media_type or 'no content type'}; send JSON with Content-Type: application/json"
    )


def check_path_encoding(raw_path: bytes) -> None:
    """Refuse a path whose percent-encoding is broken (`%zz`) or does not encode UTF-8 (`%E9`): the server decodes
    such a path anyway, leaving `%zz` as it is and turning `%E9` into U+FFFD, so a path parameter would be a name
    nobody sent."""
    if b"%" not in raw_path:
        return
    try:
        if _BAD_PERCENT.search(raw_path):
            raise ValueError
        unquote_to_bytes(raw_path).decode("utf-8")
    except ValueError:  # UnicodeDecodeError is one
        raise errors.ValidationFailed("the path's percent-encoding is not valid UTF-8 (%XX escapes)") from None
