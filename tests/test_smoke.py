from tests.support import Ledger


async def test_fund_hold_settle(ledger: Ledger) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    held = await ledger.hold(request_id="r1", prompt_tokens=100, max_tokens=200)
    assert held.status_code == 201, held.text
    print(held.json())
    settled = await ledger.post("/v1/holds/r1/settle", {"channel_id": 7, "prompt_tokens": 100, "completion_tokens": 50})
    assert settled.status_code == 200, settled.text
    print(settled.json())
    print(await ledger.user(1))
    detail = await ledger.get("/v1/holds/r1")
    print(detail.json())
    await ledger.assert_books_balance()
