"""The shapes of what comes in (commands) and goes out (views), as msgspec structs.

Decoding a command enforces the contract's input rules (section 8): ids 1..2^63-1, counts and amounts
0..10^15, keys of 1-128 characters of `A-Z a-z 0-9 . _ : -`, no unknown fields. Checks that span fields live
in `__post_init__` and raise ValueError, which msgspec reports as a validation error like any other.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from ledger_service.domain.operations import (
    MAX_ID,
    Command,
    ConsumptionCommand,
    Count,
    ExpiresIn,
    HoldCommand,
    Id,
    Key,
    Name,
    Note,
    RefundCommand,
    SettleCommand,
)
from ledger_service.domain.pricing import MAX_AMOUNT, check_ratio

PositiveAmount = Annotated[int, Meta(ge=1, le=MAX_AMOUNT, description="An amount, 1..10^15.")]
SignedAmount = Annotated[int, Meta(ge=-MAX_AMOUNT, le=MAX_AMOUNT, description="A signed amount, not 0.")]
RATIO_PATTERN = r"\A-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z"
"""JSON's number syntax (RFC 8259 section 6), which a ratio sent as a string must follow too."""
Ratio = Annotated[
    Decimal,
    Meta(
        description="A decimal ratio, as a JSON number or a string in JSON number syntax; kept exactly.",
        extra_json_schema={"extra": {"pattern": RATIO_PATTERN}},
    ),
]
Role = Literal["admin", "relay", "auditor"]

# The lifecycle's commands and value types are the domain's (domain/operations.py); named here for the API.
__all__ = [
    "MAX_ID",
    "Command",
    "ConsumptionCommand",
    "Count",
    "ExpiresIn",
    "HoldCommand",
    "Id",
    "Key",
    "Name",
    "Note",
    "RefundCommand",
    "SettleCommand",
]


# Funding and tokens ------------------------------------------------------------------------------------------


class TopupCommand(Command):
    user_id: Id
    amount: PositiveAmount
    reference: Key
    note: Note | None = None


class AdjustmentCommand(Command):
    user_id: Id
    amount: SignedAmount
    reference: Key
    note: Note | None = None

    openapi_rules: ClassVar[dict[str, Any]] = {"not": {"properties": {"amount": {"const": 0}}}}

    def __post_init__(self) -> None:
        if self.amount == 0:
            raise ValueError("amount must not be 0")


class TokenCommand(Command):
    user_id: Id
    unlimited: bool
    remaining: Count | None = None
    """The allowance to set; required for a limited token, ignored for an unlimited one."""

    openapi_rules: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {"properties": {"unlimited": {"const": True}}},
            {"required": ["remaining"], "properties": {"remaining": {"type": "integer"}}},
        ]
    }

    def __post_init__(self) -> None:
        if not self.unlimited and self.remaining is None:
            raise ValueError("remaining is required for a limited token")


class ReverseCommand(Command):
    reference: Key
    note: Note | None = None


# Pricing -----------------------------------------------------------------------------------------------------


class ModelPriceCommand(Command):
    number_strings: ClassVar[tuple[str, ...]] = ("model_ratio", "completion_ratio", "model_price")
    model_ratio: Ratio | None = None
    completion_ratio: Ratio = Decimal(1)
    model_price: Ratio | None = None
    """USD per call; when set, the model is priced per call and token counts do not matter."""

    openapi_rules: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
            for name in ("model_ratio", "model_price")
        ]
    }

    def __post_init__(self) -> None:
        if self.model_ratio is None and self.model_price is None:
            raise ValueError("model_ratio or model_price is required")
        for name in ("model_ratio", "completion_ratio", "model_price"):
            value = getattr(self, name)
            if value is not None:
                check_ratio(value, name)


class GroupRatioCommand(Command):
    number_strings: ClassVar[tuple[str, ...]] = ("group_ratio",)
    group_ratio: Ratio

    def __post_init__(self) -> None:
        check_ratio(self.group_ratio, "group_ratio")


