"""Who may call what (contract section 7): bearer API keys, three roles, keys that are stored only as hashes.

The access table lists every endpoint of the contract with the roles it admits; `test_every_route_is_in_the_table`
makes sure no route of the app escapes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from litestar import Litestar

from tests.support import ADMIN_SECRET, LedgerClient, assert_problem, db_state

ROLES = ("admin", "relay", "auditor")
ALL = frozenset(ROLES)
RELAY_WRITE = frozenset({"admin", "relay"})
AUDIT = frozenset({"admin", "auditor"})
ADMIN = frozenset({"admin"})

OPEN_HOLD = "access-open-hold"
REFUND_HOLD = "access-refund-hold"
KEY_TO_DELETE = "{key_to_delete}"
"""Placeholder in a path for the id of a throwaway key made for the test."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    allowed: frozenset[str]
    body: Any = None

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


ROUTES: list[Route] = [
    # Lifecycle (section 4)
    Route(
        "POST",
        "/v1/holds",
        RELAY_WRITE,
        {"request_id": "access-hold", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 10},
    ),
    Route(
        "POST",
        f"/v1/holds/{OPEN_HOLD}/settle",
        RELAY_WRITE,
        {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": 10},
    ),
    Route("POST", f"/v1/holds/{REFUND_HOLD}/refund", RELAY_WRITE, {"reason": "access test"}),
    Route(
        "POST",
        "/v1/consumptions",
        RELAY_WRITE,
        {
            "request_id": "access-consumption",
            "user_id": 1,
            "token_id": 1,
            "channel_id": 1,
            "model": "gpt-4o",
            "prompt_tokens": 10,
            "completion_tokens": 10,
        },
    ),
    Route("GET", f"/v1/holds/{OPEN_HOLD}", ALL),
    # Funding, tokens, balances (section 5)
    Route("POST", "/v1/topups", ADMIN, {"user_id": 1, "amount": 10, "reference": "access-topup"}),
    Route("POST", "/v1/adjustments", ADMIN, {"user_id": 1, "amount": 10, "reference": "access-adjustment"}),
    Route("PUT", "/v1/tokens/5", RELAY_WRITE, {"user_id": 1, "unlimited": True}),
    Route("GET", "/v1/users/1", ALL),
    Route("GET", "/v1/tokens/1", ALL),
    Route("GET", "/v1/channels/1", ALL),
    # Pricing (section 3)
    Route("GET", "/v1/pricing", ALL),
    Route("PUT", "/v1/pricing/models/access-model", ADMIN, {"model_ratio": "1", "completion_ratio": "1"}),
    Route("PUT", "/v1/pricing/groups/access-group", ADMIN, {"group_ratio": "1"}),
    # Audit and reports (section 6)
    Route("GET", "/v1/entries", AUDIT),
    Route("GET", "/v1/entries/1", AUDIT),
    Route("POST", "/v1/entries/1/reverse", ADMIN, {"reference": "access-reversal"}),
    Route("GET", "/v1/accounts/user:1", AUDIT),
    Route("GET", "/v1/accounts/user:1/postings", AUDIT),
    Route("GET", "/v1/reports/trial-balance", AUDIT),
    Route("GET", "/v1/reports/reconciliation", AUDIT),
    Route("GET", "/v1/reports/usage?group_by=user&bucket=none", AUDIT),
    # External reconciliation and margins (section 11)
    Route("POST", "/v1/external/reconciliations", ADMIN, {"upload_id": 1}),
    Route("GET", "/v1/external/reconciliations", AUDIT),
    Route("POST", "/v1/external/uploads?source=openai_usage", ADMIN, {"object": "page", "data": []}),
    Route("GET", "/v1/external/uploads", AUDIT),
    Route("GET", "/v1/external/uploads/1", AUDIT),
    Route("PUT", "/v1/external/channel-map/csv/access-key", ADMIN, {"channel_id": 1}),
    Route("GET", "/v1/external/channel-map", AUDIT),
    Route(
        "PUT",
        "/v1/external/provider-prices/access-model",
        ADMIN,
        {"input_usd_per_mtok": "1", "output_usd_per_mtok": "1"},
    ),
    Route("GET", "/v1/external/provider-prices", AUDIT),
    Route("GET", "/v1/external/reconciliations/1", AUDIT),
    Route("POST", "/v1/external/reconciliations/1/items/1/explain", AUDIT, {"note": "access"}),
    Route("GET", "/v1/reports/margin?month=2026-01", AUDIT),
    # Access (section 7)
    Route("POST", "/v1/api-keys", ADMIN, {"name": "made in the access test", "role": "auditor"}),
    Route("GET", "/v1/api-keys", ADMIN),
    Route("DELETE", f"/v1/api-keys/{KEY_TO_DELETE}", ADMIN),
    # Batches (section 9)
    Route(
        "POST",
        "/v1/batch",
        RELAY_WRITE,
        {"operations": [{"op": "refund", "request_id": "access-no-such-hold", "body": {}}]},
    ),
]

BAD_CALLERS = (
    "no-header",
    "basic-scheme",
    "bearer-without-key",
    "secret-without-scheme",
    "unknown-key",
    "oversized-key",
    "revoked",
)


# Helpers ---------------------------------------------------------------------------------------------------------


async def create_key(ledger: LedgerClient, role: str, name: str = "access test key") -> dict[str, Any]:
    response = await ledger.post("/v1/api-keys", {"name": name, "role": role}, as_="admin")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def revoke(ledger: LedgerClient, key_id: int) -> httpx.Response:
    return await ledger.client.delete(f"/v1/api-keys/{key_id}", headers=ledger.headers("admin"))


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def listed_keys(response: httpx.Response) -> list[dict[str, Any]]:
    """The keys of GET /v1/api-keys, as a list page (`{"items": [...]}`) or a bare list."""
    body = response.json()
    items = body["items"] if isinstance(body, dict) else body
    assert isinstance(items, list), response.text
    return items


# Route table checks ------------------------------------------------------------------------------------------------


def served_routes(app: Litestar) -> set[tuple[str, str]]:
    """(method, path pattern) of every /v1 route the app serves; parameters become `{}` (`{*}` for `:path`)."""
    served = set()
    for app_route in app.routes:
        if not app_route.path.startswith("/v1"):
            continue
        shape = re.sub(r"\{[^}*]+\}", "{}", re.sub(r"\{[^}]*:path\}", "{*}", app_route.path))
        for handler in getattr(app_route, "route_handlers", []):
            for method in handler.http_methods:
                if method not in ("OPTIONS", "HEAD"):
                    served.add((method, shape))
    return served


def matches(shape: str, path: str) -> bool:
    """Whether a concrete path (query left out) fits a route pattern; only a `{*}` (`:path`) spans segments."""
    pattern = "^" + re.escape(shape).replace(r"\{\*\}", "[^/]+(?:/[^/]+)*").replace(r"\{\}", "[^/]+") + "$"
    return re.match(pattern, path.split("?")[0]) is not None


def is_served(app: Litestar, route: Route) -> bool:
    return any(method == route.method and matches(shape, route.path) for method, shape in served_routes(app))


async def test_every_route_is_in_the_table(app: Litestar) -> None:
    """Every /v1 route the app serves has a row in the access table (a new endpoint cannot escape the checks)."""
    served = served_routes(app)
    assert len(served) >= 15
    missing = sorted(
        f"{method} {shape}"
        for method, shape in served
        if not any(route.method == method and matches(shape, route.path) for route in ROUTES)
    )
    assert missing == [], "routes without a row in the access table"


# The access matrix -----------------------------------------------------------------------------------------------


@pytest.fixture
async def callers(ledger: LedgerClient) -> dict[str, dict[str, str]]:
    """Headers of every kind of caller, and some data so that allowed calls meet no business refusal."""
    await ledger.fund(1, 10_000_000)
    await ledger.token(1, 1)
    for request_id in (OPEN_HOLD, REFUND_HOLD):
        response = await ledger.hold(request_id=request_id, amount=1_000)
        assert response.status_code == 201, response.text
    revoked = await create_key(ledger, "admin", "soon revoked")
    assert (await ledger.client.get("/v1/api-keys", headers=bearer(revoked["key"]))).status_code == 200
    assert (await revoke(ledger, revoked["id"])).status_code == 204
    return {
        "no-header": {},
        "basic-scheme": {"Authorization": "Basic x"},
        "bearer-without-key": {"Authorization": "Bearer"},
        "secret-without-scheme": {"Authorization": ADMIN_SECRET},
        "unknown-key": bearer("lsk_this-key-was-never-issued"),
        "oversized-key": bearer("k" * 4000),
        "revoked": bearer(revoked["key"]),
        **{role: ledger.headers(role) for role in ROLES},
    }


async def call(ledger: LedgerClient, route: Route, headers: dict[str, str], path: str) -> httpx.Response:
    return await ledger.client.request(route.method, path, json=route.body, headers=headers)


@pytest.mark.parametrize("route", ROUTES, ids=[route.label for route in ROUTES])
async def test_access_matrix(
    app: Litestar, ledger: LedgerClient, callers: dict[str, dict[str, str]], route: Route
) -> None:
    """Bad or missing keys -> 401 unauthorized, a role the route does not admit -> 403 forbidden, both writing
    nothing; an admitted role gets past the key check (whatever the handler then answers, it is not 401/403/5xx)."""
    assert is_served(app, route), f"{route.label} is in the contract, but the app serves no such route"
    path = route.path
    if KEY_TO_DELETE in path:
        path = path.replace(KEY_TO_DELETE, str((await create_key(ledger, "relay", "to delete"))["id"]))
    failures: list[str] = []

    before = await db_state(ledger)
    denied = [(caller, 401, "unauthorized") for caller in BAD_CALLERS]
    denied += [(role, 403, "forbidden") for role in ROLES if role not in route.allowed]
    for caller, status, code in denied:
        response = await call(ledger, route, callers[caller], path)
        try:
            assert_problem(response, status, code)
        except AssertionError as error:
            failures.append(f"{caller}: expected {status} {code}: {str(error).splitlines()[0]}")
    after = await db_state(ledger)
    changed = {name: (before[name], after[name]) for name in before if before[name] != after[name]}
    if changed:
        failures.append(f"refused calls wrote to the database: {changed}")

    for role in ROLES:
        if role in route.allowed:
            response = await call(ledger, route, callers[role], path)
            if response.status_code in (401, 403) or response.status_code >= 500:
                failures.append(f"{role} (admitted) -> {response.status_code} {response.text}")

    assert failures == [], f"{route.label}:\n" + "\n".join(failures)


async def test_health_needs_no_key(ledger: LedgerClient) -> None:
    response = await ledger.client.get("/health")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "database": "ok"}
    response = await ledger.client.get("/health", headers={"Authorization": "Bearer not-a-key"})
    assert response.status_code == 200, response.text


