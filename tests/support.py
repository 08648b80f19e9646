"""Helpers shared by the tests: an HTTP driver with keys of each role, checks made with raw SQL, and the database's
functions next to their files in migrations/sql."""

from __future__ import annotations

import difflib
import itertools
from typing import Any

import asyncpg
import httpx
from alembic.script import ScriptDirectory

from ledger_service.database import PROJECT_ROOT
from ledger_service.db.scripts import FUNCTIONS_DIR, function_sql

ADMIN_SECRET = "test-admin-secret"

_ids = itertools.count(1)


def unique(prefix: str = "req") -> str:
    return f"{prefix}-{next(_ids)}"


class LedgerClient:
    """Drives the service over HTTP as a relay (or admin, or auditor) would."""

    def __init__(self, client: httpx.AsyncClient, conn: asyncpg.Connection[Any]) -> None:
        self.client = client
        self.conn = conn
        self.keys: dict[str, str] = {"admin": ADMIN_SECRET}

    async def start(self) -> None:
        for role in ("relay", "auditor"):
            response = await self.post("/v1/api-keys", {"name": f"test {role}", "role": role}, as_="admin")
            assert response.status_code == 201, response.text
            self.keys[role] = response.json()["key"]

    def headers(self, as_: str | None) -> dict[str, str]:
        return {} if as_ is None else {"Authorization": f"Bearer {self.keys[as_]}"}

    async def post(self, path: str, body: Any = None, *, as_: str | None = "relay") -> httpx.Response:
        return await self.client.post(path, json=body, headers=self.headers(as_))

    async def put(self, path: str, body: Any = None, *, as_: str | None = "relay") -> httpx.Response:
        return await self.client.put(path, json=body, headers=self.headers(as_))

    async def get(self, path: str, *, as_: str | None = "relay") -> httpx.Response:
        return await self.client.get(path, headers=self.headers(as_))

    # Set-up shortcuts -------------------------------------------------------------------------------------------

    async def fund(self, user_id: int, amount: int) -> dict[str, Any]:
        response = await self.post(
            "/v1/topups", {"user_id": user_id, "amount": amount, "reference": unique("topup")}, as_="admin"
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def token(self, token_id: int, user_id: int, remaining: int | None = None) -> dict[str, Any]:
        body = {"user_id": user_id, "unlimited": remaining is None, "remaining": remaining}
        response = await self.put(f"/v1/tokens/{token_id}", body)
        assert response.status_code in (200, 201), response.text
        result: dict[str, Any] = response.json()
        return result

    async def hold(self, **fields: Any) -> httpx.Response:
        body = {"request_id": unique(), "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 100}
        body.update(fields)
        return await self.post("/v1/holds", body)

    async def user(self, user_id: int) -> dict[str, Any]:
        response = await self.get(f"/v1/users/{user_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def token_view(self, token_id: int) -> dict[str, Any]:
        response = await self.get(f"/v1/tokens/{token_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    # Checks behind the service's back ---------------------------------------------------------------------------

    async def ledger_totals(self) -> dict[str, int]:
        """Sum of every posting per ledger: zero, always, in a double-entry ledger."""
        rows = await self.conn.fetch("SELECT ledger, sum(amount) AS total FROM postings GROUP BY ledger")
        return {row["ledger"]: int(row["total"]) for row in rows}

    async def assert_books_balance(self) -> None:
        totals = await self.ledger_totals()
        assert all(total == 0 for total in totals.values()), totals
        unbalanced = await self.conn.fetch(
            "SELECT entry_id, ledger FROM postings GROUP BY entry_id, ledger HAVING sum(amount) <> 0"
        )
        assert unbalanced == []

    async def raw_balance(self, account: str, ledger: str = "quota") -> int:
        total = await self.conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM postings WHERE account = $1 AND ledger = $2", account, ledger
        )
        return int(total)

    async def count(self, sql: str, *args: Any) -> int:
        return int(await self.conn.fetchval(sql, *args))

    async def backdate(self, request_id: str) -> None:
        """Move a hold's expiry into the past, as if its time had run out (bypassing the lifecycle trigger)."""
        await backdate(self.conn, request_id)


async def backdate(conn: asyncpg.Connection[Any], request_id: str) -> None:
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE requests SET expires_at = now() - interval '1 second' WHERE request_id = $1", request_id
        )


PROBLEM_JSON = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and code), shaped as the contract says."""
    request = f"{response.request.method} {response.request.url}"
    assert response.status_code == status, f"{request} -> {response.status_code} {response.text}"
    content_type = response.headers.get("content-type", "")
    assert content_type.split(";")[0].strip() == PROBLEM_JSON, f"{request} -> content-type {content_type!r}"
    body = response.json()
    assert isinstance(body, dict), f"{request} -> {response.text}"
    for field in ("type", "title", "detail", "code"):
        assert isinstance(body.get(field), str), f"{request} -> {field} missing: {response.text}"
    assert body["title"], f"{request} -> empty title: {response.text}"
    assert body.get("status") == status, f"{request} -> {response.text}"
    if code is not None:
        assert body["code"] == code, f"{request} -> {response.text}"
    return body


STATE_SQL = """
SELECT
    (SELECT count(*) FROM entries) AS entries,
    (SELECT count(*) FROM postings) AS postings,
    (SELECT string_agg(t::text, ' | ' ORDER BY t.request_id) FROM requests t) AS requests,
    (SELECT string_agg(t::text, ' | ' ORDER BY t.token_id) FROM tokens t) AS tokens,
    (SELECT string_agg(t::text, ' | ' ORDER BY t.id) FROM api_keys t) AS api_keys,
    (SELECT string_agg(t::text, ' | ' ORDER BY t.model) FROM model_prices t) AS model_prices,
    (SELECT string_agg(t::text, ' | ' ORDER BY t.group_name) FROM group_ratios t) AS group_ratios
"""


async def db_state(ledger: LedgerClient) -> dict[str, Any]:
    """Everything a write could touch: the append-only tables by count, the others by content (one round trip)."""
    row = await ledger.conn.fetchrow(STATE_SQL)
    assert row is not None
    return dict(row.items())


# Database functions and their files in migrations/sql -----------------------------------------------------------
MIGRATIONS = ScriptDirectory(str(PROJECT_ROOT / "migrations"))
SCRATCH_SCHEMA = "function_files"

FUNCTIONS_SQL = """
SELECT p.proname, pg_get_functiondef(p.oid) AS definition
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace
   AND NOT EXISTS (SELECT 1 FROM pg_depend d  -- an extension's functions are not ours
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
 ORDER BY p.proname
"""


async def function_definitions(conn: asyncpg.Connection[Any]) -> dict[str, str]:
    """`pg_get_functiondef` of each of our functions in the database, by name."""
    rows = await conn.fetch(FUNCTIONS_SQL)
    definitions = {row["proname"]: row["definition"] for row in rows}
    assert len(definitions) == len(rows), "an overloaded function: migrations/sql keeps one per name"
    return definitions


def function_files(revision: str) -> dict[str, str]:
    """The revision of each function's file that a database at `revision` has: its newest file at or below
    `revision` (no entry for a function created later)."""
    lineage = [script.revision for script in MIGRATIONS.iterate_revisions(revision, "base")]  # newest first
    found: dict[str, str] = {}
    for folder in sorted(path for path in FUNCTIONS_DIR.iterdir() if path.is_dir()):
        defined = [candidate for candidate in lineage if (folder / f"{candidate}.sql").is_file()]
        if defined:
            found[folder.name] = defined[0]
    return found


async def file_definitions(conn: asyncpg.Connection[Any]) -> dict[str, str]:
    """`pg_get_functiondef` of each function's file as the database's revision has it, as the database would print
    the function if the file had created it: PostgreSQL keeps a body byte for byte but prints the rest of a
    definition its own way (qualified name, clause order, `SET name TO 'value'`). Each file is run in a scratch
    schema, rolled back afterwards."""
    revision = await conn.fetchval("SELECT version_num FROM alembic_version")
    definitions: dict[str, str] = {}
    transaction = conn.transaction()
    await transaction.start()
    try:
        # Unqualified names are created in the first schema of the path; bodies still find the tables in public.
        await conn.execute(f"CREATE SCHEMA {SCRATCH_SCHEMA}; SET LOCAL search_path = {SCRATCH_SCHEMA}, public")
        for name, file_revision in function_files(revision).items():
            await conn.execute(function_sql(name, file_revision))
            definition = await conn.fetchval("SELECT pg_get_functiondef($1::regproc)", f"{SCRATCH_SCHEMA}.{name}")
            definitions[name] = definition.replace(f" {SCRATCH_SCHEMA}.{name}(", f" public.{name}(", 1)
    finally:
        await transaction.rollback()
    return definitions


async def functions_against_files(conn: asyncpg.Connection[Any]) -> str:
    """A unified diff from the functions' files (as the database's revision has them) to the database's functions:
    empty when every function is its file and every file's function exists."""
    files = await file_definitions(conn)
    database = await function_definitions(conn)
    diff: list[str] = []
    for name in sorted(files.keys() | database.keys()):
        before = files.get(name, "").splitlines(keepends=True)
        after = database.get(name, "").splitlines(keepends=True)
        diff += difflib.unified_diff(before, after, f"migrations/sql: {name}", f"database: {name}")
    return "".join(diff)
