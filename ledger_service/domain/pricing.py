"""one-api's price arithmetic, in exact decimals.

Ratios are `Decimal`s from the moment they are parsed; every product below is exact (the context has far more
digits than any accepted input can produce), and the only rounding is the floor or ceiling the rules name.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal

QUOTA_PER_USD = 500_000
"""one-api's QuotaPerUnit: 500,000 quota = 1 USD."""

MAX_AMOUNT = 10**15
"""The largest amount, token count or computed charge the ledger accepts (contract section 8)."""

MAX_RATIO = Decimal(10**9)
"""The largest ratio or per-call price accepted; keeps every product far inside a 64-bit amount check."""

MAX_RATIO_DIGITS = 30
"""Significant digits a ratio may have; more could not have been meant."""

DEFAULT_MODEL_RATIO = Decimal(30)
DEFAULT_COMPLETION_RATIO = Decimal(1)
DEFAULT_GROUP_RATIO = Decimal(1)

SEEDED_MODELS: dict[str, tuple[Decimal, Decimal]] = {
    "gpt-4o": (Decimal("2.5"), Decimal("4")),
    "gpt-4o-mini": (Decimal("0.075"), Decimal("4")),
    "gpt-3.5-turbo": (Decimal("0.25"), Decimal("3")),
    "gpt-4": (Decimal("15"), Decimal("2")),
    "claude-3-5-sonnet-20241022": (Decimal("1.5"), Decimal("5")),
    "deepseek-chat": (Decimal("0.07"), Decimal("2")),
}
"""(model_ratio, completion_ratio) seeded by the first migration."""

SEEDED_GROUPS: dict[str, Decimal] = {"default": Decimal(1), "vip": Decimal(1), "svip": Decimal(1)}

_EXACT = decimal.Context(
    prec=120,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[decimal.InvalidOperation, decimal.Overflow, decimal.Inexact, decimal.DivisionByZero],
)
"""Arithmetic that raises rather than round: any inexact product would be a bug, not a rounding choice."""


class AmountOutOfRange(ValueError):
    """A computed estimate or charge exceeds MAX_AMOUNT."""


def check_ratio(value: Decimal, name: str) -> Decimal:
    """Return `value` unchanged if it is a usable ratio (finite, 0..MAX_RATIO, few digits); else ValueError."""
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite number")
    if value < 0 or value > MAX_RATIO:
        raise ValueError(f"{name} must be between 0 and {MAX_RATIO}")
    exponent = value.as_tuple().exponent
    if len(value.as_tuple().digits) > MAX_RATIO_DIGITS or (isinstance(exponent, int) and exponent < -MAX_RATIO_DIGITS):
        raise ValueError(f"{name} may have at most {MAX_RATIO_DIGITS} digits and {MAX_RATIO_DIGITS} decimal places")
    if isinstance(exponent, int) and exponent > MAX_RATIO.adjusted():
        # Only a zero gets here (0e99999999): in range, but its exponent is more than arithmetic or NUMERIC take.
        raise ValueError(f"{name} must not have an exponent above {MAX_RATIO.adjusted()}")
    return value


@dataclass(frozen=True, slots=True)
class Prices:
    """The ratios one request is priced with, captured when its hold (or consumption) is created."""

    model_ratio: Decimal
    completion_ratio: Decimal
    group_ratio: Decimal
    model_price: Decimal | None = None
    """USD per call; when set, tokens do not matter."""

    @property
    def ratio(self) -> Decimal:
        return _EXACT.multiply(self.model_ratio, self.group_ratio)

    def per_call_quota(self) -> int:
        """floor(model_price x 500000 x group_ratio), for models priced per call."""
        assert self.model_price is not None
        value = _EXACT.multiply(_EXACT.multiply(self.model_price, Decimal(QUOTA_PER_USD)), self.group_ratio)
        return _bounded(int(value.to_integral_value(rounding=decimal.ROUND_FLOOR)))

    def estimate(self, *, pre_consumed: int, prompt_tokens: int, max_tokens: int) -> int:
        """The amount a hold reserves: floor((pre_consumed + prompt + max_tokens) x ratio)."""
        if self.model_price is not None:
            return self.per_call_quota()
        tokens = Decimal(pre_consumed + prompt_tokens + max_tokens)
        value = _EXACT.multiply(tokens, self.ratio)
        return _bounded(int(value.to_integral_value(rounding=decimal.ROUND_FLOOR)))

    def charge(self, *, prompt_tokens: int, completion_tokens: int) -> int:
        """What a call costs: ceil((prompt + completion x completion_ratio) x ratio), with one-api's two rules.

        A non-zero ratio never charges less than 1; a call with no tokens at all charges 0.
        """
        if self.model_price is not None:
            return self.per_call_quota()
        weighted = _EXACT.add(
            Decimal(prompt_tokens), _EXACT.multiply(Decimal(completion_tokens), self.completion_ratio)
        )
        ratio = self.ratio
        quota = int(_EXACT.multiply(weighted, ratio).to_integral_value(rounding=decimal.ROUND_CEILING))
        if ratio != 0 and quota <= 0:
            quota = 1
        if prompt_tokens + completion_tokens == 0:
            quota = 0
        return _bounded(quota)

    def as_details(self) -> dict[str, str | None]:
        """The ratios as exact strings, for an entry's details."""
        return {
            "model_ratio": str(self.model_ratio),
            "completion_ratio": str(self.completion_ratio),
            "group_ratio": str(self.group_ratio),
            "model_price": None if self.model_price is None else str(self.model_price),
        }


def _bounded(amount: int) -> int:
    if amount > MAX_AMOUNT:
        raise AmountOutOfRange(f"the computed amount {amount} exceeds {MAX_AMOUNT}")
    return amount