# External reconciliation: the channel map and provider prices ------------------------------------------------


class ChannelMapCommand(Command):
    channel_id: Id
    """The ledger channel the provider's api key or project is."""


class ProviderPriceCommand(Command):
    number_strings: ClassVar[tuple[str, ...]] = (
        "input_usd_per_mtok",
        "output_usd_per_mtok",
        "cached_input_usd_per_mtok",
        "request_usd",
    )
    input_usd_per_mtok: Ratio
    """USD per million input tokens (uncached)."""
    output_usd_per_mtok: Ratio
    cached_input_usd_per_mtok: Ratio | None = None
    """USD per million cached input tokens; null: cached tokens cost what input tokens cost."""
    request_usd: Ratio = Decimal(0)
    """USD per request, on top of the tokens."""

    def __post_init__(self) -> None:
        for name in self.number_strings:
            value = getattr(self, name)
            if value is not None:
                check_ratio(value, name)


class BatchOperation(Command):
    openapi_rules: ClassVar[dict[str, Any]] = {
        "allOf": [
            {
                "if": {"properties": {"op": {"const": op}}},
                "then": {
                    "properties": {"body": {"$ref": f"#/components/schemas/{command}"}},
                    "required": ["body"] if needs_body else [],
                },
            }
            for op, command, needs_body in (
                ("hold", "HoldCommand", True),
                ("settle", "SettleCommand", True),
                ("refund", "RefundCommand", False),  # an empty body is a plain refund
                ("consume", "ConsumptionCommand", True),
            )
        ]
    }
    """Each operation's body is its single call's. Not stated: a hold's or consumption's `body.request_id`, which
    the document requires, must equal the operation's (JSON Schema cannot compare two values)."""

    op: Literal["hold", "settle", "refund", "consume"]
    request_id: Key
    body: dict[str, Any] = msgspec.field(default_factory=dict)
    """What the single call takes as its body; for hold and consume, request_id may be left out of it."""


class BatchCommand(Command):
    operations: Annotated[list[BatchOperation], Meta(min_length=1, max_length=1000)]
    atomic: bool = False
    """All or nothing: the first refusal rolls every operation back."""


class ApiKeyCommand(Command):
    name: Name
    role: Role


# Views -------------------------------------------------------------------------------------------------------


class View(msgspec.Struct, kw_only=True):
    """Base of every response body."""


class PostingView(View):
    ledger: str
    account: str
    amount: int


class EntryView(View):
    id: int
    kind: str
    request_id: str | None
    user_id: int | None
    token_id: int | None
    channel_id: int | None
    created_at: datetime
    postings: list[PostingView]
    details: dict[str, Any]
    reverses: int | None
    reference: str | None
    """The idempotency key of a top-up, adjustment or reversal (part of the hashed content)."""
    hash: str
    """Hex SHA-256 of the entry's content (see docs/accounting.md)."""


class HoldView(View):
    request_id: str
    user_id: int
    token_id: int
    group: str
    model: str
    status: Literal["open", "settled", "refunded", "expired"]
    amount: int
    trusted: bool
    charged: int | None
    channel_id: int | None
    late: bool
    created_at: datetime
    expires_at: datetime | None


class HoldDetailView(HoldView):
    entries: list[EntryView]


class UserView(View):
    user_id: int
    available: int
    held: int
    used: int
    request_count: int


class TokenView(View):
    token_id: int
    user_id: int
    unlimited: bool
    remaining: int | None
    held: int
    used: int


class ChannelView(View):
    channel_id: int
    used: int
    request_count: int


class FundingView(View):
    entry: EntryView
    user: UserView


class ModelPriceView(View):
    model_ratio: Decimal
    completion_ratio: Decimal
    model_price: Decimal | None


class GroupRatioView(View):
    group_ratio: Decimal


