"""Choosing between JSON and CSV from an Accept header (RFC 9110, section 12.5.1), for the reports that offer both.

Litestar's `Accept.best_match` ranks a more specific range first even at an equal q, and takes `q=0` (meaning
"not acceptable") as a preference; this is the rule docs/api.md states, small enough to read in one go.
"""

from __future__ import annotations

from typing import NamedTuple


class Preference(NamedTuple):
    quality: float
    """The q of the most specific range in the header that covers the type; 0 when none does."""
    position: int
    """Where that range stands in the header: on equal q, the type listed first wins."""


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                return 1.0  # a malformed q is ignored, as if absent
            return quality if 0.0 <= quality <= 1.0 else 1.0  # also ignores nan
    return 1.0


def preference(accept: str, media_type: str) -> Preference:
    """How much the Accept header wants `media_type` (lower case, `type/subtype`)."""
    main = media_type.partition("/")[0]
    best, found = Preference(0.0, len(accept)), -1
    for position, part in enumerate(accept.split(",")):
        media_range, *params = part.split(";")
        media_range = media_range.strip().lower()
        specificity = {media_type: 2, f"{main}/*": 1, "*/*": 0}.get(media_range, -1)
        if specificity > found:
            best, found = Preference(_quality(params), position), specificity
    return best


def wants_csv(accept: str | None) -> bool:
    """CSV when the header prefers text/csv to application/json: a higher q, or the same q and listed first."""
    if not accept:
        return False
    csv, json = preference(accept, "text/csv"), preference(accept, "application/json")
    if csv.quality != json.quality:
        return csv.quality > json.quality
    return csv.quality > 0 and csv.position < json.position
