"""Transaction-scoped advisory locks: the serialization points of the ledger.

Every operation that checks a user's or a token's balance before posting takes the user's lock first. Tokens
belong to exactly one user for life, so the user's lock serializes its tokens as well, and there is a single lock
per operation: no lock order to get wrong, no deadlock between holds.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

SNAPSHOT_LOCK = 0x4C45444745520001
"""Key of the lock that lets one snapshotter at a time refresh the snapshots ('LEDGER' + 1)."""


SEAL_LOCK = 0x4C45444745520002
"""Key of the lock that lets one sealer at a time extend the hash chain."""


async def lock_user(conn: AsyncConnection, user_id: int) -> None:
    """Wait for, then hold until commit, the lock on the user's balance (and its tokens' allowances)."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"user:{user_id}"})


async def try_lock_snapshots(conn: AsyncConnection) -> bool:
    return bool(await conn.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SNAPSHOT_LOCK}))


async def try_lock_sealing(conn: AsyncConnection) -> bool:
    return bool(await conn.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SEAL_LOCK}))
