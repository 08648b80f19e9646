"""The request lifecycle over HTTP, as a relay drives it: holds, settlements, refunds, expiry, consumptions."""

from __future__ import annotations

from typing import Any

import pytest

from ledger_service.services.ledger import LedgerService
from tests.support import LedgerClient, unique


async def entries_of(ledger: LedgerClient, request_id: str) -> list[dict[str, Any]]:
    response = await ledger.get(f"/v1/holds/{request_id}")
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def postings(entry: dict[str, Any]) -> set[tuple[str, str, int]]:
    return {(p["ledger"], p["account"], p["amount"]) for p in entry["postings"]}


@pytest.mark.parametrize(
    ("model", "group", "prompt", "max_tokens", "estimate"),
    [
        ("gpt-4o", "default", 100, 200, 2000),  # (500 + 300) x 2.5
        ("gpt-4o-mini", "vip", 1000, 0, 112),  # 1500 x 0.075 = 112.5
        ("gpt-3.5-turbo", "svip", 1, 2, 125),  # 503 x 0.25 = 125.75
        ("gpt-4", "default", 0, 100, 9000),  # 600 x 15
        ("claude-3-5-sonnet-20241022", "default", 10, 10, 780),  # 520 x 1.5
        ("deepseek-chat", "default", 1000, 1000, 175),  # 2500 x 0.07
        ("some-unknown-model", "some-unknown-group", 100, 0, 18000),  # 600 x 30 x 1
    ],
)
async def test_hold_reserves_one_apis_estimate(
    ledger: LedgerClient, model: str, group: str, prompt: int, max_tokens: int, estimate: int
) -> None:
    await ledger.fund(1, 50 * estimate)  # below the trust threshold: the estimate is really held
    await ledger.token(1, 1)
    response = await ledger.hold(request_id="r", model=model, group=group, prompt_tokens=prompt, max_tokens=max_tokens)
    assert response.status_code == 201, response.text
    hold = response.json()
    assert (hold["amount"], hold["trusted"], hold["status"]) == (estimate, False, "open")
    user = await ledger.user(1)
    assert (user["available"], user["held"]) == (49 * estimate, estimate)
    assert await ledger.raw_balance("hold:r") == estimate
    await ledger.assert_books_balance()


async def test_group_ratio_multiplies_the_model_ratio(ledger: LedgerClient) -> None:
    response = await ledger.put("/v1/pricing/groups/premium", {"group_ratio": "1.5"}, as_="admin")
    assert response.status_code == 201, response.text
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    hold = (await ledger.hold(request_id="r", group="premium", prompt_tokens=100, max_tokens=0)).json()
    assert hold["amount"] == 2250  # 600 x 2.5 x 1.5
    settled = await ledger.post("/v1/holds/r/settle", {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 10})
    assert settled.json()["charged"] == 525  # (100 + 40) x 3.75


async def test_settle_releases_the_hold_and_charges_the_real_cost(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1, remaining=50_000)
    await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=200)  # holds 2000
    response = await ledger.post("/v1/holds/r/settle", {"channel_id": 7, "prompt_tokens": 100, "completion_tokens": 50})
    assert response.status_code == 200, response.text
    hold = response.json()
    assert (hold["status"], hold["charged"], hold["channel_id"], hold["late"]) == ("settled", 750, 7, False)
    settle = (await entries_of(ledger, "r"))[-1]
    assert settle["kind"] == "settle"
    assert postings(settle) == {
        ("quota", "hold:r", -2000),
        ("quota", "channel:7", 750),
        ("quota", "user:1", 1250),
        ("allowance", "hold:r", -2000),
        ("allowance", "system:allowance", 750),
        ("allowance", "token:1", 1250),
    }
    assert settle["details"]["model_ratio"] == "2.5"
    user = await ledger.user(1)
    assert user == {"user_id": 1, "available": 99_250, "held": 0, "used": 750, "request_count": 1}
    token = await ledger.token_view(1)
    assert (token["remaining"], token["held"], token["used"]) == (49_250, 0, 750)
    channel = (await ledger.get("/v1/channels/7")).json()
    assert channel == {"channel_id": 7, "used": 750, "request_count": 1}
    assert await ledger.raw_balance("hold:r") == 0
    assert await ledger.raw_balance("hold:r", "allowance") == 0
    await ledger.assert_books_balance()


