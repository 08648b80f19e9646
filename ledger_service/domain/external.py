"""Provider records: the usage and cost exports of OpenAI and Anthropic, and a plain CSV, read into one record type.

Pure: bytes in, `ExternalRecord`s out, or a `MalformedFile` naming the first bad line or field. No I/O.

Sources and units (docs/external.md, "Provider records"):

- `openai_usage`: pages of `GET /v1/organization/usage/completions`. `input_tokens` INCLUDES the cached tokens
  (OpenAI's reference: "The aggregated number of text input tokens used, including cached tokens"); it is kept as
  it came, with `input_cached_tokens` as `cached_tokens`. Requests are `num_model_requests`.
- `openai_costs`: pages of `GET /v1/organization/costs`. `amount.value` is a JSON number in the currency's main
  unit (OpenAI's reference: "The numeric value of the cost", `currency` "Lowercase ISO-4217 currency e.g. usd"),
  so USD as it is. `line_item` (with `group_by=line_item`) is free text; the reference does not state its form.
  Exports seen in the wild write `"<model>, input"`, `"<model>, cached input"`, `"<model>, output"`, sometimes
  `"<model> <modality>, <component>"` or `"<tier> | <model>, ..."`, and `"web search tool calls"` for non-model
  items: the model is the first word before the first comma (after any `"<tier> | "`), else none.
- `anthropic_usage`: `GET /v1/organizations/usage_report/messages`. Anthropic splits the input:
  `uncached_input_tokens`, `cache_read_input_tokens`, and `cache_creation.{ephemeral_5m,ephemeral_1h}_input_tokens`.
  Decision: `input_tokens` = uncached + cache read + cache creation (every input token, as OpenAI counts them, and as
  Anthropic's Messages API defines a request's total input), `cached_tokens` = cache read, `cache_creation_tokens` =
  both cache creation counts. Each component stays in `raw`. The report has no request count (`requests` is null).
  `workspace_id` is kept as `project_id`.
- `anthropic_costs`: `GET /v1/organizations/cost_report`. `amount` is a decimal string in the currency's LOWEST unit:
  Anthropic's reference (platform.claude.com/docs/en/api/admin/cost_report/retrieve): "Cost amount in lowest
  currency units (e.g. cents) as a decimal string. For example, "123.45" in "USD" represents $1.23." So
  `cost_usd = amount / 100`, exactly. `description` is kept as `line_item`, `workspace_id` as `project_id`.
- `csv`: `date,channel|api_key_id,model,input_tokens,output_tokens,requests,cost_usd` with optional
  `cached_tokens` and `project_id`; `date` is a UTC day.

Money is exact: JSON numbers are read as Decimals (never floats); only USD is accepted. Token counts are integers
0..10^15. JSON sources take one page, a JSON array of pages, or JSON Lines (a page per line).
"""

from __future__ import annotations

import csv
import enum
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

MAX_TOKENS = 10**15
"""The largest token or request count accepted (contract section 8)."""

MAX_COST_USD = Decimal(10**12)
"""The largest cost (in absolute value) one record may carry; more is a unit mistake, not a bill."""

MAX_COST_DIGITS = 40
"""Significant digits a cost may have."""

MAX_TEXT = 200
"""The longest identifier (api key, project, model) kept."""


class Source(enum.StrEnum):
    OPENAI_USAGE = "openai_usage"
    OPENAI_COSTS = "openai_costs"
    ANTHROPIC_USAGE = "anthropic_usage"
    ANTHROPIC_COSTS = "anthropic_costs"
    CSV = "csv"


class MalformedFile(ValueError):
    """The file is not of its source's shape; the message names the first bad line or field."""


@dataclass(frozen=True, slots=True)
class ExternalRecord:
    """One row of `external_records`, as a provider's file states it."""

    line: int
    """1-based: the CSV line, or the n-th result in the file."""
    bucket_start: datetime
    bucket_end: datetime
    api_key_id: str | None = None
    project_id: str | None = None
    channel_id: int | None = None
    """Only a CSV's `channel` column says this; otherwise the channel map decides (docs/external.md)."""
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    cache_creation_tokens: int | None = None
    requests: int | None = None
    cost_usd: Decimal | None = None
    currency: str | None = None
    line_item: str | None = None
    raw: bytes = b"{}"
    """The record as it came, as JSON text (numbers digit for digit)."""


_RAW = msgspec.json.Encoder(decimal_format="number")


def _show(value: Any) -> str:
    """A value as the error message shows it: JSON text (strings quoted), cut short."""
    if isinstance(value, Decimal):
        text = str(value)
    elif isinstance(value, dict):
        text = "an object"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


