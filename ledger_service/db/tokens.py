"""The token registry: which user a token belongs to and whether it is limited."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_service.db import tables


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_id: int
    user_id: int
    unlimited: bool


async def get(conn: AsyncConnection, token_id: int) -> TokenRow | None:
    row = (await conn.execute(select(tables.tokens).where(tables.tokens.c.token_id == token_id))).first()
    return None if row is None else TokenRow(token_id=row.token_id, user_id=row.user_id, unlimited=row.unlimited)


async def save(conn: AsyncConnection, token: TokenRow) -> bool:
    """Insert or update the token; False (and nothing written) when it exists under another user.

    The owner check is part of the upsert, so two first registrations racing for one token id cannot both win.
    """
    statement = insert(tables.tokens).values(token_id=token.token_id, user_id=token.user_id, unlimited=token.unlimited)
    result = await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[tables.tokens.c.token_id],
            set_={"unlimited": statement.excluded.unlimited, "updated_at": func.now()},
            where=tables.tokens.c.user_id == statement.excluded.user_id,
        ).returning(tables.tokens.c.token_id)
    )
    return result.first() is not None
