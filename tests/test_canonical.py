"""The canonical JSON that hashes and fingerprints are computed over is byte for byte json.dumps's output, which is
what every stored entry hash and request fingerprint was computed with: a difference would break the hash chain's
verification and make an idempotent retry look like a conflicting request."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from ledger_service.domain.canonical import canonical_ascii_json, canonical_json
from ledger_service.domain.lifecycle import body_of
from ledger_service.schemas import HoldCommand

TRICKY = ["", "a", "é", "😀", "\x00", "\x1f", "\x7f", "\x80", "\u2028", '"', "\\", "/", "\b\f\n\r\t", "\ud800", "中文"]


def random_text(rng: random.Random) -> str:
    return "".join(
        rng.choice(TRICKY) if rng.random() < 0.3 else chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x110000)]))
        for _ in range(rng.randrange(6))
    )


def random_document(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 4 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.choice([0, -1, 2**63 - 1, -(2**63), 10**15, 2**70, rng.randrange(-(10**18), 10**18)])
    if choice in (3, 4):
        return random_text(rng)
    if choice in (5, 6):
        return [random_document(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_text(rng): random_document(rng, depth + 1) for _ in range(rng.randrange(5))}


def reference(document: Any, **options: Any) -> bytes | type[Exception]:
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"), **options).encode()
    except (UnicodeEncodeError, TypeError) as error:
        return type(error)


def ours(encode: Any, document: Any) -> bytes | type[Exception]:
    try:
        encoded: bytes = encode(document)
    except (UnicodeEncodeError, TypeError) as error:
        return type(error)
    return encoded


@pytest.mark.parametrize("seed", range(4))
def test_entry_hash_form_is_json_dumps_without_ascii_escaping(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2500):
        document = random_document(rng)
        assert ours(canonical_json, document) == reference(document, ensure_ascii=False), document


@pytest.mark.parametrize("seed", range(4))
def test_fingerprint_form_is_json_dumps_with_its_defaults(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2500):
        document = {"op": "hold", "body": random_document(rng)}
        assert ours(canonical_ascii_json, document) == reference(document, default=str), document


@pytest.mark.parametrize("model", ["gpt-4o", "模型-ü", "del\x7f", "😀"])
def test_a_request_body_is_fingerprinted_as_json_dumps_did(model: str) -> None:
    command = HoldCommand(request_id="r-1", user_id=1, token_id=2, model=model, prompt_tokens=3, max_tokens=4)
    document = {"op": "hold", "body": body_of(command)}
    assert canonical_ascii_json(document) == reference(document, default=str)
