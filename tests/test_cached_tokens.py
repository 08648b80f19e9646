"""`cached_tokens` on settlements and consumptions: recorded for reconciliation, never priced, and invisible to
requests stored before the field existed (their fingerprints do not change)."""

from __future__ import annotations

import hashlib
import json

from ledger_service.domain.lifecycle import body_of, fingerprint
from ledger_service.domain.operations import ConsumptionCommand, SettleCommand
from tests.support import LedgerClient, unique


def test_a_body_without_cached_tokens_keeps_its_old_fingerprint() -> None:
    """The fingerprint a settlement stored before `cached_tokens` existed is the one computed now."""
    before = json.dumps(
        {"op": "settle", "body": {"channel_id": 3, "prompt_tokens": 10, "completion_tokens": 2, "quota": None}},
        sort_keys=True,
        separators=(",", ":"),
    )
    body = body_of(SettleCommand(channel_id=3, prompt_tokens=10, completion_tokens=2))
    assert fingerprint("settle", body) == hashlib.sha256(before.encode()).digest()
    with_cache = body_of(SettleCommand(channel_id=3, prompt_tokens=10, completion_tokens=2, cached_tokens=4))
    assert fingerprint("settle", with_cache) != fingerprint("settle", body)


async def test_cached_tokens_are_recorded_not_priced(ledger: LedgerClient) -> None:
    await ledger.fund(1, 10_000_000)
    await ledger.token(1, 1)
    request_id = unique()
    assert (await ledger.hold(request_id=request_id)).status_code == 201
    settle = {"channel_id": 3, "prompt_tokens": 1000, "completion_tokens": 100, "cached_tokens": 800}
    settled = await ledger.post(f"/v1/holds/{request_id}/settle", settle)
    assert settled.status_code == 200, settled.text
    plain_id = unique()
    assert (await ledger.hold(request_id=plain_id)).status_code == 201
    plain = await ledger.post(
        f"/v1/holds/{plain_id}/settle", {"channel_id": 3, "prompt_tokens": 1000, "completion_tokens": 100}
    )
    assert settled.json()["charged"] == plain.json()["charged"]

    entries = (await ledger.get(f"/v1/holds/{request_id}")).json()["entries"]
    charge = next(e for e in entries if e["kind"] == "settle")
    assert charge["details"]["cached_tokens"] == 800
    plain_entries = (await ledger.get(f"/v1/holds/{plain_id}")).json()["entries"]
    assert "cached_tokens" not in next(e for e in plain_entries if e["kind"] == "settle")["details"]

    # The same body replays; another cached count is another body.
    replay = await ledger.post(f"/v1/holds/{request_id}/settle", settle)
    assert (replay.status_code, replay.headers.get("Idempotent-Replayed")) == (200, "true")
    other = await ledger.post(f"/v1/holds/{request_id}/settle", {**settle, "cached_tokens": 801})
    assert other.json()["code"] == "hold_already_settled"


async def test_a_consumption_records_cached_tokens_and_its_reversal_negates_them(ledger: LedgerClient) -> None:
    await ledger.token(1, 1)
    body = {
        "request_id": unique(),
        "user_id": 1,
        "token_id": 1,
        "channel_id": 2,
        "model": "gpt-4o",
        "prompt_tokens": 50,
        "completion_tokens": 5,
        "cached_tokens": 20,
    }
    assert (await ledger.post("/v1/consumptions", body)).status_code == 201
    entry = (await ledger.get(f"/v1/holds/{body['request_id']}")).json()["entries"][0]
    assert entry["details"]["cached_tokens"] == 20
    reversal = await ledger.post(f"/v1/entries/{entry['id']}/reverse", {"reference": unique()}, as_="admin")
    assert reversal.status_code == 201, reversal.text
    assert reversal.json()["details"]["cached_tokens"] == -20
    assert ConsumptionCommand.later_optional == ("cached_tokens",)
