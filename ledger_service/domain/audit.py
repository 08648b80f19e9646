"""Audit primitives: the feed position of an entry, the sealed hash chain, and which entries can be reversed.

Feed order. Entries are listed in (txid, id) order and only below the current transaction horizon (see
db/snapshots.py). Below the horizon the set of entries is final, so a reader that remembers the last position it
saw and asks again later gets exactly the entries that became final since: none is skipped because it committed
after an entry with a higher id, which an id-ordered cursor would do.

Sealed blocks. A sealer takes the entries that became final since the last block, in feed order, and chains them:

    block.hash = SHA-256(prev_hash, then for every entry: "id|created_at|entry_hash\n")

so changing, inserting or deleting any sealed entry, or its id or time, breaks every hash from its block on.
An entry's own hash (domain/entries.py) covers its postings, parties, reference and details.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from ledger_service.domain import errors
from ledger_service.domain.accounts import AccountKind, SubLedger, kind_of
from ledger_service.domain.entries import EntryKind

GENESIS_HASH = bytes(32)
"""prev_hash of the first block."""


@dataclass(frozen=True, slots=True, order=True)
class FeedPosition:
    """Where an entry stands in the feed: its transaction id, then its id."""

    txid: int
    entry_id: int

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.txid}.{self.entry_id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> FeedPosition:
        """Parse a cursor from a client; anything malformed is a validation error."""
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            txid, entry_id = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii").split(".")
            position = cls(int(txid), int(entry_id))
        except (ValueError, UnicodeError, binascii.Error):
            raise errors.ValidationFailed("cursor is not one this service handed out") from None
        if position.txid < 0 or position.entry_id < 0 or position.txid >= 2**63 or position.entry_id >= 2**63:
            raise errors.ValidationFailed("cursor is not one this service handed out")
        return position


@dataclass(frozen=True, slots=True, order=True)
class StatementPosition:
    """Where a posting stands in an account statement: its entry's feed position, then its ledger.

    An entry can post to an account in both ledgers (a hold account does), so a page may end between the two.
    """

    txid: int
    entry_id: int
    ledger: str

    def encode(self) -> str:
        raw = f"{self.txid}.{self.entry_id}.{self.ledger}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> StatementPosition:
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            txid, entry_id, ledger = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii").split(".")
            position = cls(int(txid), int(entry_id), ledger)
        except (ValueError, UnicodeError, binascii.Error):
            raise errors.ValidationFailed("cursor is not one this service handed out") from None
        if not (0 <= position.txid < 2**63 and 0 <= position.entry_id < 2**63) or ledger not in LEDGER_NAMES:
            raise errors.ValidationFailed("cursor is not one this service handed out")
        return position


STATEMENT_START = StatementPosition(0, 0, "")
LEDGER_NAMES = frozenset(str(ledger) for ledger in SubLedger)


@dataclass(frozen=True, slots=True)
class SealedEntry:
    position: FeedPosition
    created_at: datetime
    hash: bytes


def block_hash(prev_hash: bytes, entries: Iterable[SealedEntry]) -> bytes:
    digest = hashlib.sha256(prev_hash)
    for entry in entries:
        created = entry.created_at.astimezone(UTC).isoformat(timespec="microseconds")
        digest.update(f"{entry.position.entry_id}|{created}|{entry.hash.hex()}\n".encode())
    return digest.digest()


def check_reversible(kind: str, accounts: Iterable[str]) -> None:
    """An entry may be reversed unless it is a reversal or moves money through a hold account.

    Negating a hold, refund, expiry or hold settlement would put money back into (or take it out of) the clearing
    account of a resolved request, which must stay at zero; such mistakes are corrected with an adjustment.
    """
    if kind == EntryKind.REVERSAL:
        raise errors.EntryNotReversible("a reversal cannot itself be reversed; post an adjustment instead")
    if any(kind_of(account) is AccountKind.HOLD for account in accounts):
        raise errors.EntryNotReversible(
            f"this {kind} entry moves money through a hold account; correct it with an adjustment instead"
        )