async def test_usage_above_the_estimate_is_recorded_even_into_the_negative(ledger: LedgerClient) -> None:
    await ledger.fund(1, 2500)
    await ledger.token(1, 1, remaining=2100)
    hold = (await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=200)).json()
    assert hold["amount"] == 2000
    response = await ledger.post(
        "/v1/holds/r/settle", {"channel_id": 7, "prompt_tokens": 1000, "completion_tokens": 1000}
    )
    assert response.json()["charged"] == 12_500  # (1000 + 4000) x 2.5
    assert (await ledger.user(1))["available"] == 2500 - 12_500
    assert (await ledger.token_view(1))["remaining"] == 2100 - 12_500
    await ledger.assert_books_balance()


async def test_explicit_amount_and_quota_replace_the_priced_ones(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    hold = (await ledger.hold(request_id="r", amount=1234)).json()
    assert hold["amount"] == 1234
    body = {"channel_id": 2, "prompt_tokens": 999, "completion_tokens": 999, "quota": 77}
    settled = (await ledger.post("/v1/holds/r/settle", body)).json()
    assert settled["charged"] == 77
    assert (await ledger.user(1))["available"] == 100_000 - 77


async def test_refund_gives_the_hold_back(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000)
    await ledger.token(1, 1, remaining=5000)
    await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=200)
    response = await ledger.post("/v1/holds/r/refund", {"reason": "upstream 502"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "refunded"
    refund = (await entries_of(ledger, "r"))[-1]
    assert refund["kind"] == "refund"
    assert refund["details"]["reason"] == "upstream 502"
    assert postings(refund) == {
        ("quota", "hold:r", -2000),
        ("quota", "user:1", 2000),
        ("allowance", "hold:r", -2000),
        ("allowance", "token:1", 2000),
    }
    assert (await ledger.user(1))["available"] == 10_000
    assert (await ledger.token_view(1))["remaining"] == 5000
    # A refund with no body at all is accepted too.
    await ledger.hold(request_id="r2", prompt_tokens=1)
    bare = await ledger.client.post("/v1/holds/r2/refund", headers=ledger.headers("relay"))
    assert bare.status_code == 200, bare.text
    await ledger.assert_books_balance()


async def test_trusted_user_and_token_hold_nothing(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000_000)
    await ledger.token(1, 1)
    hold = (await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=200)).json()
    assert (hold["amount"], hold["trusted"]) == (0, True)
    assert await entries_of(ledger, "r") == []
    settled = (
        await ledger.post("/v1/holds/r/settle", {"channel_id": 3, "prompt_tokens": 10, "completion_tokens": 0})
    ).json()
    assert settled["charged"] == 25
    (settle,) = await entries_of(ledger, "r")
    assert postings(settle) == {("quota", "user:1", -25), ("quota", "channel:3", 25)}
    await ledger.assert_books_balance()


async def test_trust_rule_also_looks_at_the_token(ledger: LedgerClient) -> None:
    """one-api trusted a rich user's small-capped token and let it go deep negative (PR #925); not here."""
    await ledger.fund(1, 10_000_000)
    await ledger.token(1, 1, remaining=100_000)  # 50 estimates: below 100 x estimate
    hold = (await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=200)).json()
    assert (hold["amount"], hold["trusted"]) == (2000, False)
    await ledger.token(2, 1, remaining=300_000)  # 150 estimates: trusted
    hold = (await ledger.hold(request_id="r2", token_id=2, prompt_tokens=100, max_tokens=200)).json()
    assert (hold["amount"], hold["trusted"]) == (0, True)


async def test_insufficient_quota_is_refused_and_writes_nothing(ledger: LedgerClient) -> None:
    await ledger.fund(1, 1999)
    await ledger.token(1, 1)
    response = await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=200)
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "insufficient_user_quota"
    await ledger.fund(2, 10_000)
    await ledger.token(2, 2, remaining=1999)
    response = await ledger.hold(request_id="r", user_id=2, token_id=2, prompt_tokens=100, max_tokens=200)
    assert response.status_code == 403
    assert response.json()["code"] == "insufficient_token_quota"
    assert await ledger.count("SELECT count(*) FROM requests") == 0
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'hold'") == 0


