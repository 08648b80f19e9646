"""Journal entries and the posting rules of every operation (the table in docs/accounting.md).

An `EntryDraft` is an entry before it has an id: its constructor refuses anything that does not balance per
ledger, so an unbalanced entry cannot even be built. The database checks the same rule again at commit.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ledger_service.domain import accounts
from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.canonical import canonical_json
from ledger_service.domain.pricing import MAX_AMOUNT


class EntryKind(enum.StrEnum):
    TOPUP = "topup"
    ADJUSTMENT = "adjustment"
    ALLOWANCE = "allowance"
    HOLD = "hold"
    SETTLE = "settle"
    REFUND = "refund"
    EXPIRE = "expire"
    CONSUME = "consume"
    REVERSAL = "reversal"
    OPENING = "opening"
    """A balance brought over from a relay's own books (import-relay)."""


ADMIN_ONLY_DETAILS = frozenset({"note"})
"""`details` keys that hold an admin's free text (the `note` of a top-up, adjustment or reversal). Relays see a
request's entries without them (GET /v1/holds/{id}); admins and auditors see everything. A refund's `reason` is
not among them: the relay wrote it."""


def without_admin_details(details: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in details.items() if key not in ADMIN_ONLY_DETAILS}


class UnbalancedEntry(ValueError):
    """An entry whose postings do not sum to zero in some ledger (a bug in a posting rule)."""


class Posting(NamedTuple):
    """One line of an entry: `amount` (signed) to `account` in `ledger`. Ordered by ledger, account, amount.

    A named tuple rather than a frozen dataclass: immutable and ordered all the same, and a batch of 100
    operations builds several hundred of them, where a frozen dataclass's constructor is several times slower.
    """

    ledger: SubLedger
    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class EntryDraft:
    """A balanced set of postings with what they are about. Zero-amount postings are dropped."""

    kind: EntryKind
    postings: tuple[Posting, ...]
    request_id: str | None = None
    user_id: int | None = None
    token_id: int | None = None
    channel_id: int | None = None
    reference: str | None = None
    reverses: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        postings = tuple(sorted([p for p in self.postings if p.amount != 0]))
        object.__setattr__(self, "postings", postings)
        # Sorted by ledger, then account: a ledger's postings are consecutive, and so are an account's.
        totals: dict[SubLedger, int] = {}
        previous: tuple[SubLedger, str] | None = None
        for ledger, account, amount in postings:
            if (ledger, account) == previous:
                raise UnbalancedEntry(f"{account} is posted twice in {ledger}")
            previous = (ledger, account)
            if not -MAX_AMOUNT <= amount <= MAX_AMOUNT:
                raise UnbalancedEntry(f"posting of {amount} to {account} is out of range")
            totals[ledger] = totals.get(ledger, 0) + amount
        if any(totals.values()):
            unbalanced = {ledger: total for ledger, total in totals.items() if total != 0}
            raise UnbalancedEntry(f"{self.kind} entry does not balance: {unbalanced}")

    def content_hash(self) -> bytes:
        """SHA-256 of the entry's content in the canonical JSON form (domain/canonical.py)."""
        return content_hash(
            kind=self.kind,
            request_id=self.request_id,
            user_id=self.user_id,
            token_id=self.token_id,
            channel_id=self.channel_id,
            reference=self.reference,
            reverses=self.reverses,
            details=self.details,
            postings=self.postings,
        )


def content_hash(
    *,
    kind: str,
    request_id: str | None,
    user_id: int | None,
    token_id: int | None,
    channel_id: int | None,
    reference: str | None,
    reverses: int | None,
    details: Mapping[str, Any],
    postings: Iterable[Posting],
) -> bytes:
    """Hash of what an entry says, independent of its id and time (those are bound by the sealed chain).

    The same function hashes a draft and an entry read back from the database, so a changed posting, detail or
    reference shows up as a mismatch. Details must hold only strings, integers, booleans, None, lists and maps.
    """
    document = {
        "kind": str(kind),
        "request_id": request_id,
        "user_id": user_id,
        "token_id": token_id,
        "channel_id": channel_id,
        "reference": reference,
        "reverses": reverses,
        "details": details,
        "postings": [[str(p.ledger), p.account, p.amount] for p in sorted(postings)],
    }
    return hashlib.sha256(canonical_json(document)).digest()


def _quota(account: str, amount: int) -> Posting:
    return Posting(SubLedger.QUOTA, account, amount)


def _allowance(account: str, amount: int) -> Posting:
    return Posting(SubLedger.ALLOWANCE, account, amount)


def funding_postings(user_id: int, amount: int) -> tuple[Posting, ...]:
    """Top-up or adjustment A: system:issuance -A, user +A."""
    return (_quota(accounts.ISSUANCE, -amount), _quota(accounts.user(user_id), amount))


def allowance_postings(token_id: int, delta: int) -> tuple[Posting, ...]:
    """Allowance set from r to R (delta = R - r): system:allowance -delta, token +delta."""
    return (_allowance(accounts.ALLOWANCE_POOL, -delta), _allowance(accounts.token(token_id), delta))


def hold_postings(*, request_id: str, user_id: int, token_id: int, amount: int, limited: bool) -> tuple[Posting, ...]:
    """Hold P: user -P, hold +P; for a limited token also token -P, hold +P in allowance."""
    hold = accounts.hold(request_id)
    postings = [_quota(accounts.user(user_id), -amount), _quota(hold, amount)]
    if limited:
        postings += [_allowance(accounts.token(token_id), -amount), _allowance(hold, amount)]
    return tuple(postings)


def settle_postings(
    *, request_id: str, user_id: int, token_id: int, channel_id: int, held: int, charge: int, limited: bool
) -> tuple[Posting, ...]:
    """Settle C with P held: hold -P, channel +C, user +(P-C); allowance: hold -P, system +C, token +(P-C)."""
    hold = accounts.hold(request_id)
    postings = [
        _quota(hold, -held),
        _quota(accounts.channel(channel_id), charge),
        _quota(accounts.user(user_id), held - charge),
    ]
    if limited:
        postings += [
            _allowance(hold, -held),
            _allowance(accounts.ALLOWANCE_POOL, charge),
            _allowance(accounts.token(token_id), held - charge),
        ]
    return tuple(postings)


def direct_charge_postings(
    *, user_id: int, token_id: int, channel_id: int, charge: int, limited: bool
) -> tuple[Posting, ...]:
    """A charge with nothing held (trusted settle, late settle, consumption): user -C, channel +C; token -C."""
    postings = [_quota(accounts.user(user_id), -charge), _quota(accounts.channel(channel_id), charge)]
    if limited:
        postings += [
            _allowance(accounts.token(token_id), -charge),
            _allowance(accounts.ALLOWANCE_POOL, charge),
        ]
    return tuple(postings)


def release_postings(*, request_id: str, user_id: int, token_id: int, held: int, limited: bool) -> tuple[Posting, ...]:
    """Refund or expiry of P: hold -P, user +P; allowance: hold -P, token +P."""
    hold = accounts.hold(request_id)
    postings = [_quota(hold, -held), _quota(accounts.user(user_id), held)]
    if limited:
        postings += [_allowance(hold, -held), _allowance(accounts.token(token_id), held)]
    return tuple(postings)


def reversal_postings(original: Iterable[Posting]) -> tuple[Posting, ...]:
    """Every posting of the original entry, negated."""
    return tuple(Posting(p.ledger, p.account, -p.amount) for p in original)
