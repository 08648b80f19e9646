"""API keys, stored as SHA-256 digests of their secrets."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import tables
from ledger_service.schemas import ApiKeyView


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: int
    name: str
    role: str
    key_hash: bytes


async def insert_key(conn: AsyncConnection, *, name: str, role: str, key_hash: bytes) -> int:
    return int(
        (
            await conn.execute(
                insert(tables.api_keys).values(name=name, role=role, key_hash=key_hash).returning(tables.api_keys.c.id)
            )
        ).scalar_one()
    )


async def active_by_hash(conn: AsyncConnection, key_hash: bytes) -> KeyRow | None:
    row = (
        await conn.execute(
            select(tables.api_keys).where(
                tables.api_keys.c.key_hash == key_hash, tables.api_keys.c.revoked_at.is_(None)
            )
        )
    ).first()
    return None if row is None else KeyRow(id=row.id, name=row.name, role=row.role, key_hash=bytes(row.key_hash))


async def insert_key_if_absent(conn: AsyncConnection, *, name: str, role: str, key_hash: bytes) -> bool:
    """Insert a key unless one with this hash exists (revoked or not); True when this call inserted it."""
    statement = (
        pg_insert(tables.api_keys)
        .values(name=name, role=role, key_hash=key_hash)
        .on_conflict_do_nothing(index_elements=[tables.api_keys.c.key_hash])
        .returning(tables.api_keys.c.id)
    )
    return (await conn.execute(statement)).first() is not None


async def list_keys(conn: AsyncConnection) -> list[ApiKeyView]:
    rows = await conn.execute(select(tables.api_keys).order_by(tables.api_keys.c.id))
    return [
        ApiKeyView(id=r.id, name=r.name, role=r.role, created_at=r.created_at, revoked_at=r.revoked_at) for r in rows
    ]


async def lock_active_admins(conn: AsyncConnection) -> list[int]:
    """The ids of the active admin keys, locked until the transaction ends.

    Every revocation takes these locks first (in id order, so never a deadlock), so revocations run one at a time:
    two admins revoking each other's keys cannot both see the other key as the one that remains. The one that
    waited re-reads the rows when the locks are released and no longer sees the key just revoked.
    """
    keys = tables.api_keys.c
    statement = select(keys.id).where(keys.role == "admin", keys.revoked_at.is_(None)).order_by(keys.id)
    return list((await conn.execute(statement.with_for_update())).scalars())


async def revoke(conn: AsyncConnection, key_id: int) -> bool:
    """Revoke a key; False when no key has this id. Revoking twice is harmless."""
    result = await conn.execute(
        update(tables.api_keys)
        .where(tables.api_keys.c.id == key_id)
        .values(revoked_at=func.coalesce(tables.api_keys.c.revoked_at, func.now()))
        .returning(tables.api_keys.c.id)
    )
    return result.first() is not None