async def test_token_must_exist_and_belong_to_the_user(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000)
    response = await ledger.hold(request_id="r", token_id=42)
    assert (response.status_code, response.json()["code"]) == (404, "token_not_found")
    await ledger.token(42, 2)
    response = await ledger.hold(request_id="r", token_id=42)
    assert (response.status_code, response.json()["code"]) == (409, "token_user_mismatch")
    response = await ledger.put("/v1/tokens/42", {"user_id": 1, "unlimited": True})
    assert (response.status_code, response.json()["code"]) == (409, "token_user_mismatch")


async def test_hold_conflicts(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000)
    await ledger.token(1, 1)
    settle = {"channel_id": 1, "prompt_tokens": 1, "completion_tokens": 1}
    for path in ("/v1/holds/missing/settle", "/v1/holds/missing/refund"):
        response = await ledger.post(path, settle if path.endswith("settle") else {})
        assert (response.status_code, response.json()["code"]) == (404, "hold_not_found")
    assert (await ledger.get("/v1/holds/missing")).json()["code"] == "hold_not_found"

    await ledger.hold(request_id="a", prompt_tokens=1)
    await ledger.post("/v1/holds/a/refund", {})
    response = await ledger.post("/v1/holds/a/settle", settle)
    assert (response.status_code, response.json()["code"]) == (409, "hold_already_refunded")

    await ledger.hold(request_id="b", prompt_tokens=1)
    assert (await ledger.post("/v1/holds/b/settle", settle)).status_code == 200
    response = await ledger.post("/v1/holds/b/refund", {})
    assert (response.status_code, response.json()["code"]) == (409, "hold_already_settled")
    response = await ledger.post("/v1/holds/b/settle", {**settle, "completion_tokens": 2})
    assert (response.status_code, response.json()["code"]) == (409, "hold_already_settled")
    await ledger.assert_books_balance()


async def test_expired_holds_are_refunded_by_the_sweeper(ledger: LedgerClient, service: LedgerService) -> None:
    await ledger.fund(1, 10_000)
    await ledger.token(1, 1, remaining=5000)
    hold = (await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=200, expires_in=30)).json()
    assert hold["expires_at"] > hold["created_at"]
    assert await service.lifecycle.expire_due_holds() == 0  # not due yet
    await ledger.backdate("r")
    assert await service.lifecycle.expire_due_holds() == 1
    assert await service.lifecycle.expire_due_holds() == 0  # exactly once
    view = (await ledger.get("/v1/holds/r")).json()
    assert view["status"] == "expired"
    assert [e["kind"] for e in view["entries"]] == ["hold", "expire"]
    assert (await ledger.user(1))["available"] == 10_000
    assert (await ledger.token_view(1))["remaining"] == 5000

    # A refund after expiry changes nothing and returns the expired hold.
    response = await ledger.post("/v1/holds/r/refund", {})
    assert (response.status_code, response.json()["status"]) == (200, "expired")

    # A settlement after expiry is still charged, as a direct consumption, marked late.
    response = await ledger.post("/v1/holds/r/settle", {"channel_id": 4, "prompt_tokens": 100, "completion_tokens": 0})
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["late"], response.json()["charged"]) == ("settled", True, 250)
    late = (await entries_of(ledger, "r"))[-1]
    assert late["details"]["late"] is True
    assert postings(late) == {
        ("quota", "user:1", -250),
        ("quota", "channel:4", 250),
        ("allowance", "token:1", -250),
        ("allowance", "system:allowance", 250),
    }
    assert (await ledger.user(1))["used"] == 250
    await ledger.assert_books_balance()


