"""Laying out a reconciliation item side by side: one row per measure, ledger | provider | difference."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

ORDER = ("requests", "input_tokens", "output_tokens", "cached_tokens", "quota", "cost_usd")
LEDGER_ALIASES = {"cost_usd": "estimated_cost_usd"}
LABELS = {
    "requests": "Requests",
    "input_tokens": "Input tokens",
    "output_tokens": "Output tokens",
    "cached_tokens": "Cached tokens",
    "quota": "Quota",
    "cost_usd": "Cost (USD; the ledger's is estimated)",
}


@dataclass(frozen=True, slots=True)
class Measure:
    name: str
    label: str
    ledger: Any
    provider: Any
    difference: Any
    differs: bool


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float)


def side_by_side(
    ledger: dict[str, Any] | None, provider: dict[str, Any] | None, difference: dict[str, Any] | None
) -> tuple[list[Measure], dict[str, Any]]:
    """The measures of an item in a fixed order, then any other scalar ones; and its non-scalar extras (reasons,
    the provider's records and api keys)."""
    ledger, provider, difference = ledger or {}, provider or {}, difference or {}
    aliased = set(LEDGER_ALIASES.values())
    names = [n for n in ORDER if n in ledger or n in provider or n in difference or LEDGER_ALIASES.get(n) in ledger]
    for source in (ledger, provider, difference):
        for name, value in source.items():
            if name not in names and name not in aliased and _scalar(value):
                names.append(name)
    measures = []
    for name in names:
        ours = ledger.get(name, ledger.get(LEDGER_ALIASES.get(name, ""), None))
        delta = difference.get(name)
        differs = delta not in (None, 0, "0", "0.000000") and not (isinstance(delta, str) and _zero(delta))
        measures.append(Measure(name, LABELS.get(name, name), ours, provider.get(name), delta, differs))
    extras: dict[str, Any] = {}
    for label, source in (("difference", difference), ("provider", provider), ("ledger", ledger)):
        for name, value in source.items():
            if not _scalar(value) and value:
                extras[f"{name} ({label})" if name in extras else name] = readable(value)
    return measures, extras


def readable(value: Any) -> str:
    """A list or map as a person reads it: reasons one after another, records as `upload 1, line 2`."""
    if isinstance(value, dict):
        return ", ".join(f"{key.replace('_id', '')} {readable(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return "; ".join(readable(item) for item in value)
    return str(value)


def _zero(text: str) -> bool:
    """A decimal string that is zero; amounts are compared as decimals, never as binary floats."""
    try:
        return Decimal(text) == 0
    except ArithmeticError:
        return False
