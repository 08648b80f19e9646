"""Path parameters arrive as strings and are checked here, so a malformed one is a 400, never a 404 or 500."""

from __future__ import annotations

import codecs
import re
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

from litestar.openapi.spec import OpenAPIType
from litestar.params import Parameter

from ledger_service.domain import errors
from ledger_service.domain.operations import INVISIBLE
from ledger_service.observability import bind_request_id
from ledger_service.schemas import MAX_ID

_KEY = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")
_NAME = re.compile(rf"\A[^{INVISIBLE}]{{1,200}}\Z")
_DIGITS = re.compile(r"\A[0-9]{1,19}\Z")
INSTANT_PATTERN = (
    r"\A([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?"
    r"(?:[Zz]|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))\Z"
)
_INSTANT = re.compile(INSTANT_PATTERN)
"""RFC 3339's date-time (section 5.6), its T and Z in either case, at most microseconds (the database's precision).
Not the space separator its note allows: in a query string a space is also what an unescaped `+` becomes."""


# What the OpenAPI document states for each parameter: the same rules as the parse_* functions below, no looser.
# The document's patterns are ECMA-262 (what JSON Schema, and the Go and JS clients generated from it, read): `^` and
# `$` anchor the whole value there, and characters outside ASCII are written as themselves, not as Python escapes.
# The Python checks keep `\A...\Z`: in Python, `$` would also match before a trailing newline (docs/api.md).