async def test_a_due_hold_expires_on_the_next_call_even_before_the_sweeper(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="s", prompt_tokens=100, max_tokens=200)
    await ledger.hold(request_id="f", prompt_tokens=100, max_tokens=200)
    await ledger.backdate("s")
    await ledger.backdate("f")
    settled = (
        await ledger.post("/v1/holds/s/settle", {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 0})
    ).json()
    assert (settled["status"], settled["late"]) == ("settled", True)
    assert [e["kind"] for e in await entries_of(ledger, "s")] == ["hold", "expire", "settle"]
    refunded = (await ledger.post("/v1/holds/f/refund", {})).json()
    assert refunded["status"] == "expired"
    assert [e["kind"] for e in await entries_of(ledger, "f")] == ["hold", "expire"]
    assert (await ledger.user(1))["available"] == 10_000 - 250
    await ledger.assert_books_balance()


async def test_consumption_charges_without_a_hold_or_a_balance_check(ledger: LedgerClient) -> None:
    await ledger.token(1, 1, remaining=100)
    body = {
        "request_id": "c1",
        "user_id": 1,
        "token_id": 1,
        "channel_id": 9,
        "model": "gpt-4o",
        "prompt_tokens": 100,
        "completion_tokens": 100,
    }
    response = await ledger.post("/v1/consumptions", body)
    assert response.status_code == 201, response.text
    assert (response.json()["status"], response.json()["charged"], response.json()["amount"]) == ("settled", 1250, 0)
    (consume,) = await entries_of(ledger, "c1")
    assert consume["kind"] == "consume"
    assert postings(consume) == {
        ("quota", "user:1", -1250),
        ("quota", "channel:9", 1250),
        ("allowance", "token:1", -1250),
        ("allowance", "system:allowance", 1250),
    }
    assert (await ledger.user(1))["available"] == -1250
    assert (await ledger.token_view(1))["remaining"] == 100 - 1250
    # A settle or refund of a consumption: it is already settled.
    response = await ledger.post("/v1/holds/c1/refund", {})
    assert response.json()["code"] == "hold_already_settled"
    await ledger.assert_books_balance()


async def test_zero_quota_requests_still_count(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="z", prompt_tokens=1)
    settled = (
        await ledger.post("/v1/holds/z/settle", {"channel_id": 1, "prompt_tokens": 0, "completion_tokens": 0})
    ).json()
    assert settled["charged"] == 0
    consumption = {"request_id": "z2", "user_id": 1, "token_id": 1, "channel_id": 1, "model": "gpt-4o"}
    await ledger.post("/v1/consumptions", {**consumption, "prompt_tokens": 0, "completion_tokens": 0})
    user = await ledger.user(1)
    assert (user["used"], user["request_count"], user["available"]) == (0, 2, 10_000)
    assert (await ledger.get("/v1/channels/1")).json()["request_count"] == 2


async def test_a_price_change_never_reprices_an_open_hold(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="r", prompt_tokens=100, max_tokens=0)
    response = await ledger.put("/v1/pricing/models/gpt-4o", {"model_ratio": 5, "completion_ratio": 4}, as_="admin")
    assert response.status_code == 200, response.text
    settled = (
        await ledger.post("/v1/holds/r/settle", {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 0})
    ).json()
    assert settled["charged"] == 250  # the captured 2.5, not the new 5
    await ledger.hold(request_id="r2", prompt_tokens=100, max_tokens=0)
    settled = (
        await ledger.post("/v1/holds/r2/settle", {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 0})
    ).json()
    assert settled["charged"] == 500


async def test_per_call_priced_models(ledger: LedgerClient) -> None:
    response = await ledger.put("/v1/pricing/models/dall-e-3", {"model_price": "0.04"}, as_="admin")
    assert response.status_code == 201, response.text
    assert response.json() == {"model_ratio": "30", "completion_ratio": "1", "model_price": "0.04"}
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    hold = (await ledger.hold(request_id="img", model="dall-e-3", prompt_tokens=5000, max_tokens=0)).json()
    assert hold["amount"] == 20_000
    settled = (
        await ledger.post("/v1/holds/img/settle", {"channel_id": 1, "prompt_tokens": 1, "completion_tokens": 1})
    ).json()
    assert settled["charged"] == 20_000


