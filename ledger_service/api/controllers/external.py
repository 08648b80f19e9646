"""Provider files, the channel map and provider prices (external reconciliation's inputs; docs/external.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, Router, get, post, put
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import JSONBody, Parameter, QueryParameter
from litestar.response import Response

from ledger_service.api import auth
from ledger_service.api.controllers.responses import REPLAYED_HEADER
from ledger_service.api.params import (
    NAME_OPENAPI_PATTERN,
    PathId,
    PathName,
    QueryCursor,
    QueryId,
    QueryLimit,
    choices_schema,
    parse_choice,
    parse_id,
    parse_limit,
    parse_name,
    parse_optional_id,
)
from ledger_service.api.problems import PROBLEMS, created, replayed
from ledger_service.domain import errors
from ledger_service.domain.external import Source
from ledger_service.schemas import (
    ChannelMapCommand,
    ChannelMapEntryView,
    ChannelMapView,
    ProviderPriceCommand,
    ProviderPriceListView,
    ProviderPriceView,
    UploadCreatedView,
    UploadDetailView,
    UploadListView,
)
from ledger_service.services.external import ExternalService

SOURCES = frozenset(source.value for source in Source)
UPLOAD_QUERY = frozenset({"source", "channel_id", "filename"})
PAGE_QUERY = frozenset({"cursor", "limit"})
MULTIPART = "multipart/form-data"
QueryFilename = Annotated[
    str | None,
    QueryParameter(
        required=False,
        schema_extra={
            "one_of": None,
            "type": OpenAPIType.STRING,
            "pattern": NAME_OPENAPI_PATTERN,
            "description": "The file's name, kept with it: 1-200 characters, no control or format characters.",
        },
    ),
]
QuerySource = Annotated[
    str | None, QueryParameter(schema_extra=choices_schema(SOURCES, "The file's source (with a raw body)."))
]


UPLOAD_BODY = RequestBody(
    required=True,
    description="The provider's file: as a multipart form (`file` and `source`), or as the body itself with"
    " `?source=` (JSON, JSON Lines or CSV, any content type). See docs/external.md.",
    content={
        MULTIPART: OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.OBJECT,
                properties={
                    "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
                    "source": Schema(type=OpenAPIType.STRING, enum=sorted(SOURCES)),
                    "channel_id": Schema(type=OpenAPIType.INTEGER, minimum=1, maximum=2**63 - 1),
                },
                required=["file", "source"],
            )
        ),
        "application/json": OpenAPIMediaType(schema=Schema(description="A JSON or JSON Lines export")),
        "text/csv": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
    },
)


@dataclass
class UploadOperation(Operation):
    """The upload's operation in the OpenAPI document, with its body (the handler reads it from the request)."""

    def __post_init__(self) -> None:
        self.request_body = UPLOAD_BODY


def _source(raw: str | None) -> Source:
    return Source(parse_choice(raw, "source", SOURCES))


def _form_text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.ValidationFailed(f"the form field {name} must be text, not a file")
    return value


class ExternalUploadController(Controller):
    """POST /v1/external/uploads alone: its body limit is LEDGER_MAX_UPLOAD_BYTES (upload_router)."""

    path = "/uploads"
    tags = ["external"]

    @post(
        "/",
        status_code=201,
        opt={"roles": auth.ADMIN_ONLY, "query": UPLOAD_QUERY, "any_body": True},
        responses=replayed(UploadCreatedView),
        operation_class=UploadOperation,
        summary="Upload a provider's usage or cost export (multipart `file` + `source`, or the file as the body)",
    )
    async def upload(
        self,
        request: Request[Any, Any, Any],
        external: NamedDependency[ExternalService],
        source: QuerySource = None,
        channel_id: QueryId = None,
        filename: QueryFilename = None,
    ) -> Response[UploadCreatedView]:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == MULTIPART:
            form = await request.form()
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise errors.ValidationFailed("the form needs a `file` field holding the provider's file")
            source = _form_text(form.get("source"), "source") or source
            channel_id = _form_text(form.get("channel_id"), "channel_id") or channel_id
            content = await upload.read()
            filename = upload.filename or filename
        else:
            content = await request.body()
        if not content:
            raise errors.ValidationFailed("the file is empty")
        if filename is not None:
            filename = parse_name(filename[-200:], "filename")
        outcome = await external.upload(
            _source(source),
            content,
            filename=filename,
            channel_id=parse_optional_id(channel_id, "channel_id"),
            uploaded_by=request.state.principal.key_id,
        )
        if outcome.created:
            return Response(outcome.view, status_code=201)
        return Response(outcome.view, status_code=200, headers={REPLAYED_HEADER: "true"})


