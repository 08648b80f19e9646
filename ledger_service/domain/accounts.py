"""Ledgers and account addresses (`kind:id`), as listed in the chart of accounts (docs/accounting.md)."""

from __future__ import annotations

import enum


class SubLedger(enum.StrEnum):
    """A unit of account. Amounts of different ledgers never mix, and each entry balances per ledger."""

    QUOTA = "quota"
    """The money: 500,000 quota = 1 USD."""

    ALLOWANCE = "allowance"
    """Token spending caps, kept apart from the money they limit."""


class AccountKind(enum.StrEnum):
    """The part of an address before the colon."""

    SYSTEM = "system"
    USER = "user"
    TOKEN = "token"  # noqa: S105 - an account kind, not a secret
    HOLD = "hold"
    CHANNEL = "channel"


ISSUANCE = "system:issuance"
"""Quota source: its balance is minus the total quota ever issued."""

ALLOWANCE_POOL = "system:allowance"
"""Allowance source of token caps and sink of consumed allowance."""


def user(user_id: int) -> str:
    return f"user:{user_id}"


def token(token_id: int) -> str:
    return f"token:{token_id}"


def channel(channel_id: int) -> str:
    return f"channel:{channel_id}"


def hold(request_id: str) -> str:
    return f"hold:{request_id}"


def kind_of(address: str) -> AccountKind | None:
    """The kind of an address, or None when it is not a well-formed address of a known kind."""
    kind, sep, rest = address.partition(":")
    if not sep or not rest:
        return None
    try:
        return AccountKind(kind)
    except ValueError:
        return None


_LEDGERS_OF_KIND = {
    AccountKind.USER: (SubLedger.QUOTA,),
    AccountKind.CHANNEL: (SubLedger.QUOTA,),
    AccountKind.TOKEN: (SubLedger.ALLOWANCE,),
    AccountKind.HOLD: (SubLedger.QUOTA, SubLedger.ALLOWANCE),
}

SYSTEM_ACCOUNTS = {ISSUANCE: (SubLedger.QUOTA,), ALLOWANCE_POOL: (SubLedger.ALLOWANCE,)}


def ledgers_of(address: str) -> tuple[SubLedger, ...] | None:
    """The ledgers an address lives in, or None when it is not an address of the chart of accounts."""
    if address in SYSTEM_ACCOUNTS:
        return SYSTEM_ACCOUNTS[address]
    kind = kind_of(address)
    if kind is None or kind is AccountKind.SYSTEM:
        return None
    rest = address.partition(":")[2]
    if kind is AccountKind.HOLD:
        valid = 1 <= len(rest) <= 128 and all(c.isascii() and (c.isalnum() or c in "._:-") for c in rest)
    else:
        valid = rest.isascii() and rest.isdigit() and len(rest) <= 19 and 1 <= int(rest) <= 2**63 - 1 and rest[0] != "0"
    return _LEDGERS_OF_KIND[kind] if valid else None
