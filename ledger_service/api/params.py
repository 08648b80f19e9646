"""Path parameters arrive as strings and are checked here, so a malformed one is a 400, never a 404 or 500."""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import datetime

from ledger_service.domain import errors
from ledger_service.domain.operations import INVISIBLE
from ledger_service.observability import bind_request_id
from ledger_service.schemas import MAX_ID

_KEY = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")
_NAME = re.compile(rf"\A[^{INVISIBLE}]{{1,200}}\Z")
_DIGITS = re.compile(r"\A[0-9]{1,19}\Z")


def parse_id(raw: str, name: str) -> int:
    if _DIGITS.match(raw):
        value = int(raw)
        if 1 <= value <= MAX_ID:
            return value
    raise errors.ValidationFailed(f"{name} must be an integer between 1 and {MAX_ID}")


def parse_key(raw: str, name: str = "request_id") -> str:
    if not _KEY.match(raw):
        raise errors.ValidationFailed(f"{name} must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    if name == "request_id":
        bind_request_id(raw)
    return raw


def parse_name(raw: str, name: str) -> str:
    if not _NAME.match(raw):
        raise errors.ValidationFailed(
            f"{name} must be 1-200 characters, none of them control, format or line separators"
        )
    return raw


def parse_limit(raw: str | None, *, default: int = 100, maximum: int = 1000) -> int:
    if raw is None:
        return default
    if _DIGITS.match(raw) and 1 <= int(raw) <= maximum:
        return int(raw)
    raise errors.ValidationFailed(f"limit must be an integer between 1 and {maximum}")


def parse_time(raw: str | None, name: str) -> datetime | None:
    """An RFC 3339 timestamp with its offset (`2026-03-01T00:00:00Z`); naive times are refused."""
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise errors.ValidationFailed(f"{name} must be an RFC 3339 timestamp such as 2026-03-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise errors.ValidationFailed(f"{name} must carry a UTC offset (Z or +hh:mm)")
    return value


def parse_choice(raw: str | None, name: str, choices: Collection[str], *, default: str | None = None) -> str:
    if raw is None and default is not None:
        return default
    if raw is None or raw not in choices:
        raise errors.ValidationFailed(f"{name} must be one of {', '.join(sorted(choices))}")
    return raw


def parse_optional_id(raw: str | None, name: str) -> int | None:
    return None if raw is None else parse_id(raw, name)
