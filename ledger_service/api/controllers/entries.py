"""Journal entries, for auditors."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from ledger_service.api import auth
from ledger_service.api.params import parse_id
from ledger_service.schemas import EntryView
from ledger_service.services.ledger import LedgerService


class EntryController(Controller):
    path = "/entries"
    tags = ["audit"]

    @get("/{entry_id:str}", opt={"roles": auth.AUDIT_READ}, summary="One journal entry with its postings")
    async def entry(self, entry_id: FromPath[str], ledger: NamedDependency[LedgerService]) -> EntryView:
        return await ledger.entry(parse_id(entry_id, "entry_id"))
