"""Balances and usage of users, tokens and channels."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from ledger_service.api import auth
from ledger_service.api.params import PathId, parse_id
from ledger_service.api.problems import PROBLEMS
from ledger_service.schemas import ChannelView, TokenView, UserView
from ledger_service.services.ledger import LedgerService


class AccountController(Controller):
    path = "/"
    tags = ["balances"]

    @get(
        "/users/{user_id:str}",
        opt={"roles": auth.READ_ALL},
        responses=PROBLEMS,
        summary="A user's available, held and used quota",
    )
    async def user(self, user_id: PathId, ledger: NamedDependency[LedgerService]) -> UserView:
        return await ledger.user(parse_id(user_id, "user_id"))

    @get(
        "/tokens/{token_id:str}",
        opt={"roles": auth.READ_ALL},
        responses=PROBLEMS,
        summary="A token's allowance and usage",
    )
    async def token(self, token_id: PathId, ledger: NamedDependency[LedgerService]) -> TokenView:
        return await ledger.token(parse_id(token_id, "token_id"))

    @get(
        "/channels/{channel_id:str}",
        opt={"roles": auth.READ_ALL},
        responses=PROBLEMS,
        summary="Quota consumed through a channel",
    )
    async def channel(self, channel_id: PathId, ledger: NamedDependency[LedgerService]) -> ChannelView:
        return await ledger.channel(parse_id(channel_id, "channel_id"))