async def test_unauthorized_answers_reveal_nothing_about_the_body(ledger: LedgerClient) -> None:
    """Without a valid key even a malformed body is a 401: the guard answers before the body is looked at."""
    for headers in ({}, bearer("lsk_unknown")):
        response = await ledger.client.post(
            "/v1/holds", content=b"{not json", headers={**headers, "Content-Type": "application/json"}
        )
        assert_problem(response, 401, "unauthorized")
    response = await ledger.client.post(
        "/v1/topups", content=b"{not json", headers={**ledger.headers("relay"), "Content-Type": "application/json"}
    )
    assert_problem(response, 403, "forbidden")


# API key lifecycle -----------------------------------------------------------------------------------------------


async def test_created_key_is_shown_once_and_works_for_its_role(ledger: LedgerClient) -> None:
    response = await ledger.post("/v1/api-keys", {"name": "finance dashboard", "role": "auditor"}, as_="admin")
    assert response.status_code == 201, response.text
    created = response.json()
    assert {"id", "name", "role", "key"} <= set(created), created
    assert isinstance(created["id"], int)
    assert created["name"] == "finance dashboard"
    assert created["role"] == "auditor"
    secret = created["key"]
    assert isinstance(secret, str)
    assert len(secret) >= 32
    assert secret not in ledger.keys.values()

    response = await ledger.client.get("/v1/entries/1", headers=bearer(secret))
    assert response.status_code not in (401, 403), response.text
    response = await ledger.client.post(
        "/v1/topups", json={"user_id": 1, "amount": 1, "reference": "by-auditor"}, headers=bearer(secret)
    )
    assert_problem(response, 403, "forbidden")

    other = await create_key(ledger, "auditor", "finance dashboard")
    assert other["key"] != secret
    assert other["id"] != created["id"]


