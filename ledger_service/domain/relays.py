"""What the ledger reads from a relay's own database (one-api, new-api), as plain values.

The relays keep their money state in their own tables; `relay/source.py` reads those tables and hands over these
rows, so that importing (services/relay_import.py) and comparing (services/relay_compare.py) never see SQL or a
relay's column names. Money is the relays' integer quota, 500,000 per USD, the same unit as the ledger's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RelayKind(enum.StrEnum):
    """Which relay wrote the database; told apart by its columns (relay/source.py)."""

    ONE_API = "one-api"
    NEW_API = "new-api"


LOG_CONSUME = 2
"""`logs.type` of a charged call, in both relays."""

LOG_REFUND = 6
"""`logs.type` of a refund, in new-api only."""


@dataclass(frozen=True, slots=True)
class RelayUser:
    id: int
    quota: int
    """What the user may still spend; negative when the relay let the user overdraw (a debt)."""
    deleted: bool = False
    """Soft-deleted (`deleted_at` set): the relay no longer serves the user."""


@dataclass(frozen=True, slots=True)
class RelayToken:
    id: int
    user_id: int
    remain_quota: int
    unlimited: bool
    status: int
    """1 enabled, 2 disabled, 3 expired, 4 exhausted."""
    deleted: bool = False
    user_known: bool = True
    """False when the token's user is missing from the relay or soft-deleted."""


@dataclass(frozen=True, slots=True)
class RelayLog:
    """One row of the relay's `logs` table (consume or refund)."""

    id: int
    type: int
    created_at: int
    """Unix seconds."""
    user_id: int
    token_id: int | None
    """new-api only; one-api names the token (`token_name`) but does not keep its id."""
    token_name: str
    channel_id: int
    model_name: str
    quota: int
    prompt_tokens: int
    completion_tokens: int
    request_id: str | None
    """one-api only; new-api's logs have no request id."""
