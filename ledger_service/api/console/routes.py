"""The auditors' web console at /console: server-rendered pages (Jinja2), no script.

Every page but the sign-in form needs a session (api/console/security.py); the router's before-request hook finds
it, and checks the CSRF token of every POST, before any handler runs.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.params import PathParameter, QueryParameter
from litestar.response import Redirect, Stream, Template
from litestar.static_files import create_static_files_router

from ledger_service.api.console import security
from ledger_service.api.console.chart import usage_chart
from ledger_service.api.console.review import side_by_side
from ledger_service.api.csv_writer import csv_text
from ledger_service.db.transactions import DatabaseUnavailable, is_connection_error
from ledger_service.domain import errors
from ledger_service.domain.errors import LedgerError
from ledger_service.services.api_keys import Principal
from ledger_service.services.console import ConsoleService, ConsoleSession, SignInRefused, TooManySignIns
from ledger_service.services.external_reconciliation import ExternalReconciliationService
from ledger_service.services.margin import MarginService

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
SIGN_IN_PATH = "/console/sign-in"
PAGE_SIZE = 100
MAX_REQUEST_ID = 128
MAX_ADDRESS = 200

_SESSION = "console_session"
PUBLIC = {"public": True}


class SignInRequired(Exception):
    """No session, or one that expired, ended or lost its key."""


class CsrfRefused(Exception):
    """A POST without the right CSRF token, or a sign-in from another site."""


def _console(request: Request[Any, Any, Any]) -> ConsoleService:
    service: ConsoleService = request.app.state.console
    return service


def _session(request: Request[Any, Any, Any]) -> ConsoleSession:
    session: ConsoleSession = request.state[_SESSION]
    return session


async def admit_console(request: Request[Any, Any, Any]) -> None:
    """The console's before-request hook: a live session (else to the sign-in page), then the CSRF token of a POST."""
    if request.route_handler.opt.get("public"):
        return
    secret = request.cookies.get(security.SESSION_COOKIE, "")
    session = await _console(request).session(secret)
    if session is None:
        raise SignInRequired
    request.state[_SESSION] = session
    request.scope.setdefault("state", {})["principal"] = Principal(session.api_key_id, session.name, session.role)
    if request.method == "POST":
        form = await request.form()
        if not security.same_token(form.get(security.CSRF_FIELD), session.csrf_token):
            raise CsrfRefused


def page(request: Request[Any, Any, Any], template: str, *, status: int = 200, **context: Any) -> Template:
    session = request.state.get(_SESSION)
    return Template(
        template_name=template,
        context={
            "session": session,
            "csrf_token": session.csrf_token if session is not None else None,
            "path": request.url.path,
            **context,
        },
        status_code=status,
    )


