"""one-api's price arithmetic, checked against hand-computed values (exact decimals, floor and ceiling)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ledger_service.domain.pricing import MAX_AMOUNT, AmountOutOfRange, Prices, check_ratio

GPT_4O = Prices(Decimal("2.5"), Decimal("4"), Decimal("1"))
GPT_4O_MINI = Prices(Decimal("0.075"), Decimal("4"), Decimal("1"))
GPT_35 = Prices(Decimal("0.25"), Decimal("3"), Decimal("1"))
DEEPSEEK_VIP = Prices(Decimal("0.07"), Decimal("2"), Decimal("1.1"))


@pytest.mark.parametrize(
    ("prices", "prompt", "max_tokens", "expected"),
    [
        (GPT_4O, 100, 200, 2000),  # (500 + 100 + 200) x 2.5
        (GPT_4O_MINI, 1000, 0, 112),  # 1500 x 0.075 = 112.5, floored
        (GPT_35, 1, 2, 125),  # 503 x 0.25 = 125.75, floored
        (DEEPSEEK_VIP, 300, 700, 115),  # 1500 x 0.077 = 115.5, floored
        (Prices(Decimal(0), Decimal(1), Decimal(1)), 100, 100, 0),
    ],
)
def test_estimate_floors_the_exact_product(prices: Prices, prompt: int, max_tokens: int, expected: int) -> None:
    assert prices.estimate(pre_consumed=500, prompt_tokens=prompt, max_tokens=max_tokens) == expected


@pytest.mark.parametrize(
    ("prices", "prompt", "completion", "expected"),
    [
        (GPT_4O, 100, 50, 750),  # (100 + 50 x 4) x 2.5
        (GPT_4O_MINI, 10, 1, 2),  # (10 + 4) x 0.075 = 1.05, ceiled
        (GPT_35, 3, 1, 2),  # (3 + 3) x 0.25 = 1.5, ceiled
        (DEEPSEEK_VIP, 1000, 1000, 231),  # 3000 x 0.077 = 231 exactly: no rounding up
        (GPT_4O_MINI, 1, 0, 1),  # 0.075 ceils to 1
    ],
)
def test_charge_ceils_the_exact_product(prices: Prices, prompt: int, completion: int, expected: int) -> None:
    assert prices.charge(prompt_tokens=prompt, completion_tokens=completion) == expected


def test_a_binary_float_would_have_charged_one_more() -> None:
    # 0.07 x 1.1 x 3000 is exactly 231; in binary floats it is 231.00000000000003 and would ceil to 232.
    assert 0.07 * 1.1 * 3000 > 231
    assert DEEPSEEK_VIP.charge(prompt_tokens=1000, completion_tokens=1000) == 231


def test_non_zero_ratio_charges_at_least_one_and_no_tokens_charge_nothing() -> None:
    tiny = Prices(Decimal("0.000001"), Decimal(1), Decimal(1))
    assert tiny.charge(prompt_tokens=1, completion_tokens=0) == 1
    assert tiny.charge(prompt_tokens=0, completion_tokens=0) == 0
    assert GPT_4O.charge(prompt_tokens=0, completion_tokens=0) == 0
    free = Prices(Decimal(0), Decimal(1), Decimal(1))
    assert free.charge(prompt_tokens=100, completion_tokens=100) == 0


def test_per_call_price_ignores_tokens() -> None:
    per_call = Prices(Decimal(30), Decimal(1), Decimal("0.8"), model_price=Decimal("0.04"))
    # floor(0.04 x 500000 x 0.8) = 16000, for the hold and for the charge, whatever the tokens.
    assert per_call.estimate(pre_consumed=500, prompt_tokens=10**6, max_tokens=10**6) == 16000
    assert per_call.charge(prompt_tokens=0, completion_tokens=0) == 16000
    assert per_call.charge(prompt_tokens=123, completion_tokens=456) == 16000


def test_amounts_beyond_the_range_are_refused() -> None:
    expensive = Prices(Decimal(10**6), Decimal(10**6), Decimal(1))
    with pytest.raises(AmountOutOfRange):
        expensive.charge(prompt_tokens=MAX_AMOUNT, completion_tokens=MAX_AMOUNT)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-1", "1E+10", "0.1234567890123456789012345678901", "1E-31"])
def test_unusable_ratios_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="ratio"):
        check_ratio(Decimal(value), "model_ratio")


def test_ratios_keep_the_digits_they_were_written_with() -> None:
    assert str(check_ratio(Decimal("0.0750"), "model_ratio")) == "0.0750"
    assert GPT_4O_MINI.as_details()["model_ratio"] == "0.075"