class _Where:
    """The path of a field in the file, for error messages: `line 7: ` and/or `data[2].results[0].amount.value`.
    Built as a chain and spelt out only when a field is refused (most never are)."""

    __slots__ = ("parent", "part", "prefix")

    def __init__(self, prefix: str, part: str | int = "", parent: _Where | None = None) -> None:
        self.prefix = prefix
        self.part = part
        self.parent = parent

    def __truediv__(self, part: str | int) -> _Where:
        return _Where(self.prefix, part, self)

    @property
    def path(self) -> str:
        parts: list[str | int] = []
        node: _Where | None = self
        while node is not None:
            if node.part != "":
                parts.append(node.part)
            node = node.parent
        text = ""
        for part in reversed(parts):
            if isinstance(part, int):
                text += f"[{part}]"
            elif part.startswith("["):
                text += part
            else:
                text += f".{part}" if text else part
        return text

    def fail(self, message: str) -> MalformedFile:
        path = self.path
        return MalformedFile(f"{self.prefix}{path}: {message}" if path else f"{self.prefix}{message}")


# Field readers -----------------------------------------------------------------------------------------------


def _count(value: Any, where: _Where, *, required: bool = True) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise where.fail(f"expected a non-negative integer (at most 10^15), got {_show(value)}")
    return value


def _zero_if_null(value: Any) -> Any:
    """A cache count left out or null: none were cached."""
    return 0 if value is None else value


def _text(value: Any, where: _Where, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT or "\x00" in value:
        raise where.fail(f"expected a string of 1-{MAX_TEXT} characters, got {_show(value)}")
    return value


def _free_text(value: Any, where: _Where) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value or len(value) > 1000:
        raise where.fail(f"expected a string of at most 1000 characters, got {_show(value)}")
    return value


def _cost(value: Decimal, where: _Where) -> Decimal:
    if not value.is_finite() or abs(value) > MAX_COST_USD or len(value.as_tuple().digits) > MAX_COST_DIGITS:
        raise where.fail(f"expected a finite amount of at most 10^12 USD, got {_show(value)}")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_COST_DIGITS:
        raise where.fail(f"expected at most {MAX_COST_DIGITS} decimal places, got {_show(value)}")
    return value


_DECIMAL = re.compile(r"\A-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?\Z")


def _decimal_string(value: Any, where: _Where) -> Decimal:
    if not isinstance(value, str) or not _DECIMAL.match(value):
        raise where.fail(f'expected a decimal number such as "12.5", got {_show(value)}')
    return _cost(Decimal(value), where)


def _number(value: Any, where: _Where) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise where.fail(f"expected a number, got {_show(value)}")
    return _cost(Decimal(value), where)


def _usd(value: Any, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.fail(f'expected a currency code such as "usd", got {_show(value)}')
    if value.lower() != "usd":
        raise where.fail(f"only USD amounts are accepted, got {_show(value)}; convert the file to USD first")
    return "USD"


_INSTANT = re.compile(
    r"\A([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))\Z"
)


def _instant(value: Any, where: _Where) -> datetime:
    """An RFC 3339 date-time with its offset, in UTC."""
    match = _INSTANT.match(value) if isinstance(value, str) else None
    if match is None:
        raise where.fail(f'expected an RFC 3339 time such as "2025-08-01T00:00:00Z", got {_show(value)}')
    year, month, day, hour, minute, second, fraction, sign, offset_hours, offset_minutes = match.groups()
    try:
        offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "").ljust(6, "0")),
            tzinfo=UTC,
        )
        return moment + offset if sign == "-" else moment - offset
    except (ValueError, OverflowError):
        raise where.fail(f"no such date and time: {_show(value)}") from None


_MIN_UNIX, _MAX_UNIX = 0, 253402300799  # 1970-01-01 .. 9999-12-31T23:59:59Z


def _unix(value: Any, where: _Where) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int) or not _MIN_UNIX <= value <= _MAX_UNIX:
        raise where.fail(f"expected Unix seconds (an integer), got {_show(value)}")
    return datetime.fromtimestamp(value, UTC)


def _object(value: Any, where: _Where) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise where.fail(f"expected an object, got {_show(value)}")
    return value


def _array(value: Any, where: _Where) -> list[Any]:
    if not isinstance(value, list):
        raise where.fail(f"expected an array, got {_show(value)}")
    return value


def _const(value: Any, expected: str, where: _Where, hint: str = "") -> None:
    """An `object` tag, when present, must be the source's (a costs file uploaded as usage is caught here)."""
    if value is not None and value != expected:
        raise where.fail(f'expected "{expected}", got {_show(value)}{hint}')