class PricingDefaultsView(View):
    model_ratio: Decimal
    completion_ratio: Decimal
    group_ratio: Decimal


class PricingView(View):
    models: dict[str, ModelPriceView]
    groups: dict[str, GroupRatioView]
    defaults: PricingDefaultsView


class UploadCreatedView(View):
    upload_id: int
    records: int
    source: str
    sha256: str
    """Hex SHA-256 of the file's bytes: the same bytes are one upload."""


class UploadView(View):
    id: int
    source: str
    sha256: str
    filename: str | None
    channel_id: int | None
    """The channel of records that name none and whose api key or project the channel map does not know."""
    records: int
    uploaded_by: int | None
    """The id of the admin key that uploaded the file."""
    uploaded_at: datetime


class UploadListView(View):
    items: list[UploadView]
    next_cursor: str | None


class ExternalRecordView(View):
    line: int
    bucket_start: datetime
    bucket_end: datetime
    api_key_id: str | None
    project_id: str | None
    channel_id: int | None
    """The ledger channel the record belongs to now: its own (a CSV's `channel`), else the channel map's entry for
    its api key, then for its project, else the upload's channel_id."""
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cached_tokens: int | None
    cache_creation_tokens: int | None
    requests: int | None
    cost_usd: str | None
    """USD as a decimal string, every digit the file had (no exponent)."""
    currency: str | None
    line_item: str | None
    raw: msgspec.Raw
    """The record as the file had it, a JSON object (numbers as JSON numbers, digit for digit)."""


class UploadDetailView(UploadView):
    items: list[ExternalRecordView]
    """The upload's records in file order, a page at a time."""
    next_cursor: str | None


class ChannelMapEntryView(View):
    source: str
    external_key: str
    channel_id: int
    updated_at: datetime


class ChannelMapView(View):
    items: list[ChannelMapEntryView]
    next_cursor: str | None = None
    """Every entry fits on one page: always null."""


class ProviderPriceView(View):
    """USD as decimal strings, exactly as set (no exponent)."""

    model: str
    input_usd_per_mtok: str
    output_usd_per_mtok: str
    cached_input_usd_per_mtok: str | None
    request_usd: str
    updated_at: datetime


class ProviderPriceListView(View):
    items: list[ProviderPriceView]
    next_cursor: str | None = None
    """Every price fits on one page: always null."""


class ApiKeyView(View):
    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyListView(View):
    items: list[ApiKeyView]
    next_cursor: str | None = None
    """Lists share one shape (contract section 6); every key fits on one page, so this is always null."""


class ApiKeyCreatedView(View):
    id: int
    name: str
    role: str
    key: str
    """The secret, shown this once; only its hash is stored."""


class EntryPageView(View):
    items: list[EntryView]
    next_cursor: str | None
    """The position after the last item; pass it back to continue, now or later (null: nothing listed yet)."""


class AccountView(View):
    address: str
    balances: dict[str, int]
    as_of: datetime


class StatementLineView(View):
    entry_id: int
    kind: str
    created_at: datetime
    ledger: str
    amount: int
    balance_after: int


class StatementPageView(View):
    items: list[StatementLineView]
    next_cursor: str | None


class TrialBalanceLedgerView(View):
    total: int
    by_kind: dict[str, int]


class TrialBalanceView(View):
    as_of: datetime
    ledgers: dict[str, TrialBalanceLedgerView]


class ReconciliationCheckView(View):
    name: str
    ok: bool
    detail: str
    offenders: list[str]


class ReconciliationView(View):
    ok: bool
    checked_at: datetime
    checks: list[ReconciliationCheckView]


class UsageRowView(View):
    key: str
    bucket_start: datetime | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    quota: int


class UsageReportView(View):
    rows: list[UsageRowView]


class BatchResultView(View):
    status: int
    body: dict[str, Any]


class BatchView(View):
    results: list[BatchResultView]


class HealthView(View):
    status: str
    database: str