async def test_key_list_never_shows_a_secret(ledger: LedgerClient) -> None:
    created = await create_key(ledger, "relay", "relay eu-1")
    response = await ledger.get("/v1/api-keys", as_="admin")
    assert response.status_code == 200, response.text
    keys = listed_keys(response)
    mine = [key for key in keys if key.get("id") == created["id"]]
    assert len(mine) == 1, keys
    assert mine[0]["name"] == "relay eu-1"
    assert mine[0]["role"] == "relay"
    assert {key["role"] for key in keys} >= {"admin", "relay", "auditor"}
    assert all("key" not in key and "key_hash" not in key for key in keys), keys

    for secret in (created["key"], ADMIN_SECRET, ledger.keys["relay"], ledger.keys["auditor"]):
        assert secret not in response.text
    rows = await ledger.conn.fetch("SELECT key_hash FROM api_keys")
    assert len(rows) == len(keys)
    for row in rows:
        assert bytes(row["key_hash"]).hex() not in response.text.lower()


async def test_only_a_32_byte_hash_is_stored(ledger: LedgerClient) -> None:
    created = await create_key(ledger, "relay", "hash check")
    secret: str = created["key"]
    row = await ledger.conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", created["id"])
    assert row is not None
    digest = bytes(row["key_hash"])
    assert len(digest) == 32
    assert digest != secret.encode()
    assert secret.encode() not in digest
    for column, value in row.items():
        assert secret not in str(value), f"api_keys.{column} holds the secret"
        if isinstance(value, bytes | bytearray | memoryview):
            assert secret.encode() not in bytes(value), f"api_keys.{column} holds the secret"
    # No other key shares the hash, and the bootstrap admin secret is not stored in clear either.
    assert await ledger.count("SELECT count(*) FROM api_keys WHERE key_hash = $1", digest) == 1
    assert await ledger.count("SELECT count(*) FROM api_keys WHERE key_hash = $1", ADMIN_SECRET.encode()) == 0
    assert await ledger.count("SELECT count(*) FROM api_keys WHERE octet_length(key_hash) <> 32") == 0


