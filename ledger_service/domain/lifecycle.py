"""The relay request lifecycle: hold decisions and the transitions of a hold.

    open --settle--> settled            (charge; usage above the estimate is still recorded)
    open --refund--> refunded           (estimate returned)
    open --expiry--> expired            (estimate returned by the sweeper, or by the first call after expires_at)
    expired --settle--> settled, late   (charged as a direct consumption)

A consumption is a request created already settled, with nothing held.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from ledger_service.domain import errors
from ledger_service.domain.canonical import canonical_ascii_json
from ledger_service.domain.pricing import Prices


class RequestStatus(enum.StrEnum):
    OPEN = "open"
    SETTLED = "settled"
    REFUNDED = "refunded"
    EXPIRED = "expired"


class RequestKind(enum.StrEnum):
    HOLD = "hold"
    CONSUMPTION = "consumption"


class RequestRow(msgspec.Struct, frozen=True, kw_only=True):
    """A hold or consumption as the ledger keeps it: what was asked, what was held, and how it ended.

    The one description of a request row: its fields are the `requests` table's columns, by name (`group` is
    stored as `group_name`). The lifecycle's read decodes rows straight into it and its apply encodes it, bytes as
    base64 both ways (db/lifecycle.py); the planner copies it with a change (`msgspec.structs.replace`).
    """

    request_id: str
    kind: RequestKind
    status: RequestStatus
    user_id: int
    token_id: int
    token_limited: bool
    group: str = msgspec.field(name="group_name")
    model: str
    prompt_tokens: int
    max_tokens: int
    amount: int
    trusted: bool
    model_ratio: Decimal
    completion_ratio: Decimal
    group_ratio: Decimal
    model_price: Decimal | None
    channel_id: int | None = None
    settled_prompt_tokens: int | None = None
    completion_tokens: int | None = None
    charged: int | None = None
    late: bool = False
    request_fingerprint: bytes
    settle_fingerprint: bytes | None = None
    refund_fingerprint: bytes | None = None
    created_at: datetime
    expires_at: datetime | None = None

    @property
    def prices(self) -> Prices:
        """The prices the request was created with; its settlement is charged at these."""
        return Prices(self.model_ratio, self.completion_ratio, self.group_ratio, self.model_price)

    def is_due(self, now: datetime) -> bool:
        """Open and past expires_at at `now`, the database's clock (expiry is never judged by the host's)."""
        return self.status is RequestStatus.OPEN and self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class TokenState:
    """A registered token and its current allowance balance."""

    token_id: int
    user_id: int
    unlimited: bool
    remaining: int
    """The allowance balance; meaningless (and zero) for an unlimited token."""

    @property
    def limited(self) -> bool:
        return not self.unlimited


@dataclass(frozen=True, slots=True)
class HoldDecision:
    amount: int
    """What is moved into the hold account; 0 when trusted."""
    trusted: bool


def check_token(token: TokenState | None, *, token_id: int, user_id: int) -> TokenState:
    """The token a request names must be registered and belong to the request's user."""
    if token is None:
        raise errors.TokenNotFound(f"token {token_id} is not registered")
    if token.user_id != user_id:
        raise errors.TokenUserMismatch(f"token {token_id} belongs to another user")
    return token


def decide_hold(*, available: int, token: TokenState, estimate: int, trust_factor: int) -> HoldDecision:
    """Refuse a hold the user or the token cannot cover; hold nothing for the trusted; else hold the estimate.

    Trust rule (one-api's, plus the token check one-api lacked): with a factor F > 0, nothing is held when the
    user's available quota exceeds F x estimate AND the token is unlimited or its remaining exceeds F x estimate.
    """
    if available < estimate:
        raise errors.InsufficientUserQuota(f"available quota {available} is below the estimate {estimate}")
    if token.limited and token.remaining < estimate:
        raise errors.InsufficientTokenQuota(
            f"token {token.token_id} has {token.remaining} remaining, below the estimate {estimate}"
        )
    threshold = trust_factor * estimate
    trusted = trust_factor > 0 and available > threshold and (token.unlimited or token.remaining > threshold)
    return HoldDecision(amount=0 if trusted else estimate, trusted=trusted)


class SettleMode(enum.Enum):
    SETTLE_HOLD = "settle_hold"
    """Open and not yet due: release the hold and charge (a trusted hold holds 0)."""
    EXPIRE_THEN_LATE = "expire_then_late"
    """Open but past expires_at: expire it first, then charge as a late direct consumption."""
    LATE = "late"
    """Already expired: charge as a direct consumption, marked late."""
    REPLAY = "replay"
    """Already settled with the same body: answer with the settled hold, post nothing."""


class RefundMode(enum.Enum):
    REFUND = "refund"
    EXPIRE = "expire"
    """Past expires_at: the hold expires instead (same postings, entry kind `expire`)."""
    UNCHANGED = "unchanged"
    """Already expired: nothing changes; the expired hold is returned."""
    REPLAY = "replay"


def settle_mode(*, status: RequestStatus, due: bool, settled_with: bytes | None, fingerprint: bytes) -> SettleMode:
    if status is RequestStatus.SETTLED:
        if settled_with == fingerprint:
            return SettleMode.REPLAY
        raise errors.HoldAlreadySettled("this request is already settled with a different body")
    if status is RequestStatus.REFUNDED:
        raise errors.HoldAlreadyRefunded("this hold was refunded; it can no longer be settled")
    if status is RequestStatus.EXPIRED:
        return SettleMode.LATE
    return SettleMode.EXPIRE_THEN_LATE if due else SettleMode.SETTLE_HOLD


def refund_mode(*, status: RequestStatus, due: bool, refunded_with: bytes | None, fingerprint: bytes) -> RefundMode:
    if status is RequestStatus.SETTLED:
        raise errors.HoldAlreadySettled("this hold is settled; it can no longer be refunded")
    if status is RequestStatus.REFUNDED:
        if refunded_with == fingerprint:
            return RefundMode.REPLAY
        raise errors.IdempotencyConflict("this hold was already refunded with a different body")
    if status is RequestStatus.EXPIRED:
        return RefundMode.UNCHANGED
    return RefundMode.EXPIRE if due else RefundMode.REFUND


def body_of(command: msgspec.Struct) -> dict[str, Any]:
    """A decoded request body as plain data, the form `fingerprint` and entry details take. Fields added later
    (`later_optional`) are left out when absent, so older requests keep their fingerprints."""
    body: dict[str, Any] = msgspec.to_builtins(command)
    for name in getattr(command, "later_optional", ()):
        if body.get(name) is None:
            body.pop(name, None)
    return body


def fingerprint(operation: str, body: Mapping[str, Any]) -> bytes:
    """A digest of an operation and its (decoded) body: equal bodies give equal fingerprints.

    Bodies are compared after decoding, so key order and whitespace do not matter, and an omitted optional field
    equals the same field sent with its default.
    """
    return hashlib.sha256(canonical_ascii_json({"op": operation, "body": body})).digest()
