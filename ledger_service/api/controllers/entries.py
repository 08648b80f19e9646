"""Journal entries, for auditors: the feed, single entries, and reversals."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter
from litestar.response import Response

from ledger_service.api import auth
from ledger_service.api.controllers.responses import respond
from ledger_service.api.params import (
    INSTANT_SCHEMA,
    PathId,
    QueryCursor,
    QueryId,
    QueryKey,
    QueryLimit,
    QueryPosition,
    choices_schema,
    parse_choice,
    parse_id,
    parse_key,
    parse_limit,
    parse_optional_id,
    parse_position,
    parse_time,
)
from ledger_service.api.problems import PROBLEMS, replayed
from ledger_service.db.audit import EntryFilter
from ledger_service.domain.entries import EntryKind
from ledger_service.schemas import EntryPageView, EntryView, ReverseCommand
from ledger_service.services.audit import AuditService
from ledger_service.services.ledger import LedgerService

KINDS = frozenset(kind.value for kind in EntryKind)
FEED_QUERY = frozenset(
    {"request_id", "user_id", "token_id", "channel_id", "kind", "from", "to", "cursor", "limit", "min_position"}
)


class EntryController(Controller):
    path = "/entries"
    tags = ["audit"]

    @get(
        "/",
        opt={"roles": auth.AUDIT_READ, "query": FEED_QUERY},
        responses=PROBLEMS,
        summary="The entry feed: final entries in the order they became final",
    )
    async def list_entries(
        self,
        audit: NamedDependency[AuditService],
        request_id: QueryKey = None,
        user_id: QueryId = None,
        token_id: QueryId = None,
        channel_id: QueryId = None,
        kind: Annotated[str | None, QueryParameter(schema_extra=choices_schema(KINDS, "An entry kind."))] = None,
        created_from: Annotated[str | None, QueryParameter(name="from", schema_extra=INSTANT_SCHEMA)] = None,
        created_to: Annotated[str | None, QueryParameter(name="to", schema_extra=INSTANT_SCHEMA)] = None,
        cursor: QueryCursor = None,
        limit: QueryLimit = None,
        min_position: QueryPosition = None,
    ) -> EntryPageView:
        where = EntryFilter(
            request_id=None if request_id is None else parse_key(request_id),
            user_id=parse_optional_id(user_id, "user_id"),
            token_id=parse_optional_id(token_id, "token_id"),
            channel_id=parse_optional_id(channel_id, "channel_id"),
            kind=None if kind is None else parse_choice(kind, "kind", KINDS),
            created_from=parse_time(created_from, "from"),
            created_to=parse_time(created_to, "to"),
        )
        return await audit.entries(
            where, cursor=cursor, limit=parse_limit(limit), min_position=parse_position(min_position)
        )

    @get(
        "/{entry_id:str}",
        opt={"roles": auth.AUDIT_READ},
        responses=PROBLEMS,
        summary="One journal entry with its postings",
    )
    async def entry(self, entry_id: PathId, ledger: NamedDependency[LedgerService]) -> EntryView:
        return await ledger.entry(parse_id(entry_id, "entry_id"))

    @post(
        "/{entry_id:str}/reverse",
        status_code=201,
        opt={"roles": auth.ADMIN_ONLY},
        responses=replayed(EntryView),
        summary="Post the exact opposite of an entry (once)",
    )
    async def reverse(
        self,
        entry_id: PathId,
        data: JSONBody[ReverseCommand],
        ledger: NamedDependency[LedgerService],
    ) -> Response[EntryView]:
        return respond(await ledger.reverse(parse_id(entry_id, "entry_id"), data))