def _bucket(start: datetime, end: datetime, where: _Where) -> tuple[datetime, datetime]:
    if end <= start:
        raise where.fail("the bucket ends before it starts")
    return start, end


# JSON documents ----------------------------------------------------------------------------------------------


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {json.dumps(twice)} appears twice in one object")
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)


def _text_of(content: bytes) -> str:
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MalformedFile(f"the file is not UTF-8 text (byte {error.start + 1})") from None


def _pages(content: bytes) -> Iterator[tuple[Any, _Where]]:
    """The pages of a JSON export with where each is: one page, an array of pages, or JSON Lines."""
    text = _text_of(content)
    if not text.strip():
        raise MalformedFile("the file is empty")
    try:
        document = _loads(text)
    except json.JSONDecodeError as error:
        whole = MalformedFile(f"line {error.lineno} column {error.colno}: {error.msg}")
        if error.msg != "Extra data" or error.lineno == 1:
            raise whole from None
        # A first value, then more: JSON Lines if the first line is a page by itself, else a document with junk.
        first = next(line for line in text.splitlines() if line.strip())
        try:
            _loads(first)
        except (ValueError, RecursionError):
            raise whole from None
        yield from _json_lines(text)
        return
    except (ValueError, RecursionError) as error:
        raise MalformedFile(_message(error)) from None
    if isinstance(document, list):
        for index, page in enumerate(document):
            yield page, _Where("", f"[{index}]")
    else:
        yield document, _Where("")


def _message(error: BaseException) -> str:
    return "the JSON is nested too deeply" if isinstance(error, RecursionError) else str(error)