async def test_pricing_is_listed_with_exact_decimal_strings(ledger: LedgerClient) -> None:
    # Raw JSON text: the number 0.0750 must arrive as written, which Python's json module would not send.
    response = await ledger.client.put(
        "/v1/pricing/models/exact",
        content=b'{"model_ratio": 0.0750, "completion_ratio": 1.2345678901234567890123}',
        headers={**ledger.headers("admin"), "content-type": "application/json"},
    )
    assert response.status_code == 201, response.text
    pricing = (await ledger.get("/v1/pricing")).json()
    assert pricing["models"]["gpt-4o-mini"] == {"model_ratio": "0.075", "completion_ratio": "4", "model_price": None}
    assert pricing["models"]["exact"]["model_ratio"] == "0.0750"
    assert pricing["models"]["exact"]["completion_ratio"] == "1.2345678901234567890123"  # 23 digits, no float
    assert pricing["groups"]["vip"] == {"group_ratio": "1"}
    assert pricing["defaults"] == {"model_ratio": "30", "completion_ratio": "1", "group_ratio": "1"}
    assert await ledger.count("SELECT count(*) FROM model_prices WHERE model_ratio::text = '0.0750'") == 1


async def test_token_allowance_posts_the_difference(ledger: LedgerClient) -> None:
    response = await ledger.put("/v1/tokens/5", {"user_id": 1, "unlimited": False, "remaining": 1000})
    assert response.status_code == 201
    assert response.json() == {"token_id": 5, "user_id": 1, "unlimited": False, "remaining": 1000, "held": 0, "used": 0}
    response = await ledger.put("/v1/tokens/5", {"user_id": 1, "unlimited": False, "remaining": 400})
    assert (response.status_code, response.json()["remaining"]) == (200, 400)
    assert await ledger.raw_balance("system:allowance", "allowance") == -400
    response = await ledger.put("/v1/tokens/5", {"user_id": 1, "unlimited": True})
    assert (response.json()["unlimited"], response.json()["remaining"]) == (True, None)
    assert await ledger.raw_balance("token:5", "allowance") == 0
    kinds = await ledger.conn.fetch("SELECT details FROM entries WHERE kind = 'allowance' ORDER BY id")
    assert len(kinds) == 3
    # Setting the same allowance again posts nothing.
    await ledger.put("/v1/tokens/5", {"user_id": 1, "unlimited": True})
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'allowance'") == 3
    await ledger.assert_books_balance()


async def test_unlimited_tokens_track_usage_but_post_no_allowance(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="r", prompt_tokens=100)
    await ledger.post("/v1/holds/r/settle", {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": 0})
    token = await ledger.token_view(1)
    assert (token["unlimited"], token["remaining"], token["used"]) == (True, None, 250)
    assert await ledger.count("SELECT count(*) FROM postings WHERE ledger = 'allowance'") == 0


async def test_unknown_users_and_channels_read_as_zero_unknown_tokens_are_404(ledger: LedgerClient) -> None:
    assert await ledger.user(12345) == {"user_id": 12345, "available": 0, "held": 0, "used": 0, "request_count": 0}
    assert (await ledger.get("/v1/channels/3")).json() == {"channel_id": 3, "used": 0, "request_count": 0}
    response = await ledger.get("/v1/tokens/3")
    assert (response.status_code, response.json()["code"]) == (404, "token_not_found")


async def test_entries_can_be_read_one_by_one(ledger: LedgerClient) -> None:
    funded = await ledger.fund(1, 500)
    entry = funded["entry"]
    assert funded["user"]["available"] == 500
    response = await ledger.get(f"/v1/entries/{entry['id']}", as_="auditor")
    assert response.status_code == 200
    assert response.json() == entry
    assert entry["kind"] == "topup"
    assert len(bytes.fromhex(entry["hash"])) == 32
    response = await ledger.get("/v1/entries/999999", as_="auditor")
    assert (response.status_code, response.json()["code"]) == (404, "entry_not_found")


async def test_adjustments_move_quota_both_ways(ledger: LedgerClient) -> None:
    await ledger.fund(1, 1000)
    body = {"user_id": 1, "amount": -1500, "reference": unique("adj"), "note": "chargeback"}
    response = await ledger.post("/v1/adjustments", body, as_="admin")
    assert response.status_code == 201, response.text
    assert response.json()["user"]["available"] == -500
    assert response.json()["entry"]["details"]["note"] == "chargeback"
    await ledger.assert_books_balance()
