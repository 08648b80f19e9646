"""Canonical JSON: the byte form that entry hashes and request fingerprints are computed over.

Compact, keys sorted at every level, non-ASCII characters as UTF-8. It is, byte for byte, what
`json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()` gives, which is what
every stored hash and fingerprint was computed with (tests/test_canonical.py holds the two to each other); msgspec
produces it at a fraction of the cost. Documents hold strings, integers, booleans, None, lists and maps only:
floats would be written differently (`1e16`, where json writes `1e+16`).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_sorted = msgspec.json.Encoder(order="sorted")


def canonical_json(document: Any) -> bytes:
    """The canonical form, non-ASCII characters as they are (the entry hashes' form)."""
    return _sorted.encode(document)


def canonical_ascii_json(document: Any) -> bytes:
    """The canonical form with every character outside printable ASCII escaped as `\\uXXXX` (the request
    fingerprints' form: `json.dumps`'s defaults). For plain JSON data, which is what `msgspec.to_builtins` makes of a
    request body, msgspec's output is used whenever it is pure printable ASCII; anything else (non-ASCII, DEL, a
    lone surrogate, a value msgspec cannot encode) goes through `json.dumps(..., default=str)` itself."""
    try:
        encoded = _sorted.encode(document)
    except (TypeError, UnicodeEncodeError):
        encoded = b"\x80"  # handled by json.dumps below
    if encoded.isascii() and b"\x7f" not in encoded:  # nothing json would escape that msgspec does not
        return encoded
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str).encode()