def _json_lines(text: str) -> Iterator[tuple[Any, _Where]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            page = _loads(line)
        except json.JSONDecodeError as error:
            raise MalformedFile(f"line {number} column {error.colno}: {error.msg}") from None
        except (ValueError, RecursionError) as error:
            raise MalformedFile(f"line {number}: {_message(error)}") from None
        yield page, _Where(f"line {number}: ")


ResultReader = Callable[[dict[str, Any], _Where, int, datetime, datetime], ExternalRecord]


def _read_pages(
    content: bytes,
    read: ResultReader,
    *,
    times: Callable[[dict[str, Any], _Where], tuple[datetime, datetime]],
    page_tag: str | None,
) -> list[ExternalRecord]:
    records: list[ExternalRecord] = []
    for page, where in _pages(content):
        page = _object(page, where)
        if page_tag is not None:
            _const(page.get("object"), page_tag, where / "object")
        if "data" not in page:
            raise (where / "data").fail("missing: the export's pages hold their buckets in `data`")
        for b, bucket in enumerate(_array(page["data"], where / "data")):
            at = where / "data" / b
            bucket = _object(bucket, at)
            if page_tag is not None:
                _const(bucket.get("object"), "bucket", at / "object")
            start, end = _bucket(*times(bucket, at), at)
            name = "results" if "results" in bucket or "result" not in bucket else "result"
            if name not in bucket:
                raise (at / name).fail("missing")
            for r, result in enumerate(_array(bucket[name], at / name)):
                records.append(read(_object(result, at / name / r), at / name / r, len(records) + 1, start, end))
    return records


def _unix_times(bucket: dict[str, Any], at: _Where) -> tuple[datetime, datetime]:
    return _unix(bucket.get("start_time"), at / "start_time"), _unix(bucket.get("end_time"), at / "end_time")


def _rfc3339_times(bucket: dict[str, Any], at: _Where) -> tuple[datetime, datetime]:
    return _instant(bucket.get("starting_at"), at / "starting_at"), _instant(bucket.get("ending_at"), at / "ending_at")


_SOURCE_HINT = {
    "organization.usage.completions.result": " (an openai_usage file?)",
    "organization.costs.result": " (an openai_costs file?)",
}


def _openai_usage(result: dict[str, Any], at: _Where, line: int, start: datetime, end: datetime) -> ExternalRecord:
    tag = result.get("object")
    _const(tag, "organization.usage.completions.result", at / "object", _SOURCE_HINT.get(str(tag), ""))
    return ExternalRecord(
        line=line,
        bucket_start=start,
        bucket_end=end,
        api_key_id=_text(result.get("api_key_id"), at / "api_key_id"),
        project_id=_text(result.get("project_id"), at / "project_id"),
        model=_text(result.get("model"), at / "model"),
        input_tokens=_count(result.get("input_tokens"), at / "input_tokens"),
        output_tokens=_count(result.get("output_tokens"), at / "output_tokens"),
        cached_tokens=_count(_zero_if_null(result.get("input_cached_tokens")), at / "input_cached_tokens"),
        requests=_count(result.get("num_model_requests"), at / "num_model_requests"),
        raw=_RAW.encode(result),
    )


_LINE_ITEM_MODEL = re.compile(r"\A(?:[^|,]+\|\s*)?([A-Za-z0-9][A-Za-z0-9._:/-]*)(?:\s[^,]*)?,")


def model_of_line_item(line_item: str | None) -> str | None:
    """The model an OpenAI costs line item names: `"gpt-4o-2024-08-06, input"` -> `gpt-4o-2024-08-06`;
    `"web search tool calls"` -> None (module docstring)."""
    if line_item is None:
        return None
    match = _LINE_ITEM_MODEL.match(line_item)
    return None if match is None or len(match.group(1)) > MAX_TEXT else match.group(1)


def _openai_costs(result: dict[str, Any], at: _Where, line: int, start: datetime, end: datetime) -> ExternalRecord:
    tag = result.get("object")
    _const(tag, "organization.costs.result", at / "object", _SOURCE_HINT.get(str(tag), ""))
    amount = _object(result.get("amount"), at / "amount")
    currency = _usd(amount.get("currency"), at / "amount" / "currency")
    line_item = _free_text(result.get("line_item"), at / "line_item")
    return ExternalRecord(
        line=line,
        bucket_start=start,
        bucket_end=end,
        api_key_id=_text(result.get("api_key_id"), at / "api_key_id"),
        project_id=_text(result.get("project_id"), at / "project_id"),
        model=model_of_line_item(line_item),
        cost_usd=_number(amount.get("value"), at / "amount" / "value"),
        currency=currency,
        line_item=line_item,
        raw=_RAW.encode(result),
    )


def _anthropic_usage(result: dict[str, Any], at: _Where, line: int, start: datetime, end: datetime) -> ExternalRecord:
    if "amount" in result:
        raise (at / "amount").fail("a cost, not usage (an anthropic_costs file?)")
    uncached = _count(result.get("uncached_input_tokens"), at / "uncached_input_tokens") or 0
    cache_read = _count(_zero_if_null(result.get("cache_read_input_tokens")), at / "cache_read_input_tokens") or 0
    creation = _object(result.get("cache_creation") or {}, at / "cache_creation")
    created = sum(
        _count(_zero_if_null(creation.get(name)), at / "cache_creation" / name) or 0
        for name in ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
    )
    return ExternalRecord(
        line=line,
        bucket_start=start,
        bucket_end=end,
        api_key_id=_text(result.get("api_key_id"), at / "api_key_id"),
        project_id=_text(result.get("workspace_id"), at / "workspace_id"),
        model=_text(result.get("model"), at / "model"),
        input_tokens=uncached + cache_read + created,
        output_tokens=_count(result.get("output_tokens"), at / "output_tokens"),
        cached_tokens=cache_read,
        cache_creation_tokens=created,
        raw=_RAW.encode(result),
    )


CENTS = Decimal(100)


def _anthropic_costs(result: dict[str, Any], at: _Where, line: int, start: datetime, end: datetime) -> ExternalRecord:
    if "amount" not in result:
        raise (at / "amount").fail("missing (an anthropic_usage file?)")
    currency = _usd(result.get("currency"), at / "currency")
    cents = _decimal_string(result.get("amount"), at / "amount")
    return ExternalRecord(
        line=line,
        bucket_start=start,
        bucket_end=end,
        project_id=_text(result.get("workspace_id"), at / "workspace_id"),
        model=_text(result.get("model"), at / "model"),
        cost_usd=cents.scaleb(-2),  # lowest currency unit (cents) to dollars, exactly
        currency=currency,
        line_item=_free_text(result.get("description"), at / "description"),
        raw=_RAW.encode(result),
    )


# CSV ---------------------------------------------------------------------------------------------------------

CSV_REQUIRED = ("date", "model", "input_tokens", "output_tokens", "requests", "cost_usd")
CSV_OPTIONAL = ("channel", "api_key_id", "cached_tokens", "project_id")
_DATE = re.compile(r"\A([0-9]{4})-([0-9]{2})-([0-9]{2})\Z")
_DIGITS = re.compile(r"\A[0-9]{1,19}\Z")


def _csv_count(value: str, where: _Where, *, required: bool = True) -> int | None:
    if value == "" and not required:
        return None
    if not _DIGITS.match(value) or int(value) > MAX_TOKENS:
        raise where.fail(f"expected a non-negative integer (at most 10^15), got {_show(value)}")
    return int(value)


def _csv_channel(value: str, where: _Where) -> int:
    if not _DIGITS.match(value) or not 1 <= int(value) <= 2**63 - 1:
        raise where.fail(f"expected a ledger channel id (a positive integer), got {_show(value)}")
    return int(value)


def _csv_date(value: str, where: _Where) -> datetime:
    match = _DATE.match(value)
    try:
        if match is None:
            raise ValueError
        return datetime(int(match[1]), int(match[2]), int(match[3]), tzinfo=UTC)
    except ValueError:
        raise where.fail(f"expected a date YYYY-MM-DD, got {_show(value)}") from None


def _csv(content: bytes) -> list[ExternalRecord]:
    text = _text_of(content)
    if "\x00" in text:
        raise MalformedFile("the file holds a NUL character: not a CSV text file")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or header == [] or header == [""]:
            raise MalformedFile("line 1: the file is empty: expected a header " + ",".join(CSV_REQUIRED))
        names = [name.strip() for name in header]
        unknown = [name for name in names if name not in CSV_REQUIRED + CSV_OPTIONAL]
        if unknown:
            raise MalformedFile(
                f"line 1: unknown column {_show(unknown[0])}; the columns are {', '.join(CSV_REQUIRED + CSV_OPTIONAL)}"
            )
        twice = [name for name in names if names.count(name) > 1]
        if twice:
            raise MalformedFile(f"line 1: the column {_show(twice[0])} appears twice")
        missing = [name for name in CSV_REQUIRED if name not in names]
        if missing:
            raise MalformedFile(f"line 1: missing column {_show(missing[0])}")
        if "channel" not in names and "api_key_id" not in names:
            raise MalformedFile('line 1: a "channel" or an "api_key_id" column is required')
        records: list[ExternalRecord] = []
        line = reader.line_num + 1
        for row in reader:
            start_line, line = line, reader.line_num + 1
            if not row:
                continue  # a blank line
            where = _Where(f"line {start_line}: ")
            if len(row) != len(names):
                raise where.fail(f"expected {len(names)} fields, got {len(row)}")
            cells = dict(zip(names, (cell.strip() for cell in row), strict=True))
            records.append(_csv_record(cells, where, start_line))
    except csv.Error as error:
        raise MalformedFile(f"line {reader.line_num}: {error}") from None
    return records


def _csv_record(cells: dict[str, str], where: _Where, line: int) -> ExternalRecord:
    day = _csv_date(cells["date"], where / "date")
    channel = cells.get("channel", "")
    api_key = cells.get("api_key_id", "")
    if not channel and not api_key:
        raise where.fail("a channel or an api_key_id is required")
    return ExternalRecord(
        line=line,
        bucket_start=day,
        bucket_end=day + timedelta(days=1),
        api_key_id=_text(api_key or None, where / "api_key_id"),
        project_id=_text(cells.get("project_id") or None, where / "project_id"),
        channel_id=_csv_channel(channel, where / "channel") if channel else None,
        model=_text(cells["model"], where / "model", required=True),
        input_tokens=_csv_count(cells["input_tokens"], where / "input_tokens"),
        output_tokens=_csv_count(cells["output_tokens"], where / "output_tokens"),
        cached_tokens=_csv_count(cells.get("cached_tokens", ""), where / "cached_tokens", required=False),
        requests=_csv_count(cells["requests"], where / "requests"),
        cost_usd=_decimal_string(cells["cost_usd"], where / "cost_usd") if cells["cost_usd"] else None,
        currency="USD" if cells["cost_usd"] else None,
        raw=_RAW.encode(cells),
    )


# Entry point -------------------------------------------------------------------------------------------------


def parse(source: Source, content: bytes) -> list[ExternalRecord]:
    """Every record of a provider's file, in file order; MalformedFile naming the first bad line or field."""
    if source is Source.CSV:
        return _csv(content)
    if source is Source.OPENAI_USAGE:
        return _read_pages(content, _openai_usage, times=_unix_times, page_tag="page")
    if source is Source.OPENAI_COSTS:
        return _read_pages(content, _openai_costs, times=_unix_times, page_tag="page")
    if source is Source.ANTHROPIC_USAGE:
        return _read_pages(content, _anthropic_usage, times=_rfc3339_times, page_tag=None)
    return _read_pages(content, _anthropic_costs, times=_rfc3339_times, page_tag=None)


def check_source(raw: str) -> Source:
    try:
        return Source(raw)
    except ValueError:
        raise ValueError(f"source must be one of {', '.join(source.value for source in Source)}") from None
