"""Provider files into records (domain/external.py): one row per rule, each file built from the documented fields."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger_service.domain.external import ExternalRecord, MalformedFile, Source, model_of_line_item, parse
from tests.external_fixtures import (
    CSV_HEADER,
    START,
    anthropic_cost_result,
    anthropic_page,
    anthropic_usage_result,
    csv_file,
    encode,
    json_lines,
    openai_cost_result,
    openai_page,
    openai_usage_result,
)

NOV1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV2 = datetime(2026, 11, 2, tzinfo=UTC)
NOV3 = datetime(2026, 11, 3, tzinfo=UTC)


@dataclass(frozen=True)
class Case:
    name: str
    source: Source
    content: bytes
    check: Callable[[list[ExternalRecord]], Any]


def fields(record: ExternalRecord, *names: str) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in names)


USAGE = ("api_key_id", "project_id", "model", "input_tokens", "output_tokens", "cached_tokens", "requests")

CASES = [
    Case(
        "openai usage: one page, input includes cached, bucket times from Unix seconds",
        Source.OPENAI_USAGE,
        encode(openai_page([[openai_usage_result(input_tokens=5000, output_tokens=1000, cached=4000, requests=5)]])),
        lambda rs: (
            [fields(r, *USAGE) for r in rs] == [("key_abc", "proj_abc", "gpt-4o-2024-08-06", 5000, 1000, 4000, 5)]
            and (rs[0].bucket_start, rs[0].bucket_end, rs[0].line) == (NOV1, NOV2, 1)
        ),
    ),
    Case(
        "openai usage: several api keys of one project stay separate records, numbered across buckets",
        Source.OPENAI_USAGE,
        encode(
            openai_page(
                [
                    [openai_usage_result(api_key_id="key_a"), openai_usage_result(api_key_id="key_b")],
                    [openai_usage_result(api_key_id="key_a", input_tokens=7)],
                ]
            )
        ),
        lambda rs: (
            [(r.line, r.api_key_id, r.project_id, r.input_tokens, r.bucket_start) for r in rs]
            == [
                (1, "key_a", "proj_abc", 1000, NOV1),
                (2, "key_b", "proj_abc", 1000, NOV1),
                (3, "key_a", "proj_abc", 7, NOV2),
            ]
        ),
    ),
    Case(
        "openai usage: a JSON array of pages",
        Source.OPENAI_USAGE,
        encode([openai_page([[openai_usage_result()]]), openai_page([[openai_usage_result()]], start=START + 86400)]),
        lambda rs: [(r.line, r.bucket_start) for r in rs] == [(1, NOV1), (2, NOV2)],
    ),
    Case(
        "openai usage: JSON Lines of pages",
        Source.OPENAI_USAGE,
        json_lines([openai_page([[openai_usage_result()]]), openai_page([[openai_usage_result(requests=9)]])]),
        lambda rs: [(r.line, r.requests) for r in rs] == [(1, 3), (2, 9)],
    ),
    Case(
        "openai usage: ungrouped results have no key, project or model",
        Source.OPENAI_USAGE,
        encode(openai_page([[openai_usage_result(api_key_id=None, project_id=None, model=None)]])),
        lambda rs: fields(rs[0], "api_key_id", "project_id", "model") == (None, None, None),
    ),
    Case(
        "openai usage: raw keeps the result as it came",
        Source.OPENAI_USAGE,
        encode(openai_page([[openai_usage_result(service_tier="default")]])),
        lambda rs: json.loads(rs[0].raw) == openai_usage_result(service_tier="default"),
    ),
    Case(
        "openai costs: the value is USD, kept digit for digit; the model comes from the line item",
        Source.OPENAI_COSTS,
        encode(
            openai_page([[openai_cost_result("0.1234567890123456789", line_item="gpt-4o-2024-08-06, cached input")]])
        ),
        lambda rs: (
            fields(rs[0], "cost_usd", "currency", "model", "line_item", "project_id")
            == (
                Decimal("0.1234567890123456789"),
                "USD",
                "gpt-4o-2024-08-06",
                "gpt-4o-2024-08-06, cached input",
                "proj_abc",
            )
            and str(rs[0].cost_usd) == "0.1234567890123456789"
            and b"0.1234567890123456789" in rs[0].raw
        ),
    ),
    Case(
        "openai costs: a line item naming no model, and an ungrouped result",
        Source.OPENAI_COSTS,
        encode(
            openai_page(
                [
                    [
                        openai_cost_result("2", line_item="web search tool calls"),
                        openai_cost_result("0.06", line_item=None, project_id=None),
                    ]
                ]
            )
        ),
        lambda rs: (
            [fields(r, "model", "cost_usd", "project_id") for r in rs]
            == [(None, Decimal(2), "proj_abc"), (None, Decimal("0.06"), None)]
        ),
    ),
    Case(
        "anthropic usage: input = uncached + cache read + cache creation; each component kept",
        Source.ANTHROPIC_USAGE,
        encode(anthropic_page([[anthropic_usage_result(uncached=1500, cache_read=200, cache_5m=500, cache_1h=1000)]])),
        lambda rs: (
            fields(rs[0], "input_tokens", "cached_tokens", "cache_creation_tokens", "output_tokens", "requests")
            == (3200, 200, 1500, 500, None)
            and fields(rs[0], "api_key_id", "project_id", "model")
            == ("apikey_01Rj2N8SVvo6BePZj99NhmiT", "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ", "claude-sonnet-4-20250514")
            and (rs[0].bucket_start, rs[0].bucket_end) == (NOV1, NOV2)
            and json.loads(rs[0].raw)["cache_creation"]
            == {"ephemeral_1h_input_tokens": 1000, "ephemeral_5m_input_tokens": 500}
        ),
    ),
    Case(
        "anthropic usage: several api keys of one workspace",
        Source.ANTHROPIC_USAGE,
        encode(
            anthropic_page(
                [[anthropic_usage_result(api_key_id="apikey_a"), anthropic_usage_result(api_key_id="apikey_b")]]
            )
        ),
        lambda rs: (
            [(r.api_key_id, r.project_id) for r in rs]
            == [("apikey_a", "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ"), ("apikey_b", "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ")]
        ),
    ),
    Case(
        "anthropic costs: the amount is in cents: 123.78912 cents = 1.2378912 USD, exactly",
        Source.ANTHROPIC_COSTS,
        encode(anthropic_page([[anthropic_cost_result("123.78912")], [anthropic_cost_result("0.5", model=None)]])),
        lambda rs: (
            [fields(r, "cost_usd", "currency", "model", "line") for r in rs]
            == [(Decimal("1.2378912"), "USD", "claude-sonnet-4-20250514", 1), (Decimal("0.005"), "USD", None, 2)]
            and rs[0].line_item == "Claude Sonnet 4 Usage - Input Tokens"
            and (rs[1].bucket_start, rs[1].bucket_end) == (NOV2, NOV3)
        ),
    ),
    Case(
        "csv: a channel column, a UTC day bucket, a decimal cost kept exactly, a BOM",
        Source.CSV,
        csv_file(["2026-11-01,7,gpt-4o,1000,200,3,0.00012345678901234567890"], bom=True),
        lambda rs: (
            [
                fields(r, "line", "channel_id", "model", "input_tokens", "output_tokens", "requests", "cost_usd")
                for r in rs
            ]
            == [(2, 7, "gpt-4o", 1000, 200, 3, Decimal("0.00012345678901234567890"))]
            and (rs[0].bucket_start, rs[0].bucket_end) == (NOV1, NOV2)
        ),
    ),
    Case(
        "csv: api_key_id instead of channel, with cached_tokens and project_id; blank lines skipped",
        Source.CSV,
        csv_file(
            ["2026-11-02,key_a,gpt-4o,1000,200,3,1.5,400,proj_x", "", "2026-11-02,key_b,gpt-4o,10,2,1,,,"],
            header="date,api_key_id,model,input_tokens,output_tokens,requests,cost_usd,cached_tokens,project_id",
        ),
        lambda rs: (
            [fields(r, "line", "api_key_id", "channel_id", "cached_tokens", "project_id", "cost_usd") for r in rs]
            == [(2, "key_a", None, 400, "proj_x", Decimal("1.5")), (4, "key_b", None, None, None, None)]
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_each_shape_is_read(case: Case) -> None:
    assert case.check(parse(case.source, case.content)), parse(case.source, case.content)


def bad_usage(**fields: Any) -> bytes:
    return encode(openai_page([[openai_usage_result()], [openai_usage_result(), openai_usage_result(**fields)]]))


MALFORMED = [
    (
        "csv: a negative count names its line",
        Source.CSV,
        csv_file(["2026-11-01,1,m,1,1,1,0", "2026-11-01,1,m,-3,1,1,0"]),
        'line 3: input_tokens: expected a non-negative integer (at most 10^15), got "-3"',
    ),
    (
        "csv: a count above 10^15",
        Source.CSV,
        csv_file(["2026-11-01,1,m,1000000000000001,1,1,0"]),
        'line 2: input_tokens: expected a non-negative integer (at most 10^15), got "1000000000000001"',
    ),
    (
        "csv: a bad date",
        Source.CSV,
        csv_file(["2026-02-30,1,m,1,1,1,0"]),
        'line 2: date: expected a date YYYY-MM-DD, got "2026-02-30"',
    ),
    (
        "csv: a cost that is no decimal",
        Source.CSV,
        csv_file(["2026-11-01,1,m,1,1,1,1e3"]),
        'line 2: cost_usd: expected a decimal number such as "12.5", got "1e3"',
    ),
    (
        "csv: an unknown column",
        Source.CSV,
        csv_file([], header=CSV_HEADER + ",colour"),
        'line 1: unknown column "colour"',
    ),
    (
        "csv: no channel and no api key column",
        Source.CSV,
        csv_file([], header="date,model,input_tokens,output_tokens,requests,cost_usd"),
        'line 1: a "channel" or an "api_key_id" column is required',
    ),
    ("csv: a short row", Source.CSV, csv_file(["2026-11-01,1,m,1,1"]), "line 2: expected 7 fields, got 5"),
    (
        "csv: a channel that is no id",
        Source.CSV,
        csv_file(["2026-11-01,0,m,1,1,1,0"]),
        "line 2: channel: expected a ledger channel id",
    ),
    ("csv: not UTF-8", Source.CSV, b"date,channel\n\xff", "the file is not UTF-8 text (byte 14)"),
    (
        "openai usage: a negative count names its field",
        Source.OPENAI_USAGE,
        bad_usage(input_tokens=-3),
        "data[1].results[1].input_tokens: expected a non-negative integer (at most 10^15), got -3",
    ),
    (
        "openai usage: a fractional count",
        Source.OPENAI_USAGE,
        bad_usage(output_tokens=Decimal("2.5")),
        "data[1].results[1].output_tokens: expected a non-negative integer (at most 10^15), got 2.5",
    ),
    (
        "openai usage: a count as a string",
        Source.OPENAI_USAGE,
        bad_usage(num_model_requests="5"),
        'data[1].results[1].num_model_requests: expected a non-negative integer (at most 10^15), got "5"',
    ),
    (
        "openai usage: a costs file uploaded as usage",
        Source.OPENAI_USAGE,
        encode(openai_page([[openai_cost_result()]])),
        'data[0].results[0].object: expected "organization.usage.completions.result",'
        ' got "organization.costs.result" (an openai_costs file?)',
    ),
    (
        "openai usage: JSON Lines name the line",
        Source.OPENAI_USAGE,
        json_lines(
            [openai_page([[openai_usage_result()]]), openai_page([[{**openai_usage_result(), "input_tokens": None}]])]
        ),
        "line 2: data[0].results[0].input_tokens: expected a non-negative integer",
    ),
    (
        "openai usage: an array of pages names the page",
        Source.OPENAI_USAGE,
        encode(
            [
                openai_page([[openai_usage_result()]]),
                {"object": "page", "data": [{"object": "bucket", "start_time": "x", "end_time": 1, "results": []}]},
            ]
        ),
        '[1].data[0].start_time: expected Unix seconds (an integer), got "x"',
    ),
    (
        "openai usage: a bucket ending before it starts",
        Source.OPENAI_USAGE,
        encode(
            {"object": "page", "data": [{"object": "bucket", "start_time": START, "end_time": START, "results": []}]}
        ),
        "data[0]: the bucket ends before it starts",
    ),
    (
        "openai usage: broken JSON names line and column",
        Source.OPENAI_USAGE,
        b'{\n  "object": "page",\n  "data": [\n}',
        "line 4 column 1",
    ),
    ("openai usage: no data", Source.OPENAI_USAGE, b'{"object": "page"}', "data: missing"),
    (
        "openai usage: a key twice",
        Source.OPENAI_USAGE,
        b'{"object": "page", "data": [], "data": []}',
        'the key "data" appears twice',
    ),
    (
        "openai costs: a non-USD amount",
        Source.OPENAI_COSTS,
        encode(openai_page([[{"object": "organization.costs.result", "amount": {"value": 1, "currency": "eur"}}]])),
        'data[0].results[0].amount.currency: only USD amounts are accepted, got "eur"',
    ),
    (
        "openai costs: an amount that is no number",
        Source.OPENAI_COSTS,
        encode(
            openai_page([[{"object": "organization.costs.result", "amount": {"value": "0.06", "currency": "usd"}}]])
        ),
        'data[0].results[0].amount.value: expected a number, got "0.06"',
    ),
    (
        "openai costs: NaN",
        Source.OPENAI_COSTS,
        b'{"object":"page","data":[{"object":"bucket","start_time":1,"end_time":2,"results":[{"amount":{"value":NaN,"currency":"usd"}}]}]}',
        "NaN is not a JSON number",
    ),
    (
        "anthropic usage: a bad time",
        Source.ANTHROPIC_USAGE,
        encode({"data": [{"starting_at": "2025-08-01", "ending_at": "2025-08-02T00:00:00Z", "results": []}]}),
        'data[0].starting_at: expected an RFC 3339 time such as "2025-08-01T00:00:00Z", got "2025-08-01"',
    ),
    (
        "anthropic usage: a cost file uploaded as usage",
        Source.ANTHROPIC_USAGE,
        encode(anthropic_page([[anthropic_cost_result()]])),
        "data[0].results[0].amount: a cost, not usage (an anthropic_costs file?)",
    ),
    (
        "anthropic usage: a bad cache creation count",
        Source.ANTHROPIC_USAGE,
        encode(anthropic_page([[anthropic_usage_result(cache_1h=-1)]])),
        "data[0].results[0].cache_creation.ephemeral_1h_input_tokens: expected a non-negative integer",
    ),
    (
        "anthropic costs: the amount as a number, not a string",
        Source.ANTHROPIC_COSTS,
        encode(anthropic_page([[{**anthropic_cost_result(), "amount": Decimal("1.5")}]])),
        'data[0].results[0].amount: expected a decimal number such as "12.5", got 1.5',
    ),
    (
        "anthropic costs: a non-USD currency",
        Source.ANTHROPIC_COSTS,
        encode(anthropic_page([[anthropic_cost_result(currency="EUR")]])),
        'data[0].results[0].currency: only USD amounts are accepted, got "EUR"',
    ),
    (
        "anthropic costs: a usage file uploaded as costs",
        Source.ANTHROPIC_COSTS,
        encode(anthropic_page([[anthropic_usage_result()]])),
        "data[0].results[0].amount: missing (an anthropic_usage file?)",
    ),
    ("empty file", Source.ANTHROPIC_COSTS, b"  \n", "the file is empty"),
]


@pytest.mark.parametrize(("name", "source", "content", "message"), MALFORMED, ids=[row[0] for row in MALFORMED])
def test_a_malformed_file_names_its_first_bad_line_or_field(
    name: str, source: Source, content: bytes, message: str
) -> None:
    with pytest.raises(MalformedFile) as caught:
        parse(source, content)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("line_item", "model"),
    [
        ("gpt-4o-2024-08-06, input", "gpt-4o-2024-08-06"),
        ("gpt-4o-mini-2024-07-18, cached input", "gpt-4o-mini-2024-07-18"),
        ("gpt-4.1-2025-04-14, output", "gpt-4.1-2025-04-14"),
        ("gpt-audio-mini-2025-12-15 audio, input", "gpt-audio-mini-2025-12-15"),
        ("priority | gpt-5, output, long context", "gpt-5"),
        ("web search tool calls", None),
        ("Vector storage", None),
        (None, None),
    ],
)
def test_the_model_of_an_openai_line_item(line_item: str | None, model: str | None) -> None:
    assert model_of_line_item(line_item) == model


def test_money_never_passes_through_a_float() -> None:
    # 0.1 + 0.2 as floats is 0.30000000000000004; as the file's decimals it is 0.3.
    page = openai_page([[openai_cost_result("0.1"), openai_cost_result("0.2")]])
    records = parse(Source.OPENAI_COSTS, encode(page))
    assert sum((record.cost_usd or Decimal(0) for record in records), Decimal(0)) == Decimal("0.3")
    assert all(isinstance(record.cost_usd, Decimal) for record in records)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.decimals(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "data",
                    "results",
                    "object",
                    "start_time",
                    "end_time",
                    "starting_at",
                    "ending_at",
                    "amount",
                    "value",
                    "currency",
                    "input_tokens",
                    "uncached_input_tokens",
                    "cache_creation",
                    "model",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(source=st.sampled_from(list(Source)), content=st.binary(max_size=300) | JSON_VALUES.map(encode))
def test_any_file_is_read_or_refused_with_one_line(source: Source, content: bytes) -> None:
    """Whatever the bytes, parsing gives records or a one-line MalformedFile; never another exception."""
    message: str | None = None
    try:
        records = parse(source, content)
    except MalformedFile as error:
        message, records = str(error), []
    assert message is None or (message and "\n" not in message), message
    assert all(record.bucket_end > record.bucket_start for record in records)
