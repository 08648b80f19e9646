"""The last active admin key cannot be revoked: that would lock every admin out until someone with shell access
runs `create-key`."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests.support import LedgerClient


async def create_admin(ledger: LedgerClient, name: str) -> dict[str, Any]:
    response = await ledger.post("/v1/api-keys", {"name": name, "role": "admin"}, as_="admin")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def active_admins(ledger: LedgerClient) -> int:
    return await ledger.count("SELECT count(*) FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL")


async def test_the_last_admin_key_cannot_revoke_itself(ledger: LedgerClient) -> None:
    bootstrap = await ledger.conn.fetchval("SELECT id FROM api_keys WHERE name = 'bootstrap admin'")
    assert await active_admins(ledger) == 1
    response = await ledger.client.delete(f"/v1/api-keys/{bootstrap}", headers=ledger.headers("admin"))
    assert (response.status_code, response.json()["code"]) == (409, "last_admin_key"), response.text
    assert await active_admins(ledger) == 1
    assert (await ledger.get("/v1/api-keys", as_="admin")).status_code == 200
    # With a second admin key, either may go; relay and auditor keys never count.
    second = await create_admin(ledger, "second admin")
    response = await ledger.client.delete(f"/v1/api-keys/{bootstrap}", headers=ledger.headers("admin"))
    assert response.status_code == 204, response.text
    assert await active_admins(ledger) == 1
    response = await ledger.client.delete(
        f"/v1/api-keys/{second['id']}", headers={"Authorization": f"Bearer {second['key']}"}
    )
    assert (response.status_code, response.json()["code"]) == (409, "last_admin_key")


async def waiting_for_locks(raw: asyncpg.Connection[Any], count: int) -> None:
    for _ in range(1000):
        waiting = await raw.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} transactions never waited for a lock")


async def test_two_admins_revoking_each_other_at_once_leave_one(
    ledger: LedgerClient, raw: asyncpg.Connection[Any]
) -> None:
    """The last two admin keys, each revoking the other at the same time: exactly one revocation wins.

    A transaction behind the service's back holds the admin keys' rows until both DELETEs are inside their
    transactions, past authentication, so the two really overlap; then it lets them go.
    """
    bootstrap = await ledger.conn.fetchval("SELECT id FROM api_keys WHERE name = 'bootstrap admin'")
    pair = ({"id": bootstrap, "key": ledger.keys["admin"]}, await create_admin(ledger, "second admin"))
    deletes = []
    async with ledger.conn.transaction():
        await ledger.conn.execute("SELECT id FROM api_keys WHERE role = 'admin' FOR UPDATE")
        for me, target in (pair, pair[::-1]):
            headers = {"Authorization": f"Bearer {me['key']}"}
            deletes.append(asyncio.create_task(ledger.client.delete(f"/v1/api-keys/{target['id']}", headers=headers)))
        await waiting_for_locks(raw, 2)
    responses = await asyncio.gather(*deletes)
    assert sorted(r.status_code for r in responses) == [204, 409], [r.text for r in responses]
    assert [r.json()["code"] for r in responses if r.status_code == 409] == ["last_admin_key"]
    assert await active_admins(ledger) == 1