def console_error(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Errors on console routes are pages, never JSON problems or bare 500s."""
    if isinstance(error, SignInRequired):
        return Redirect(
            SIGN_IN_PATH, status_code=303, cookies=[security.expired_cookie(request, security.SESSION_COOKIE)]
        )
    if isinstance(error, CsrfRefused):
        return page(
            request,
            "error.html",
            status=403,
            title="Form refused",
            detail="The form was not sent from this console, or its page is too old. Reload the page and try again.",
        )
    if isinstance(error, LedgerError):
        return page(request, "error.html", status=error.status, title=error.title, detail=error.detail)
    if isinstance(error, HTTPException):
        return page(request, "error.html", status=error.status_code, title="Request refused", detail=str(error.detail))
    if isinstance(error, DatabaseUnavailable) or is_connection_error(error):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, error)
        response = page(
            request,
            "error.html",
            status=503,
            title="The database is unavailable",
            detail="The ledger database cannot be reached just now. Try again in a moment.",
        )
        response.headers["Retry-After"] = "2"
        return response
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return page(request, "error.html", status=500, title="Internal error", detail="An unexpected error occurred.")


# Sign-in -------------------------------------------------------------------------------------------------------


def _sign_in_page(request: Request[Any, Any, Any], *, status: int = 200, message: str | None = None) -> Template:
    token = secrets.token_urlsafe(32)
    response = page(request, "sign_in.html", status=status, sign_in_token=token, message=message)
    response.cookies.append(security.sign_in_cookie(request, token))
    return response


@get("/sign-in", opt=PUBLIC, name="console-sign-in-form")
async def sign_in_form(request: Request[Any, Any, Any]) -> Response[Any]:
    secret = request.cookies.get(security.SESSION_COOKIE)
    if secret and await _console(request).session(secret) is not None:
        return Redirect("/console", status_code=303)
    return _sign_in_page(request)


@post("/sign-in", opt=PUBLIC, name="console-sign-in", status_code=303)
async def sign_in(request: Request[Any, Any, Any]) -> Response[Any]:
    if security.cross_site(request):
        raise CsrfRefused
    form = await request.form()
    if not security.same_token(form.get(security.CSRF_FIELD), request.cookies.get(security.SIGN_IN_COOKIE, "")):
        raise CsrfRefused
    key = form.get("api_key")
    client = request.client.host if request.client else "unknown"
    try:
        new = await _console(request).sign_in(key if isinstance(key, str) else "", client=client)
    except SignInRefused:
        return _sign_in_page(
            request,
            status=401,
            message="That key was not accepted: it must be an active auditor or admin API key.",
        )
    except TooManySignIns as refused:
        response = _sign_in_page(
            request, status=429, message=f"Too many failed sign-ins. Try again in {refused.retry_after} seconds."
        )
        response.headers["Retry-After"] = str(refused.retry_after)
        return response
    request.scope.setdefault("state", {})["principal"] = new.principal
    earlier = request.cookies.get(security.SESSION_COOKIE)
    if earlier:  # a sign-in replaces the session this browser had: it ends, not only its cookie
        await _console(request).sign_out(earlier)
    seconds = _console(request).session_seconds
    return Redirect(
        "/console",
        status_code=303,
        cookies=[
            security.session_cookie(request, new.secret, seconds),
            security.expired_cookie(request, security.SIGN_IN_COOKIE),
        ],
    )


@post("/sign-out", name="console-sign-out", status_code=303)
async def sign_out(request: Request[Any, Any, Any]) -> Response[Any]:
    await _console(request).sign_out(request.cookies.get(security.SESSION_COOKIE, ""))
    return Redirect(SIGN_IN_PATH, status_code=303, cookies=[security.expired_cookie(request, security.SESSION_COOKIE)])


# Pages ---------------------------------------------------------------------------------------------------------


@get("/", name="console-overview")
async def overview(request: Request[Any, Any, Any]) -> Template:
    found = await _console(request).overview()
    return page(request, "overview.html", overview=found, chart=usage_chart(found.usage))


@get("/requests", name="console-request")
async def request_lookup(
    request: Request[Any, Any, Any], request_id: Annotated[str | None, QueryParameter(name="request_id")] = None
) -> Template:
    wanted = (request_id or "").strip()
    if not wanted:
        return page(request, "request.html", request_id="", detail=None)
    if len(wanted) > MAX_REQUEST_ID:
        raise errors.ValidationFailed(f"a request id has at most {MAX_REQUEST_ID} characters")
    try:
        detail = await _console(request).request(wanted)
    except errors.HoldNotFound:
        return page(request, "request.html", status=404, request_id=wanted, detail=None, not_found=True)
    return page(request, "request.html", request_id=wanted, detail=detail)


def _day(value: str | None, name: str) -> date | None:
    if value is None or not value.strip():
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise errors.ValidationFailed(f"{name} must be a date, YYYY-MM-DD") from None


def _range(
    created_from: str | None, created_to: str | None
) -> tuple[date | None, date | None, datetime | None, datetime | None]:
    first = _day(created_from, "from")
    last = _day(created_to, "to")
    start = None if first is None else datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = None if last is None else datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    if start is not None and end is not None and end <= start:
        raise errors.ValidationFailed("to must not be before from")
    return first, last, start, end


def _address(address: str | None) -> str:
    value = (address or "").strip()
    if len(value) > MAX_ADDRESS:
        raise errors.ValidationFailed(f"an address has at most {MAX_ADDRESS} characters")
    return value


@get("/statement", name="console-statement")
async def statement(
    request: Request[Any, Any, Any],
    address: Annotated[str | None, QueryParameter(name="address")] = None,
    created_from: Annotated[str | None, QueryParameter(name="from")] = None,
    created_to: Annotated[str | None, QueryParameter(name="to")] = None,
    cursor: Annotated[str | None, QueryParameter(name="cursor")] = None,
) -> Template:
    account = _address(address)
    first, last, start, end = _range(created_from, created_to)
    form = {"address": account, "from": first.isoformat() if first else "", "to": last.isoformat() if last else ""}
    if not account:
        return page(request, "statement.html", form=form, statement=None)
    found = await _console(request).statement(
        account, created_from=start, created_to=end, cursor=cursor or None, limit=PAGE_SIZE
    )
    return page(request, "statement.html", form=form, statement=found)


CSV_COLUMNS = ["entry_id", "kind", "created_at", "request_id", "ledger", "amount", "balance_after"]


@get("/statement.csv", name="console-statement-csv")
async def statement_csv(
    request: Request[Any, Any, Any],
    address: Annotated[str | None, QueryParameter(name="address")] = None,
    created_from: Annotated[str | None, QueryParameter(name="from")] = None,
    created_to: Annotated[str | None, QueryParameter(name="to")] = None,
) -> Response[Any]:
    account = _address(address)
    if not account:
        raise errors.ValidationFailed("name the account: address")
    _, _, start, end = _range(created_from, created_to)
    console = _console(request)
    pages = console.statement_lines(account, created_from=start, created_to=end)
    first = await anext(pages, None)  # the first page before the response starts: its errors are still a page

    async def rows() -> AsyncIterator[str]:
        # Through the service's one CSV writer (api/csv_writer.py): no cell can be read as a formula.
        header, batch = CSV_COLUMNS, first
        while True:
            cells = [
                [
                    line.entry_id,
                    line.kind,
                    line.created_at.astimezone(UTC).isoformat(),
                    line.request_id,
                    line.ledger,
                    line.amount,
                    line.balance_after,
                ]
                for line in batch or []
            ]
            text = csv_text(header, cells)
            yield text if header else text.split("\n", 1)[1]
            batch = await anext(pages, None)
            if batch is None:
                return
            header = []

    filename = "statement-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in account) + ".csv"
    return Stream(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# Reconciliation runs and the margin report ---------------------------------------------------------------------

RUN_CLASSES = ("differs", "only_provider", "only_ledger", "matched")
ITEMS_PER_PAGE = 100
RUNS_PER_PAGE = 50
MAX_ID = 2**63 - 1
MAX_ITEM_ID = 2**31 - 1
NOTE_MAX = 2000


def _reviews(request: Request[Any, Any, Any]) -> ExternalReconciliationService:
    service: ExternalReconciliationService = request.app.state.external_reconciliations
    return service


def _margins(request: Request[Any, Any, Any]) -> MarginService:
    service: MarginService = request.app.state.margins
    return service


def _class_filter(value: str | None) -> str | None:
    wanted = (value or "").strip()
    if not wanted:
        return None
    if wanted not in RUN_CLASSES:
        raise errors.ValidationFailed(f"class must be one of {', '.join(RUN_CLASSES)}")
    return wanted


def _run_id(run_id: int) -> int:
    if not 0 < run_id <= MAX_ID:
        raise errors.NotFound(f"reconciliation run {run_id} does not exist")
    return run_id


@get("/runs", name="console-runs")
async def runs(
    request: Request[Any, Any, Any], cursor: Annotated[str | None, QueryParameter(name="cursor")] = None
) -> Template:
    found = await _reviews(request).runs(cursor or None, RUNS_PER_PAGE)
    return page(request, "runs.html", runs=found)


@get("/runs/{run_id:int}", name="console-run")
async def run(
    request: Request[Any, Any, Any],
    run_id: Annotated[int, PathParameter()],
    klass: Annotated[str | None, QueryParameter(name="class")] = None,
    cursor: Annotated[str | None, QueryParameter(name="cursor")] = None,
) -> Template:
    wanted = _class_filter(klass)
    found = await _reviews(request).run(_run_id(run_id), wanted, cursor or None, ITEMS_PER_PAGE)
    items = [(item, *side_by_side(item.ledger, item.provider, item.difference)) for item in found.items]
    return page(
        request,
        "run.html",
        run=found,
        items=items,
        klass=wanted or "",
        classes=RUN_CLASSES,
        cursor=cursor or "",
        explained=request.query_params.get("explained"),
    )


@post("/runs/{run_id:int}/items/{item_id:int}/explain", name="console-explain", status_code=303)
async def explain(
    request: Request[Any, Any, Any], run_id: Annotated[int, PathParameter()], item_id: Annotated[int, PathParameter()]
) -> Response[Any]:
    form = await request.form()
    note = form.get("note")
    note = note.strip() if isinstance(note, str) else ""
    if not note:
        raise errors.ValidationFailed("write a note explaining the difference")
    if len(note) > NOTE_MAX or "\x00" in note:
        raise errors.ValidationFailed(f"a note has at most {NOTE_MAX} characters")
    if not 0 < item_id <= MAX_ITEM_ID:
        raise errors.NotFound(f"run {run_id} has no item {item_id}")
    session = _session(request)
    author = Principal(session.api_key_id, session.name, session.role)
    await _reviews(request).explain(_run_id(run_id), item_id, note, author)
    wanted = _class_filter(form.get("class") if isinstance(form.get("class"), str) else None)
    query = f"?class={wanted}&explained={item_id}" if wanted else f"?explained={item_id}"
    return Redirect(f"/console/runs/{run_id}{query}#item-{item_id}", status_code=303)


@get("/margin", name="console-margin")
async def margin(
    request: Request[Any, Any, Any], month: Annotated[str | None, QueryParameter(name="month")] = None
) -> Template:
    wanted = (month or "").strip() or datetime.now(UTC).strftime("%Y-%m")
    found = await _margins(request).margin(wanted)
    return page(request, "margin.html", margin=found, month=wanted)


def console_router() -> Router:
    return Router(
        path="/console",
        route_handlers=[
            sign_in_form,
            sign_in,
            sign_out,
            overview,
            request_lookup,
            statement,
            statement_csv,
            runs,
            run,
            explain,
            margin,
        ],
        before_request=admit_console,
        exception_handlers={Exception: console_error},
        middleware=[security.security_headers_middleware],
        include_in_schema=False,
    )


def console_static_router() -> Router:
    return create_static_files_router(
        path="/console/static",
        directories=[STATIC],
        name="console-static",
        include_in_schema=False,
        middleware=[security.security_headers_middleware],
    )
