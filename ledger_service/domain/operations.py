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
from typing import Annotated, Any, ClassVar

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
INVISIBLE = (
    r"\x00-\x1f\x7f-\x9f"  # Cc: C0, DEL, C1
    r"\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    r"\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    r"\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"  # Cf: bidi controls, zero-width characters, BOM...
    r"\u2028\u2029"  # Zl, Zp: they break lines
)
"""The characters no name may hold, as the inside of a regex character class: Unicode's Cc and Cf (Python's `re`
has no `\\p{..}`), U+2028 and U+2029. Invisible or line-breaking, they would make two names look alike in a
report or a CSV cell, or reorder its text. tests/test_strict_input.py checks the list against unicodedata."""

Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        pattern=rf"\A[^{INVISIBLE}]+\Z",
        description="1-200 characters; no control (Cc), format (Cf: zero-width, bidi, BOM) or line separators.",
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

    number_strings: ClassVar[tuple[str, ...]] = ()
    """Decimal fields that may come as strings: such a string must hold JSON's number syntax (api/bodies.py)."""
    later_optional: ClassVar[tuple[str, ...]] = ()
    """Optional fields added after requests were first stored: left out of the body's fingerprint when absent, so
    a request stored before the field existed replays with the same body as it did then (lifecycle.body_of)."""
    openapi_rules: ClassVar[dict[str, Any]] = {}
    """JSON Schema keywords (Schema field names) that state the command's cross-field rules in the OpenAPI
    document (api/bodies.py, CommandSchemas)."""


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
    later_optional: ClassVar[tuple[str, ...]] = ("cached_tokens",)
    channel_id: Id
    prompt_tokens: Count
    completion_tokens: Count
    quota: Count | None = None
    """Charge exactly this much instead of the priced charge."""
    cached_tokens: Count | None = None
    """The part of the prompt the provider served from its cache, when the relay knows it. Recorded in the entry
    for reconciling against the provider's usage export; it does not change the price."""


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
    cached_tokens: Count | None = None
    """As in a settlement: the cached part of the prompt, recorded, not priced."""

    later_optional: ClassVar[tuple[str, ...]] = ("cached_tokens",)


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