async def test_revoked_key_stops_working_at_once(ledger: LedgerClient) -> None:
    created = await create_key(ledger, "relay", "to revoke")
    headers = bearer(created["key"])
    # Used first, so any cache of recognised keys knows it.
    for _ in range(2):
        response = await ledger.client.get("/v1/users/1", headers=headers)
        assert response.status_code == 200, response.text

    response = await revoke(ledger, created["id"])
    assert response.status_code == 204, response.text
    assert response.content == b""

    response = await ledger.client.get("/v1/users/1", headers=headers)
    assert_problem(response, 401, "unauthorized")
    response = await ledger.client.post(
        "/v1/holds",
        json={"request_id": "after-revoke", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 1},
        headers=headers,
    )
    assert_problem(response, 401, "unauthorized")
    assert await ledger.count("SELECT count(*) FROM requests") == 0

    listed = [key for key in listed_keys(await ledger.get("/v1/api-keys", as_="admin")) if key["id"] == created["id"]]
    assert len(listed) == 1
    assert listed[0].get("revoked_at") is not None
    revoked_at = await ledger.conn.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", created["id"])
    assert revoked_at is not None

    # Revoking one key leaves the others alone.
    assert (await ledger.get("/v1/users/1", as_="relay")).status_code == 200
    assert (await ledger.get("/v1/api-keys", as_="admin")).status_code == 200


