"""Web console sessions: only the SHA-256 of the cookie's secret is stored, next to the session's CSRF token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True, slots=True)
class SessionRow:
    api_key_id: int
    key_name: str
    role: str
    csrf_token: str
    expires_at: datetime


async def insert(
    conn: AsyncConnection, *, secret_hash: bytes, api_key_id: int, csrf_token: str, seconds: int
) -> datetime:
    """A new session that lasts `seconds`; returns when it expires (the database's clock)."""
    expires = await conn.scalar(
        text(
            "INSERT INTO console_sessions (secret_hash, api_key_id, csrf_token, expires_at)"
            " VALUES (:secret_hash, :api_key_id, :csrf_token, now() + make_interval(secs => :seconds))"
            " RETURNING expires_at"
        ),
        {"secret_hash": secret_hash, "api_key_id": api_key_id, "csrf_token": csrf_token, "seconds": seconds},
    )
    assert isinstance(expires, datetime)
    return expires


_ACTIVE = text(
    """
    SELECT s.api_key_id, k.name AS key_name, k.role, s.csrf_token, s.expires_at
      FROM console_sessions s JOIN api_keys k ON k.id = s.api_key_id
     WHERE s.secret_hash = :secret_hash AND s.ended_at IS NULL AND s.expires_at > now()
       AND k.revoked_at IS NULL AND k.role IN ('admin', 'auditor')
    """
)


async def active(conn: AsyncConnection, secret_hash: bytes) -> SessionRow | None:
    """The session with this secret, if it has not ended or expired and its API key is still active (a revoked key
    ends its sessions at their next request)."""
    row = (await conn.execute(_ACTIVE, {"secret_hash": secret_hash})).first()
    if row is None:
        return None
    return SessionRow(
        api_key_id=row.api_key_id,
        key_name=row.key_name,
        role=row.role,
        csrf_token=row.csrf_token,
        expires_at=row.expires_at,
    )


async def end(conn: AsyncConnection, secret_hash: bytes) -> None:
    await conn.execute(
        text("UPDATE console_sessions SET ended_at = now() WHERE secret_hash = :secret_hash AND ended_at IS NULL"),
        {"secret_hash": secret_hash},
    )


async def prune(conn: AsyncConnection, *, older_than_seconds: int) -> int:
    """Forget sessions that expired or ended more than `older_than_seconds` ago."""
    result = await conn.execute(
        text(
            "DELETE FROM console_sessions"
            " WHERE coalesce(ended_at, expires_at) < now() - make_interval(secs => :seconds)"
        ),
        {"seconds": older_than_seconds},
    )
    return int(getattr(result, "rowcount", 0) or 0)
