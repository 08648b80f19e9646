"""API keys: creating, listing, revoking, and recognising them.

A secret is 32 random bytes (URL-safe base64, prefixed `lsk_`); only its SHA-256 is stored. A fast hash is right
here: the secret has 256 bits of entropy, so there is nothing for a slow hash to protect against, and every
request is authenticated. A recognised key is cached in the process for a few seconds to spare the database a
round trip per request; revoking a key clears it from this process's cache at once (other processes: within
`CACHE_SECONDS`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger_service.db import api_keys
from ledger_service.db.transactions import run_transaction
from ledger_service.domain import errors
from ledger_service.schemas import ApiKeyCommand, ApiKeyCreatedView, ApiKeyView

CACHE_SECONDS = 5.0
SECRET_PREFIX = "lsk_"  # noqa: S105 - a prefix that makes leaked keys easy to spot
MAX_SECRET_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the API key behind the request."""

    key_id: int
    name: str
    role: str


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class ApiKeyService:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._cache: dict[bytes, tuple[Principal, float]] = {}

    async def authenticate(self, secret: str) -> Principal | None:
        """The active key with this secret, or None."""
        if not secret or len(secret) > MAX_SECRET_LENGTH:
            return None
        digest = hash_secret(secret)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]

        async def work(conn: AsyncConnection) -> api_keys.KeyRow | None:
            return await api_keys.active_by_hash(conn, digest)

        row = await run_transaction(self.engine, work)
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            self._cache.pop(digest, None)
            return None
        principal = Principal(key_id=row.id, name=row.name, role=row.role)
        self._cache[digest] = (principal, time.monotonic() + CACHE_SECONDS)
        return principal

    async def create(self, command: ApiKeyCommand) -> ApiKeyCreatedView:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)

        async def work(conn: AsyncConnection) -> int:
            return await api_keys.insert_key(conn, name=command.name, role=command.role, key_hash=hash_secret(secret))

        key_id: int = await run_transaction(self.engine, work)
        return ApiKeyCreatedView(id=key_id, name=command.name, role=command.role, key=secret)

    async def ensure(self, secret: str, *, role: str = "admin", name: str = "bootstrap admin") -> bool:
        """Make sure a key with this secret exists (LEDGER_ADMIN_KEY); True when it had to be created."""
        digest = hash_secret(secret)

        async def work(conn: AsyncConnection) -> bool:
            # Several processes starting together with a new secret all try: exactly one inserts it.
            return await api_keys.insert_key_if_absent(conn, name=name, role=role, key_hash=digest)

        created: bool = await run_transaction(self.engine, work)
        return created

    async def list(self) -> list[ApiKeyView]:
        result: list[ApiKeyView] = await run_transaction(self.engine, api_keys.list_keys)
        return result

    async def revoke(self, key_id: int) -> None:
        async def work(conn: AsyncConnection) -> bool:
            # Revoking the last active admin key would lock every admin out until someone with shell access runs
            # `create-key`; the locks make the check and the revocation one step (db/api_keys.py).
            if await api_keys.lock_active_admins(conn) == [key_id]:
                raise errors.LastAdminKey(f"API key {key_id} is the last active admin key; create another first")
            return await api_keys.revoke(conn, key_id)

        if not await run_transaction(self.engine, work):
            raise errors.ApiKeyNotFound(f"no API key with id {key_id}")
        self._cache = {digest: entry for digest, entry in self._cache.items() if entry[0].key_id != key_id}