async def test_deleting_an_unknown_key_is_a_404(ledger: LedgerClient) -> None:
    before = await db_state(ledger)
    response = await ledger.client.delete("/v1/api-keys/987654321", headers=ledger.headers("admin"))
    assert_problem(response, 404)
    assert before == await db_state(ledger)


INVALID_KEY_BODIES: dict[str, Any] = {
    "unknown-role": {"name": "k", "role": "root"},
    "uppercase-role": {"name": "k", "role": "Admin"},
    "empty-role": {"name": "k", "role": ""},
    "null-role": {"name": "k", "role": None},
    "int-role": {"name": "k", "role": 1},
    "missing-role": {"name": "k"},
    "empty-name": {"name": "", "role": "relay"},
    "null-name": {"name": None, "role": "relay"},
    "int-name": {"name": 7, "role": "relay"},
    "control-char-name": {"name": "line\nbreak", "role": "relay"},
    "missing-name": {"role": "relay"},
    "unknown-field": {"name": "k", "role": "relay", "key": "lsk_chosen-by-caller"},
    "not-an-object": ["k", "relay"],
}


async def test_invalid_role_or_name_is_refused(ledger: LedgerClient) -> None:
    before = await db_state(ledger)
    failures = []
    for label, body in INVALID_KEY_BODIES.items():
        response = await ledger.post("/v1/api-keys", body, as_="admin")
        try:
            assert_problem(response, 400, "validation_error")
        except AssertionError as error:
            failures.append(f"{label}: {str(error).splitlines()[0]}")
    assert failures == []
    assert before == await db_state(ledger)


def test_an_app_whose_v1_route_skips_the_key_check_is_refused() -> None:
    """The key check is the /v1 router's before-request hook, and Litestar runs only the closest layer's hook: a
    controller or handler declaring its own would replace it. Building such an app fails instead of serving it
    unguarded."""
    from litestar import Controller, Litestar, Request, Router, WebSocket, asgi, get, websocket
    from litestar.types import Receive, Scope, Send

    from ledger_service.api.app import _require_admission
    from ledger_service.api.middleware import admit_request

    async def own_hook(request: Request[Any, Any, Any]) -> None:
        return None

    class Careless(Controller):
        path = "/careless"

        @get("/", before_request=own_hook)
        async def careless(self) -> str:
            return "unguarded"

    class Careful(Controller):
        path = "/careful"

        @get("/")
        async def careful(self) -> str:
            return "guarded"

    _require_admission(Litestar([Router("/v1", before_request=admit_request, route_handlers=[Careful])]))
    with pytest.raises(RuntimeError, match="/v1/careless"):
        _require_admission(Litestar([Router("/v1", before_request=admit_request, route_handlers=[Careful, Careless])]))

    @websocket("/socket")
    async def socket(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.close()

    @asgi("/raw", copy_scope=True)
    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    for unguardable in (socket, raw):  # the hook never runs for these route types
        with pytest.raises(RuntimeError, match="not an HTTP route"):
            _require_admission(Litestar([Router("/v1", before_request=admit_request, route_handlers=[unguardable])]))