def upload_router(max_upload_bytes: int) -> Router:
    """The upload route under its own body limit; every other route keeps LEDGER_MAX_BODY_BYTES. The router sets
    no before-request hook, so the `/v1` router's key check (admit_request) is the one that runs."""
    return Router(
        path="/external",
        route_handlers=[ExternalUploadController],
        request_max_body_size=max_upload_bytes,
    )


class ExternalController(Controller):
    path = "/external"
    tags = ["external"]

    @get(
        "/uploads",
        opt={"roles": auth.AUDIT_READ, "query": PAGE_QUERY},
        responses=PROBLEMS,
        summary="Provider uploads, newest first",
    )
    async def uploads(
        self, external: NamedDependency[ExternalService], cursor: QueryCursor = None, limit: QueryLimit = None
    ) -> UploadListView:
        return await external.uploads(cursor=cursor, limit=parse_limit(limit))

    @get(
        "/uploads/{upload_id:str}",
        opt={"roles": auth.AUDIT_READ, "query": PAGE_QUERY},
        responses=PROBLEMS,
        summary="One upload and its records, a page at a time",
    )
    async def upload(
        self,
        upload_id: PathId,
        external: NamedDependency[ExternalService],
        cursor: QueryCursor = None,
        limit: QueryLimit = None,
    ) -> UploadDetailView:
        return await external.upload_detail(parse_id(upload_id, "upload_id"), cursor=cursor, limit=parse_limit(limit))

    @put(
        "/channel-map/{source:str}/{external_key:str}",
        status_code=200,
        opt={"roles": auth.ADMIN_ONLY},
        responses=created(ChannelMapEntryView),
        summary="Say which ledger channel a provider api key or project is",
    )
    async def set_channel(
        self,
        source: Annotated[str, Parameter(schema_extra=choices_schema(SOURCES, "The provider file's source."))],
        external_key: PathName,
        data: JSONBody[ChannelMapCommand],
        external: NamedDependency[ExternalService],
    ) -> Response[ChannelMapEntryView]:
        view, was_created = await external.set_channel(
            _source(source), parse_name(external_key, "external_key"), data.channel_id
        )
        return Response(view, status_code=201 if was_created else 200)

    @get("/channel-map", opt={"roles": auth.AUDIT_READ}, responses=PROBLEMS, summary="The whole channel map")
    async def channel_map(self, external: NamedDependency[ExternalService]) -> ChannelMapView:
        return await external.channel_map()

    @put(
        "/provider-prices/{model:path}",
        status_code=200,
        opt={"roles": auth.ADMIN_ONLY},
        responses=created(ProviderPriceView),
        summary="Set what a provider charges for a model (the margin report's estimate without a cost record)",
    )
    async def set_price(
        self,
        model: PathName,
        data: JSONBody[ProviderPriceCommand],
        external: NamedDependency[ExternalService],
    ) -> Response[ProviderPriceView]:
        view, was_created = await external.set_price(parse_name(model.lstrip("/"), "model"), data)
        return Response(view, status_code=201 if was_created else 200)

    @get("/provider-prices", opt={"roles": auth.AUDIT_READ}, responses=PROBLEMS, summary="Every provider price")
    async def prices(self, external: NamedDependency[ExternalService]) -> ProviderPriceListView:
        return await external.prices()
