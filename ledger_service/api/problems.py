"""RFC 9457 problem responses for every error, with the contract's `code`. No error escapes as a bare 500."""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Response

from ledger_service.db.transactions import DatabaseUnavailable, is_connection_error
from ledger_service.domain.errors import LedgerError
from ledger_service.schemas import ProblemView

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = "2"

_CODES_BY_STATUS = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def _problem_response(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=ProblemView, description=description, media_type=PROBLEM_JSON, generate_examples=False
    )


PROBLEMS: dict[int, ResponseSpec] = {
    400: _problem_response("Invalid input (code validation_error); nothing was written"),
    401: _problem_response("Missing, unknown or revoked API key (code unauthorized)"),
    403: _problem_response(
        "Wrong role (forbidden), or not enough quota (insufficient_user_quota, insufficient_token_quota)"
    ),
    404: _problem_response("No such hold, token, entry or key"),
    409: _problem_response("Conflicts with the current state or an earlier use of the idempotency key"),
    413: _problem_response("The body is larger than LEDGER_MAX_BODY_BYTES"),
    415: _problem_response("The body is not declared as JSON"),
    429: _problem_response(
        "Over the key's rate limit (rate_limited), or too many heavy reports at once (busy); see Retry-After"
    ),
    503: _problem_response("The database is unavailable or busy; retry after Retry-After"),
}
"""Every problem a /v1 route can answer with, for the OpenAPI schema."""


def replayed(view: type) -> dict[int, ResponseSpec]:
    """PROBLEMS plus the 200 of a replayed create (an idempotent repeat of the same call)."""
    spec = ResponseSpec(
        data_container=view,
        description="The same call again: the original result, with `Idempotent-Replayed: true`",
        generate_examples=False,
    )
    return {**PROBLEMS, 200: spec}


def created(view: type) -> dict[int, ResponseSpec]:
    """PROBLEMS plus the 201 of a PUT that created what it names (200 when it updated it)."""
    return {**PROBLEMS, 201: ResponseSpec(data_container=view, description="Created", generate_examples=False)}


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> Response[ProblemView]:
    return Response(
        ProblemView(type=f"urn:ledger:problem:{code}", title=title, status=status, detail=detail, code=code),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _validation_detail(error: ValidationException) -> str:
    parts = []
    for item in error.extra if isinstance(error.extra, list) else []:
        if isinstance(item, dict):
            key, message = item.get("key"), item.get("message")
            if key == "data" and message == "'data'":
                message = "a JSON body is required"  # Litestar's wording when the body is missing
            parts.append(f"{key}: {message}" if key and key != "data" else str(message))
    return "; ".join(parts) or str(error.detail)


CLIENT_GONE = "ledger_client_gone"
"""Set in a request's scope state when the client hung up while the request was read (api/middleware.py)."""

CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that closed the connection before it was answered: no one reads the answer, and
it is the client's doing, not the service's (a 500 would page the "500 = a bug" alarm)."""


def handle_exception(request: Request[Any, Any, Any], error: Exception) -> Response[ProblemView]:
    if request.scope.get("state", {}).get(CLIENT_GONE):  # Litestar reports the hang-up as a 500 HTTPException
        log.info("client closed the connection during %s %s", request.method, request.url.path)
        return problem(CLIENT_CLOSED_REQUEST, "client_closed_request", "Client closed request", "the client hung up")
    if isinstance(error, LedgerError):
        return problem(error.status, error.code, error.title, error.detail, error.headers)
    if isinstance(error, RecursionError):
        # Only request bodies nest arbitrarily deep; the JSON decoder gives up with a RecursionError.
        return problem(400, "validation_error", "Invalid request", "the JSON body is nested too deeply")
    if isinstance(error, ValidationException):
        return problem(400, "validation_error", "Invalid request", _validation_detail(error))
    if isinstance(error, HTTPException):
        status = error.status_code
        if status == 404 and b"%2f" in bytes(request.scope.get("raw_path") or b"").lower():
            # The server decodes %2F before routing, so `/v1/holds/a%2Fb` looks for `/v1/holds/a/b` and finds no
            # route; the caller sent a malformed path parameter, which is a 400 (docs/api.md, Field types).
            detail = "a path parameter must not contain an encoded slash (%2F)"
            return problem(400, "validation_error", "Invalid request", detail)
        if status >= 500:
            log.error("HTTP %s on %s %s: %s", status, request.method, request.url.path, error.detail)
        return problem(
            status, _CODES_BY_STATUS.get(status, "error"), str(error.detail), str(error.detail), error.headers
        )
    if isinstance(error, DatabaseUnavailable) or is_connection_error(error):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, error)
        return problem(
            503,
            "unavailable",
            "The database is unavailable; retry later",
            "the ledger database cannot be reached",
            {"Retry-After": RETRY_AFTER_SECONDS},
        )
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal_error", "Internal error", "an unexpected error occurred; nothing was acknowledged")


__all__ = ["PROBLEM_JSON", "MediaType", "handle_exception", "problem"]
