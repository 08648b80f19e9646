"""What a relay asks of the lifecycle: the four commands, and the operations that carry them to the planner.

The commands are the decoded bodies of the lifecycle calls (and of a batch's operations). Decoding one enforces
the contract's input rules (section 8): ids 1..2^63-1, counts and amounts 0..10^15, keys of 1-128 characters of
`A-Z a-z 0-9 . _ : -`, no unknown fields. They live in the domain because the planner decides on them; the API
takes them from here (schemas.py re-exports them beside the other bodies).

An operation is one of `Hold`, `Settle`, `Refund`, `Consume` (a relay's calls) or `Expire` (the sweeper's): its
type says what it is, so nothing repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from ledger_service.domain.pricing import MAX_AMOUNT

MAX_ID = 2**63 - 1

Id = Annotated[int, Meta(ge=1, le=MAX_ID, description="An integer id, 1..2^63-1.")]
Count = Annotated[int, Meta(ge=0, le=MAX_AMOUNT, description="A token count or amount, 0..10^15.")]
Key = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        pattern=r"\A[A-Za-z0-9._:-]+\Z",
        description="An idempotency key: 1-128 characters of A-Z a-z 0-9 . _ : -",
    ),
]
Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        pattern=r"\A[^\x00-\x1f\x7f]+\Z",
        description="1-200 printable characters.",
    ),
]
Note = Annotated[
    str,
    Meta(
        max_length=2000,
        pattern=r"\A[^\x00]*\Z",
        description="Free text kept in the entry's details (any Unicode but NUL, which PostgreSQL cannot store).",
    ),
]
ExpiresIn = Annotated[int, Meta(ge=1, le=86400, description="Seconds until the hold expires, 1..86400.")]


class Command(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request body: unknown fields are an error, not silently dropped."""


class HoldCommand(Command):
    request_id: Key
    user_id: Id
    token_id: Id
    model: Name
    prompt_tokens: Count
    group: Name = "default"
    max_tokens: Count = 0
    amount: Count | None = None
    """Hold exactly this much instead of the estimate."""
    expires_in: ExpiresIn | None = None


class SettleCommand(Command):
    channel_id: Id
    prompt_tokens: Count
    completion_tokens: Count
    quota: Count | None = None
    """Charge exactly this much instead of the priced charge."""


class RefundCommand(Command):
    reason: Note | None = None


class ConsumptionCommand(Command):
    request_id: Key
    user_id: Id
    token_id: Id
    channel_id: Id
    model: Name
    prompt_tokens: Count
    completion_tokens: Count
    group: Name = "default"
    quota: Count | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """Reserve the estimate of a call about to be made."""

    command: HoldCommand

    @property
    def request_id(self) -> str:
        return self.command.request_id


@dataclass(frozen=True, slots=True)
class Settle:
    """Charge the real cost of a held call."""

    request_id: str
    command: SettleCommand


@dataclass(frozen=True, slots=True)
class Refund:
    """Give a hold back after a failed call."""

    request_id: str
    command: RefundCommand


@dataclass(frozen=True, slots=True)
class Consume:
    """Charge a call that had no hold."""

    command: ConsumptionCommand

    @property
    def request_id(self) -> str:
        return self.command.request_id


@dataclass(frozen=True, slots=True)
class Expire:
    """Expire a hold past its expiry: the sweeper's operation. Settling or refunding a hold that is due expires it
    the same way first, so there is one way for a hold to expire."""

    request_id: str


Operation = Hold | Settle | Refund | Consume | Expire
"""One lifecycle operation: a relay's call, or the sweeper's expiry."""

CREATES_A_REQUEST = (Hold, Consume)
"""The operations that create their request (answered 201 when new); the others move an existing one."""
