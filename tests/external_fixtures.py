"""Provider files of each source, built from the fields the providers document (docs/external.md), for the parsing,
upload and reconciliation tests.

Each builder returns the document as a Python value; `encode` turns it into the bytes a file would hold. Money is
given as strings and written as JSON numbers digit for digit (never through a float).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

DAY = 86400
START = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
"""2026-11-01T00:00:00Z, the first bucket of the fixtures."""


def encode(document: Any) -> bytes:
    """JSON bytes; a Decimal is written as a JSON number with exactly its digits."""
    return _dumps(document).encode()


def _dumps(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{_dumps(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_dumps(item) for item in value) + "]"
    return json.dumps(value)


def json_lines(pages: Sequence[Any]) -> bytes:
    """An export script's other usual output: a page per line."""
    return b"".join(encode(page) + b"\n" for page in pages)


# OpenAI ------------------------------------------------------------------------------------------------------


def openai_usage_result(
    *,
    input_tokens: int = 1000,
    output_tokens: int = 200,
    cached: int = 0,
    requests: int = 3,
    model: str | None = "gpt-4o-2024-08-06",
    api_key_id: str | None = "key_abc",
    project_id: str | None = "proj_abc",
    **extra: Any,
) -> dict[str, Any]:
    """One `organization.usage.completions.result`; `input_tokens` includes the `cached` ones, as OpenAI counts."""
    return {
        "object": "organization.usage.completions.result",
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_cached_tokens": cached,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": requests,
        "project_id": project_id,
        "user_id": None,
        "api_key_id": api_key_id,
        "model": model,
        "batch": False,
        **extra,
    }


def openai_cost_result(
    value: str = "0.06", *, line_item: str | None = "gpt-4o-2024-08-06, input", project_id: str | None = "proj_abc"
) -> dict[str, Any]:
    return {
        "object": "organization.costs.result",
        "amount": {"value": Decimal(value), "currency": "usd"},
        "line_item": line_item,
        "project_id": project_id,
    }


def openai_page(buckets: Sequence[Sequence[dict[str, Any]]], *, start: int = START) -> dict[str, Any]:
    """A page of daily buckets from `start`, the n-th bucket holding the n-th list of results."""
    return {
        "object": "page",
        "data": [
            {"object": "bucket", "start_time": start + n * DAY, "end_time": start + (n + 1) * DAY, "results": list(rs)}
            for n, rs in enumerate(buckets)
        ],
        "has_more": False,
        "next_page": None,
    }


# Anthropic ---------------------------------------------------------------------------------------------------


def _rfc3339(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def anthropic_usage_result(
    *,
    uncached: int = 1500,
    cache_read: int = 200,
    cache_5m: int = 500,
    cache_1h: int = 1000,
    output_tokens: int = 500,
    model: str | None = "claude-sonnet-4-20250514",
    api_key_id: str | None = "apikey_01Rj2N8SVvo6BePZj99NhmiT",
    workspace_id: str | None = "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ",
) -> dict[str, Any]:
    return {
        "uncached_input_tokens": uncached,
        "cache_creation": {"ephemeral_1h_input_tokens": cache_1h, "ephemeral_5m_input_tokens": cache_5m},
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
        "server_tool_use": {"web_search_requests": 0},
        "api_key_id": api_key_id,
        "workspace_id": workspace_id,
        "model": model,
        "service_tier": "standard",
        "context_window": "0-200k",
    }


def anthropic_cost_result(
    amount: str = "123.78912",
    *,
    model: str | None = "claude-sonnet-4-20250514",
    token_type: str | None = "uncached_input_tokens",  # noqa: S107 - a token count's kind, no secret
    workspace_id: str | None = "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ",
    currency: str = "USD",
) -> dict[str, Any]:
    """`amount` in cents, as a decimal string (Anthropic's lowest currency unit)."""
    return {
        "currency": currency,
        "amount": amount,
        "workspace_id": workspace_id,
        "description": "Claude Sonnet 4 Usage - Input Tokens",
        "cost_type": "tokens",
        "context_window": "0-200k",
        "model": model,
        "service_tier": "standard",
        "token_type": token_type,
    }


def anthropic_page(buckets: Sequence[Sequence[dict[str, Any]]], *, start: int = START) -> dict[str, Any]:
    return {
        "data": [
            {
                "starting_at": _rfc3339(start + n * DAY),
                "ending_at": _rfc3339(start + (n + 1) * DAY),
                "results": list(rs),
            }
            for n, rs in enumerate(buckets)
        ],
        "has_more": False,
        "next_page": None,
    }


# CSV ---------------------------------------------------------------------------------------------------------

CSV_HEADER = "date,channel,model,input_tokens,output_tokens,requests,cost_usd"


def csv_file(rows: Sequence[str], header: str = CSV_HEADER, *, bom: bool = False) -> bytes:
    text = "\n".join([header, *rows]) + "\n"
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode()
