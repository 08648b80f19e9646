"""API keys (admin)."""

from __future__ import annotations

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from ledger_service.api import auth
from ledger_service.api.params import PathId, parse_id
from ledger_service.api.problems import PROBLEMS
from ledger_service.schemas import ApiKeyCommand, ApiKeyCreatedView, ApiKeyListView
from ledger_service.services.api_keys import ApiKeyService


class ApiKeyController(Controller):
    path = "/api-keys"
    tags = ["access"]

    @post(
        "/",
        status_code=201,
        opt={"roles": auth.ADMIN_ONLY},
        responses=PROBLEMS,
        summary="Create a key; the secret is shown once",
    )
    async def create(self, data: JSONBody[ApiKeyCommand], keys: NamedDependency[ApiKeyService]) -> ApiKeyCreatedView:
        return await keys.create(data)

    @get("/", opt={"roles": auth.ADMIN_ONLY}, responses=PROBLEMS, summary="Every key (never the secrets)")
    async def list_keys(self, keys: NamedDependency[ApiKeyService]) -> ApiKeyListView:
        return ApiKeyListView(items=await keys.list())

    @delete(
        "/{key_id:str}", status_code=204, opt={"roles": auth.ADMIN_ONLY}, responses=PROBLEMS, summary="Revoke a key"
    )
    async def revoke(self, key_id: PathId, keys: NamedDependency[ApiKeyService]) -> None:
        await keys.revoke(parse_id(key_id, "key_id"))