class ProblemView(View):
    """RFC 9457 problem details, with the contract's machine-readable `code`."""

    type: str
    title: str
    status: int
    detail: str
    code: str


# External reconciliation -------------------------------------------------------------------------------------


class ToleranceBody(Command):
    """How far ledger and provider may differ and still match (docs/external.md); absent fields are 0 (exact)."""

    tokens_pct: Decimal | None = None
    """Percent of the provider's token count."""
    requests: Count | None = None
    """Requests, absolute."""
    cost_pct: Decimal | None = None
    """Percent of the provider's cost."""
    cost_usd: Decimal | None = None
    """USD, absolute (a cost matches when within either cost tolerance)."""

    def __post_init__(self) -> None:
        for name in ("tokens_pct", "cost_pct", "cost_usd"):
            value = getattr(self, name)
            if value is not None and (not value.is_finite() or value < 0 or value > 10**9):
                raise ValueError(f"{name} must be a number between 0 and 10^9")
            if value is not None and value != 0 and int(value.as_tuple().exponent) < -18:
                raise ValueError(f"{name} has more than 18 decimal places")


class ReconciliationCommand(Command):
    upload_id: Id | None = None
    since: datetime | None = None
    until: datetime | None = None
    strategy: Literal["many_to_one", "one_to_one"] = "many_to_one"
    tolerance: ToleranceBody = msgspec.field(default_factory=ToleranceBody)

    def __post_init__(self) -> None:
        window = self.since is not None or self.until is not None
        if self.upload_id is not None and window:
            raise ValueError("give upload_id, or since and until, not both")
        if self.upload_id is None and (self.since is None or self.until is None):
            raise ValueError("give upload_id, or both since and until")
        for instant in (self.since, self.until):
            if instant is not None and instant.utcoffset() is None:
                raise ValueError("since and until need a time zone offset (RFC 3339)")
            if instant is not None and not 1 < instant.year < 9999:
                raise ValueError("since and until must lie within the years 2-9998")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be before until")


class ExplainCommand(Command):
    note: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2000,
            pattern=r"\A[^\x00]*\Z",
            description="Why the item differs (1-2000 characters, no NUL).",
        ),
    ]

    def __post_init__(self) -> None:
        if not self.note.strip():
            raise ValueError("note must not be blank")


class ExplanationView(View):
    note: str
    author: str
    """The API key's name."""
    author_key_id: int | None
    created_at: datetime


class RunItemView(View):
    id: int
    klass: str = msgspec.field(name="class")
    channel_id: int | None
    model: str | None
    bucket_start: datetime
    bucket_end: datetime
    ledger: dict[str, Any] | None
    provider: dict[str, Any] | None
    difference: dict[str, Any] | None
    explanations: list[ExplanationView]


class RunSummaryView(View):
    id: int
    status: str
    params: dict[str, Any]
    matched: int
    differs: int
    only_provider: int
    only_ledger: int
    error: str | None
    created_at: datetime
    completed_at: datetime | None


class RunView(RunSummaryView):
    items: list[RunItemView]
    next_cursor: str | None
    """Where the next page of items starts (`?cursor=`), null after the last."""
    drift: list[dict[str, Any]]


class RunPageView(View):
    items: list[RunSummaryView]
    next_cursor: str | None


class MarginRowView(View):
    channel_id: int | None
    model: str | None
    charged_quota: int
    charged_usd: str
    provider_cost_usd: str | None
    cost_estimated: bool
    margin_usd: str | None


class MarginTotalsView(View):
    charged_quota: int
    charged_usd: str
    provider_cost_usd: str
    """The sum of the rows' known costs."""
    margin_usd: str
    """charged_usd minus provider_cost_usd, over the rows whose cost is known."""
    rows_without_cost: int


class MarginView(View):
    month: str
    quota_per_usd: int
    rows: list[MarginRowView]
    totals: MarginTotalsView
