"""The import's rules as tables (domain/relay_import.py), one row per rule and result; no database."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ledger_service.domain.entries import EntryKind
from ledger_service.domain.relay_import import (
    LedgerToken,
    Listed,
    ModelPrices,
    SeenToken,
    TokenMove,
    UserMove,
    check_source_id,
    parse_option_map,
    plan_prices,
    plan_token,
    plan_user,
    pre_consumed_note,
)
from ledger_service.domain.relays import RelayKind, RelayToken, RelayUser

MAX = 10**15

# (relay quota, deleted, last seen, ledger available+held) -> (kind, amount) | "listed" | None
USER_ROWS = [
    pytest.param(1000, False, None, 0, (EntryKind.OPENING, 1000), id="first run opens the relay quota"),
    pytest.param(-250, False, None, 0, (EntryKind.OPENING, -250), id="a debt opens negative"),
    pytest.param(1000, False, None, 300, (EntryKind.OPENING, 700), id="opening tops up what the ledger has"),
    pytest.param(0, False, None, 0, (EntryKind.OPENING, 0), id="zero is remembered, nothing posted"),
    pytest.param(1000, False, 1000, 40, None, id="unchanged relay: nothing, whatever the ledger did"),
    pytest.param(1500, False, 1000, 40, (EntryKind.ADJUSTMENT, 500), id="relay moved up: the difference"),
    pytest.param(-10, False, 1000, 1000, (EntryKind.ADJUSTMENT, -1010), id="relay moved into debt"),
    pytest.param(1000, True, None, 0, "listed", id="soft-deleted user is listed"),
    pytest.param(MAX + 1, False, None, 0, "listed", id="beyond the ledger's amounts"),
    pytest.param(MAX, False, None, -1, "listed", id="opening amount beyond the limit"),
]


@pytest.mark.parametrize(("quota", "deleted", "seen", "ledger_total", "expected"), USER_ROWS)
def test_plan_user(quota: int, deleted: bool, seen: int | None, ledger_total: int, expected: object) -> None:
    result = plan_user(RelayUser(id=7, quota=quota, deleted=deleted), seen, ledger_total)
    if expected is None:
        assert result is None
    elif expected == "listed":
        assert isinstance(result, Listed)
        assert (result.subject, result.key) == ("user", "7")
    else:
        assert isinstance(result, UserMove)
        assert (result.kind, result.amount, result.relay_quota) == (*expected, quota)  # type: ignore[misc]


def test_user_move_drafts_name_the_source_and_the_run() -> None:
    opening = UserMove(7, EntryKind.OPENING, 500, 500, 0).draft("one-api-x", 3, RelayKind.ONE_API)
    moved = UserMove(7, EntryKind.ADJUSTMENT, -5, 495, 500).draft("one-api-x", 4, RelayKind.ONE_API)
    assert opening.reference == "import:one-api-x:user:7"
    assert moved.reference == "import:one-api-x:run:4:user:7"
    assert {(p.account, p.amount) for p in opening.postings} == {("system:issuance", -500), ("user:7", 500)}
    assert moved.details["previous_relay_quota"] == 500


def _token(remain: int = 100, *, unlimited: bool = False, deleted: bool = False, known: bool = True) -> RelayToken:
    return RelayToken(
        id=9, user_id=7, remain_quota=remain, unlimited=unlimited, status=1, deleted=deleted, user_known=known
    )


# (token, last seen, ledger token) -> (delta, first) | "listed" | None
TOKEN_ROWS = [
    pytest.param(_token(100), None, None, (100, True), id="first run sets the allowance"),
    pytest.param(_token(0, unlimited=True), None, None, (0, True), id="unlimited registers with no allowance"),
    pytest.param(_token(-20), None, None, (-20, True), id="an overdrawn token keeps its debt"),
    pytest.param(_token(100), None, LedgerToken(7, False, 30), (70, True), id="first run tops up the ledger's"),
    pytest.param(_token(100), SeenToken(100, False), LedgerToken(7, False, 5), None, id="unchanged: nothing"),
    pytest.param(_token(150), SeenToken(100, False), LedgerToken(7, False, 5), (50, False), id="moved: difference"),
    pytest.param(
        _token(0, unlimited=True), SeenToken(100, False), LedgerToken(7, False, 60), (-60, False), id="to unlimited"
    ),
    pytest.param(_token(80), SeenToken(0, True), LedgerToken(7, True, 0), (80, False), id="from unlimited"),
    pytest.param(_token(deleted=True), None, None, "listed", id="soft-deleted token"),
    pytest.param(_token(known=False), None, None, "listed", id="its user is gone"),
    pytest.param(_token(100), None, LedgerToken(8, False, 0), "listed", id="another user's token in the ledger"),
    pytest.param(_token(MAX + 1), None, None, "listed", id="beyond the ledger's amounts"),
]


@pytest.mark.parametrize(("token", "seen", "ledger", "expected"), TOKEN_ROWS)
def test_plan_token(token: RelayToken, seen: SeenToken | None, ledger: LedgerToken | None, expected: object) -> None:
    result = plan_token(token, seen, ledger)
    if expected is None:
        assert result is None
    elif expected == "listed":
        assert isinstance(result, Listed)
        assert result.subject == "token"
    else:
        assert isinstance(result, TokenMove)
        assert (result.delta, result.first) == expected


def test_token_drafts_post_the_allowance_difference() -> None:
    move = TokenMove(9, 7, False, 150, 50, False, 100)
    draft = move.draft("src", 2, RelayKind.NEW_API)
    assert draft.reference == "import:src:run:2:token:9"
    assert {(p.account, p.amount) for p in draft.postings} == {("system:allowance", -50), ("token:9", 50)}
    assert draft.details["remaining"] == 150


# Prices ------------------------------------------------------------------------------------------------------

OPTION_ROWS = [
    pytest.param('{"gpt-4o-mini": 0.075}', {"gpt-4o-mini": "0.075"}, [], id="float digits kept"),
    pytest.param('{"m": 2.50, "n": 3}', {"m": "2.50", "n": "3"}, [], id="trailing zero and integer kept"),
    pytest.param('{"gpt-4(1)": 20, "m": 1}', {"m": "1"}, ["gpt-4(1)"], id="model(channelType) listed"),
    pytest.param('{"m": "2", "n": -1, "o": 1e10}', {}, ["m", "n", "o"], id="non-numbers and out of range listed"),
    pytest.param('{"": 1, "a\\u0000b": 1}', {}, ["", "a\x00b"], id="unusable names listed"),
    pytest.param("{not json", {}, ["ModelRatio"], id="bad JSON listed as the option"),
    pytest.param("[1, 2]", {}, ["ModelRatio"], id="not an object"),
]


@pytest.mark.parametrize(("text", "kept", "listed_keys"), OPTION_ROWS)
def test_parse_option_map(text: str, kept: dict[str, str], listed_keys: list[str]) -> None:
    listed: list[Listed] = []
    parsed = parse_option_map("ModelRatio", text, listed)
    assert {name: str(value) for name, value in parsed.items()} == kept
    assert [item.key for item in listed] == listed_keys


def test_plan_prices_sets_what_differs_and_keeps_what_the_relay_did_not_store() -> None:
    options = {
        "ModelRatio": '{"gpt-4o": 2.5, "gpt-4o-mini": 0.075, "new-model": 1.25}',
        "CompletionRatio": '{"gpt-4o": 4, "new-model": 2}',
        "GroupRatio": '{"default": 1, "vip": 0.8}',
        "CacheRatio": '{"gpt-4o": 0.5}',
    }
    ledger = {
        "gpt-4o": ModelPrices(Decimal("2.5"), Decimal("4"), None),
        "gpt-4o-mini": ModelPrices(Decimal("0.075"), Decimal("4"), None),
    }
    plan = plan_prices(options, ledger, {"default": Decimal(1), "vip": Decimal(1)})
    assert plan.models == {"new-model": ModelPrices(Decimal("1.25"), Decimal("2"), None)}
    assert plan.groups == {"vip": Decimal("0.8")}
    assert plan.unchanged == 3  # gpt-4o, gpt-4o-mini (its completion ratio kept), group default
    assert plan.stored == 5
    listed = {(item.subject, item.key) for item in plan.listed}
    assert listed == {("model", "gpt-4o-mini"), ("option", "CacheRatio")}


def test_plan_prices_per_call_models_and_digits() -> None:
    options = {"ModelPrice": '{"mj-imagine": 0.1}', "ModelRatio": '{"gpt-4o": 2.50}'}
    ledger = {"gpt-4o": ModelPrices(Decimal("2.5"), Decimal("4"), None)}
    plan = plan_prices(options, ledger, {})
    assert plan.models["gpt-4o"].model_ratio == Decimal("2.50")
    assert str(plan.models["gpt-4o"].model_ratio) == "2.50"  # the relay's digits win over an equal 2.5
    assert plan.models["mj-imagine"] == ModelPrices(Decimal(30), Decimal(1), Decimal("0.1"))
    assert all(item.key != "mj-imagine" for item in plan.listed)


@pytest.mark.parametrize(
    ("options", "setting", "listed"),
    [
        pytest.param({}, 500, False, id="not stored"),
        pytest.param({"PreConsumedQuota": "500"}, 500, False, id="same"),
        pytest.param({"PreConsumedQuota": "1000"}, 500, True, id="differs"),
        pytest.param({"PreConsumedQuota": "lots"}, 500, True, id="unreadable"),
    ],
)
def test_pre_consumed_quota(options: dict[str, str], setting: int, listed: bool) -> None:
    assert (pre_consumed_note(options, setting) is not None) == listed


@pytest.mark.parametrize("source_id", ["", "a" * 65, "has space", "colon:no", "ünï"])
def test_source_ids_fit_references(source_id: str) -> None:
    with pytest.raises(ValueError, match="source id"):
        check_source_id(source_id)
