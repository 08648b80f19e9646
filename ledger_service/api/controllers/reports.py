"""Account balances and statements, and the finance reports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.response import Response

from ledger_service.api import auth
from ledger_service.api.csv_writer import csv_text
from ledger_service.api.negotiation import wants_csv
from ledger_service.api.params import (
    INSTANT_SCHEMA,
    PathAddress,
    QueryCursor,
    QueryLimit,
    QueryPosition,
    choices_schema,
    parse_choice,
    parse_limit,
    parse_position,
    parse_time,
)
from ledger_service.api.problems import PROBLEMS
from ledger_service.db.audit import USAGE_BUCKETS, USAGE_KEYS
from ledger_service.schemas import AccountView, ReconciliationView, StatementPageView, TrialBalanceView, UsageReportView
from ledger_service.services.audit import AuditService

CSV_COLUMNS = ("key", "bucket_start", "requests", "prompt_tokens", "completion_tokens", "quota")


class AccountsController(Controller):
    path = "/accounts"
    tags = ["audit"]

    @get(
        "/{address:str}",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"as_of", "min_position"})},
        responses=PROBLEMS,
        summary="An account's balances, now or at a past instant",
    )
    async def account(
        self,
        address: PathAddress,
        audit: NamedDependency[AuditService],
        as_of: Annotated[str | None, QueryParameter(schema_extra=INSTANT_SCHEMA)] = None,
        min_position: QueryPosition = None,
    ) -> AccountView:
        return await audit.account(address, as_of=parse_time(as_of, "as_of"), min_position=parse_position(min_position))

    @get(
        "/{address:str}/postings",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"cursor", "limit", "min_position"})},
        responses=PROBLEMS,
        summary="An account statement with running balances",
    )
    async def postings(
        self,
        address: PathAddress,
        audit: NamedDependency[AuditService],
        cursor: QueryCursor = None,
        limit: QueryLimit = None,
        min_position: QueryPosition = None,
    ) -> StatementPageView:
        return await audit.statement(
            address, cursor=cursor, limit=parse_limit(limit), min_position=parse_position(min_position)
        )


class ReportsController(Controller):
    path = "/reports"
    tags = ["reports"]

    @get(
        "/trial-balance",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"as_of", "min_position"})},
        responses=PROBLEMS,
        summary="Per ledger: the total (zero) and sums by kind",
    )
    async def trial_balance(
        self,
        audit: NamedDependency[AuditService],
        as_of: Annotated[str | None, QueryParameter(schema_extra=INSTANT_SCHEMA)] = None,
        min_position: QueryPosition = None,
    ) -> TrialBalanceView:
        return await audit.trial_balance(as_of=parse_time(as_of, "as_of"), min_position=parse_position(min_position))

    @get(
        "/reconciliation",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"min_position"})},
        responses=PROBLEMS,
        summary="Recompute the books and list what disagrees",
    )
    async def reconciliation(
        self, audit: NamedDependency[AuditService], min_position: QueryPosition = None
    ) -> ReconciliationView:
        return await audit.reconcile(min_position=parse_position(min_position))

    @get(
        "/usage",
        opt={"roles": auth.AUDIT_READ, "query": frozenset({"group_by", "bucket", "from", "to", "min_position"})},
        responses=PROBLEMS,
        summary="Charges grouped by channel, model, user or token, per hour, day or overall (JSON or CSV)",
    )
    async def usage(
        self,
        request: Request,  # type: ignore[type-arg]
        audit: NamedDependency[AuditService],
        group_by: Annotated[
            str | None, QueryParameter(schema_extra=choices_schema(USAGE_KEYS, "What to group by (default channel)."))
        ] = None,
        bucket: Annotated[
            str | None, QueryParameter(schema_extra=choices_schema(USAGE_BUCKETS, "The time bucket (default none)."))
        ] = None,
        created_from: Annotated[str | None, QueryParameter(name="from", schema_extra=INSTANT_SCHEMA)] = None,
        created_to: Annotated[str | None, QueryParameter(name="to", schema_extra=INSTANT_SCHEMA)] = None,
        min_position: QueryPosition = None,
    ) -> Response[UsageReportView] | Response[str]:
        report = await audit.usage(
            group_by=parse_choice(group_by, "group_by", USAGE_KEYS, default="channel"),
            bucket=parse_choice(bucket, "bucket", USAGE_BUCKETS, default="none"),
            created_from=parse_time(created_from, "from"),
            created_to=parse_time(created_to, "to"),
            min_position=parse_position(min_position),
        )
        if not wants_csv(request.headers.get("accept")):
            return Response(report)
        rows = (
            (row.key, _utc(row.bucket_start), row.requests, row.prompt_tokens, row.completion_tokens, row.quota)
            for row in report.rows
        )
        return Response(csv_text(CSV_COLUMNS, rows), media_type="text/csv")


def _utc(instant: datetime | None) -> str | None:
    """The same form as in JSON (`...Z`), so one report reads the same in both."""
    return None if instant is None else instant.isoformat().replace("+00:00", "Z")