KEY_OPENAPI_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
NAME_OPENAPI_PATTERN = f"^[^{codecs.decode(INVISIBLE, 'unicode_escape')}]{{1,200}}$"
INSTANT_OPENAPI_PATTERN = (
    r"^(?:000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,6})?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
"""INSTANT_PATTERN with its fields' ranges (no year 0); `format: date-time` states the rest (no 30 February). Not
stated: the API also refuses the few instants of years 1 and 9999 whose offset takes them outside years 1-9999 in UTC
(`0001-01-01T00:00:00+01:00`)."""
_ID_OPENAPI = r"(?:[1-9][0-9]{0,17}|[1-8][0-9]{18})"
"""1..8999999999999999999 in digits: the ids of account addresses (a little short of 2^63-1, never beyond it)."""
ADDRESS_OPENAPI_PATTERN = (
    rf"^(?:system:(?:issuance|allowance)|(?:user|token|channel):{_ID_OPENAPI}|hold:[A-Za-z0-9._:-]{{1,128}})$"
)
CURSOR_OPENAPI_PATTERN = r"^[A-Za-z0-9_-]+$"
POSITION_OPENAPI_PATTERN = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"
_POSITION = re.compile(r"\A[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}\Z")


def _schema(**fields: Any) -> dict[str, Any]:
    """Fields that replace those of the generated schema; `one_of: None` drops the `string | null` of an
    optional query parameter (leaving it out is how a client sends no value)."""
    return {"one_of": None, **fields}


def _id_schema(name: str) -> dict[str, Any]:
    return _schema(
        type=OpenAPIType.INTEGER, minimum=1, maximum=MAX_ID, description=f"{name}: an integer id, 1..2^63-1."
    )


def _key_schema(description: str) -> dict[str, Any]:
    return _schema(
        type=OpenAPIType.STRING, pattern=KEY_OPENAPI_PATTERN, min_length=1, max_length=128, description=description
    )


def choices_schema(choices: Iterable[str], description: str) -> dict[str, Any]:
    return _schema(type=OpenAPIType.STRING, enum=sorted(choices), description=description)


def limit_schema(maximum: int = 1000, default: int = 100) -> dict[str, Any]:
    return _schema(
        type=OpenAPIType.INTEGER,
        minimum=1,
        maximum=maximum,
        description=f"Page size, 1..{maximum} (default {default}).",
    )


INSTANT_SCHEMA = _schema(
    type=OpenAPIType.STRING,
    format="date-time",
    pattern=INSTANT_OPENAPI_PATTERN,
    description="An RFC 3339 date-time with an offset, at most 6 fraction digits, within years 1-9999 in UTC.",
)
CURSOR_SCHEMA = _schema(
    type=OpenAPIType.STRING,
    pattern=CURSOR_OPENAPI_PATTERN,
    description="The `next_cursor` of the previous page, as the service handed it out (opaque).",
)
ADDRESS_SCHEMA = _schema(
    type=OpenAPIType.STRING,
    pattern=ADDRESS_OPENAPI_PATTERN,
    description="An account of the chart: system:issuance, system:allowance, user:<id>, token:<id>, channel:<id>"
    " or hold:<request_id>.",
)

PathId = Annotated[str, Parameter(schema_extra=_id_schema("The id"))]
"""An id path parameter: 1-19 digits, 1..2^63-1 (parse_id)."""
QueryId = Annotated[str | None, Parameter(required=False, schema_extra=_id_schema("A filter"))]
PathKey = Annotated[str, Parameter(schema_extra=_key_schema("A request id: 1-128 characters of A-Z a-z 0-9 . _ : -"))]
QueryKey = Annotated[
    str | None, Parameter(required=False, schema_extra=_key_schema("1-128 characters of A-Z a-z 0-9 . _ : -"))
]
PathName = Annotated[
    str,
    Parameter(
        schema_extra=_schema(
            type=OpenAPIType.STRING,
            pattern=NAME_OPENAPI_PATTERN,
            min_length=1,
            max_length=200,
            description="1-200 characters; no control (Cc), format (Cf) or line separator characters.",
        )
    ),
]
PathAddress = Annotated[str, Parameter(schema_extra=ADDRESS_SCHEMA)]
QueryCursor = Annotated[str | None, Parameter(required=False, schema_extra=CURSOR_SCHEMA)]
POSITION_SCHEMA = _schema(
    type=OpenAPIType.STRING,
    pattern=POSITION_OPENAPI_PATTERN,
    max_length=17,
    description="A `Ledger-Position` a write answered with: the answer shows that write (and everything before"
    " it). With LEDGER_READ_DATABASE_URL, the replica serves it once it has replayed that far, the primary"
    " otherwise.",
)
QueryPosition = Annotated[str | None, Parameter(required=False, schema_extra=POSITION_SCHEMA)]
"""`min_position` of the audit reads (services/replicas.py)."""
QueryLimit = Annotated[str | None, Parameter(required=False, schema_extra=limit_schema())]


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
    """An RFC 3339 date-time with its offset (`2026-03-01T00:00:00Z`), as an aware datetime in UTC.

    Only RFC 3339's own syntax: `datetime.fromisoformat` would also take ISO 8601's basic and week forms
    (`20260101T000000Z`, `2026-W01-1`). An instant that UTC cannot hold (`0001-01-01T00:00:00+23:59`) is refused
    here, not when the query meets it.
    """
    if raw is None:
        return None
    match = _INSTANT.match(raw)
    if match is None:
        raise errors.ValidationFailed(
            f"{name} must be an RFC 3339 timestamp with an offset, such as 2026-03-01T00:00:00Z"
            " (YYYY-MM-DDTHH:MM:SS[.ffffff] then Z or +hh:mm/-hh:mm)"
        )
    year, month, day, hour, minute, second, fraction, sign, offset_hours, offset_minutes = match.groups()
    offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    try:
        value = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "").ljust(6, "0")),
            tzinfo=timezone(-offset if sign == "-" else offset),
        )
        return value.astimezone(UTC)
    except (ValueError, OverflowError):  # 2026-02-30, hour 24, or an instant before year 1 or after 9999 in UTC
        raise errors.ValidationFailed(
            f"{name} is no date and time, or not one between years 1 and 9999 in UTC"
        ) from None


def parse_choice(raw: str | None, name: str, choices: Collection[str], *, default: str | None = None) -> str:
    if raw is None and default is not None:
        return default
    if raw is None or raw not in choices:
        raise errors.ValidationFailed(f"{name} must be one of {', '.join(sorted(choices))}")
    return raw


def parse_position(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not _POSITION.match(raw):
        raise errors.ValidationFailed("min_position must be a Ledger-Position header's value, such as 0/1A2B3C4")
    return raw


def parse_optional_id(raw: str | None, name: str) -> int | None:
    return None if raw is None else parse_id(raw, name)
