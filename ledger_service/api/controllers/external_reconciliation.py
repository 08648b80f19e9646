"""External reconciliation runs (provider records against the ledger) and the margin report."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIType
from litestar.params import JSONBody, QueryParameter
from litestar.response import Response

from ledger_service.api import auth
from ledger_service.api.csv_writer import Cell, csv_text
from ledger_service.api.negotiation import wants_csv
from ledger_service.api.params import (
    PathId,
    QueryCursor,
    QueryLimit,
    choices_schema,
    parse_choice,
    parse_id,
    parse_limit,
)
from ledger_service.api.problems import PROBLEMS
from ledger_service.domain import errors
from ledger_service.domain.external_matching import CLASSES, ItemNotFound
from ledger_service.schemas import (
    ExplainCommand,
    ExplanationView,
    MarginView,
    ReconciliationCommand,
    RunItemView,
    RunPageView,
    RunView,
)
from ledger_service.services.external_reconciliation import ExternalReconciliationService
from ledger_service.services.margin import MarginService

EXPLAIN_ROLES = frozenset({auth.ADMIN, auth.AUDITOR})
"""The contract lets auditors explain items: the one POST an auditor may make."""

FIGURES = ("input_tokens", "output_tokens", "cached_tokens", "requests")
ITEM_COLUMNS = (
    "id",
    "class",
    "channel_id",
    "model",
    "bucket_start",
    "bucket_end",
    *(f"ledger_{name}" for name in FIGURES),
    "ledger_quota",
    "ledger_estimated_cost_usd",
    *(f"provider_{name}" for name in FIGURES),
    "provider_cost_usd",
    *(f"difference_{name}" for name in FIGURES),
    "difference_cost_usd",
    "reasons",
    "explanations",
)
MONTH_SCHEMA = {
    "one_of": None,
    "type": OpenAPIType.STRING,
    "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$",
    "description": "The calendar month (UTC), YYYY-MM (required).",
}
MARGIN_COLUMNS = (
    "channel_id",
    "model",
    "charged_quota",
    "charged_usd",
    "provider_cost_usd",
    "cost_estimated",
    "margin_usd",
)


def _usd(value: Any) -> Cell:
    return None if value is None else Decimal(value)


def _item_row(item: RunItemView) -> list[Cell]:
    ledger, provider, difference = item.ledger or {}, item.provider or {}, item.difference or {}
    return [
        item.id,
        item.klass,
        item.channel_id,
        item.model,
        _utc(item.bucket_start),
        _utc(item.bucket_end),
        *(ledger.get(name) for name in FIGURES),
        ledger.get("quota"),
        _usd(ledger.get("estimated_cost_usd")),
        *(provider.get(name) for name in FIGURES),
        _usd(provider.get("cost_usd")),
        *(difference.get(name) for name in FIGURES),
        _usd(difference.get("cost_usd")),
        "; ".join(difference.get("reasons", [])),
        " | ".join(f"{note.author} ({_utc(note.created_at)}): {note.note}" for note in item.explanations),
    ]


def _utc(instant: Any) -> str:
    return str(instant.isoformat().replace("+00:00", "Z"))


class ExternalReconciliationController(Controller):
    path = "/external/reconciliations"
    tags = ["external"]

    @post(
        "/",
        status_code=201,
        opt={"roles": auth.ADMIN_ONLY},
        responses={
            **PROBLEMS,
            200: ResponseSpec(
                data_container=RunView,
                description="The same input was run before: that run (continued first if it had stopped)",
                generate_examples=False,
            ),
        },
        summary="Reconcile provider records with the ledger (the same input again: the same run, 200)",
    )
    async def start(
        self,
        request: Request,  # type: ignore[type-arg]
        data: JSONBody[ReconciliationCommand],
        reconciliations: NamedDependency[ExternalReconciliationService],
    ) -> Response[RunView]:
        view, created = await reconciliations.start(data, request.state.principal)
        return Response(view, status_code=201 if created else 200)

    @get(
        "/",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"cursor", "limit"})},
        responses=PROBLEMS,
        summary="Reconciliation runs, newest first",
    )
    async def runs(
        self,
        reconciliations: NamedDependency[ExternalReconciliationService],
        cursor: QueryCursor = None,
        limit: QueryLimit = None,
    ) -> RunPageView:
        return await reconciliations.runs(cursor, parse_limit(limit))

    @get(
        "/{run_id:str}",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"class", "cursor", "limit"})},
        responses=PROBLEMS,
        summary="A run with a page of its items (JSON), or all its items (CSV)",
    )
    async def run(
        self,
        request: Request,  # type: ignore[type-arg]
        run_id: PathId,
        reconciliations: NamedDependency[ExternalReconciliationService],
        klass: Annotated[
            str | None, QueryParameter(name="class", schema_extra=choices_schema(CLASSES, "Only items of this class."))
        ] = None,
        cursor: QueryCursor = None,
        limit: QueryLimit = None,
    ) -> Response[RunView] | Response[str]:
        number = parse_id(run_id, "run_id")
        class_filter = None if klass is None else parse_choice(klass, "class", CLASSES)
        if wants_csv(request.headers.get("accept")):
            view = await reconciliations.run(number, class_filter, cursor, None)
            return Response(csv_text(ITEM_COLUMNS, (_item_row(item) for item in view.items)), media_type="text/csv")
        return Response(await reconciliations.run(number, class_filter, cursor, parse_limit(limit)))

    @post(
        "/{run_id:str}/items/{item_id:str}/explain",
        status_code=201,
        opt={"roles": EXPLAIN_ROLES},
        responses=PROBLEMS,
        summary="Add a note explaining an item (append-only; the item is not changed)",
    )
    async def explain(
        self,
        request: Request,  # type: ignore[type-arg]
        run_id: PathId,
        item_id: PathId,
        data: JSONBody[ExplainCommand],
        reconciliations: NamedDependency[ExternalReconciliationService],
    ) -> ExplanationView:
        number = parse_id(run_id, "run_id")
        item = parse_id(item_id, "item_id")
        if item > 2**31 - 1:
            raise ItemNotFound(f"run {number} has no item {item}")
        return await reconciliations.explain(number, item, data.note, request.state.principal)


class MarginController(Controller):
    path = "/reports/margin"
    tags = ["reports"]

    @get(
        "/",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"month"})},
        responses=PROBLEMS,
        summary="Per channel and model: what users were charged against what the provider cost (JSON or CSV)",
    )
    async def margin(
        self,
        request: Request,  # type: ignore[type-arg]
        margins: NamedDependency[MarginService],
        month: Annotated[str | None, QueryParameter(schema_extra=MONTH_SCHEMA)] = None,
    ) -> Response[MarginView] | Response[str]:
        if month is None:
            raise errors.ValidationFailed("month is required (YYYY-MM)")
        report = await margins.margin(month)
        if not wants_csv(request.headers.get("accept")):
            return Response(report)
        rows = (
            (
                row.channel_id,
                row.model,
                row.charged_quota,
                Decimal(row.charged_usd),
                _usd(row.provider_cost_usd),
                "true" if row.cost_estimated else "false",
                _usd(row.margin_usd),
            )
            for row in report.rows
        )
        return Response(csv_text(MARGIN_COLUMNS, rows), media_type="text/csv")
