"""Bearer API keys and the role each route requires (contract section 7).

Routes declare the roles they admit in `opt={"roles": ...}`; admin is admitted everywhere. The check runs first in
the `/v1` router's before-request hook, before the body is read, so an unauthenticated caller learns nothing about
its input. (It is not a Litestar guard: guards are handed a copy of the route handler on every request, a cost the
hot path does not need.)
"""

from __future__ import annotations

import math
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection

from ledger_service.api.ratelimit import RateLimiter
from ledger_service.domain import errors
from ledger_service.metrics import RATE_LIMITED
from ledger_service.services.api_keys import ApiKeyService

ADMIN = "admin"
RELAY = "relay"
AUDITOR = "auditor"

ADMIN_ONLY = frozenset({ADMIN})
RELAY_WRITE = frozenset({ADMIN, RELAY})
READ_ALL = frozenset({ADMIN, RELAY, AUDITOR})
AUDIT_READ = frozenset({ADMIN, AUDITOR})


def bearer_secret(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if not header:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    return secret.strip()


async def require_role(request: Request[Any, Any, Any]) -> None:
    """Authenticate the bearer key (401), apply its rate limit (429), and admit its role to the route (403)."""
    if len(request.headers.getall("authorization", [])) > 1:
        # Which one counts would be up to each hop (a proxy may check the first, the service read another).
        raise errors.ValidationFailed("send one Authorization header")
    secret = bearer_secret(request)
    if secret is None:
        raise errors.Unauthorized("send Authorization: Bearer <API key>")
    keys: ApiKeyService = request.app.state.api_keys
    principal = await keys.authenticate(secret)
    if principal is None:
        raise errors.Unauthorized("the API key is unknown or revoked")
    request.state.principal = principal
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        wait = limiter.wait_for(principal.key_id)
        if wait > 0:
            RATE_LIMITED.inc()
            raise errors.RateLimited(
                "this API key is over its request rate", headers={"Retry-After": str(max(1, math.ceil(wait)))}
            )
    allowed: frozenset[str] = request.route_handler.opt.get("roles", ADMIN_ONLY)
    if principal.role not in allowed:
        raise errors.Forbidden(f"the {principal.role} role may not call {request.method} {request.url.path}")
