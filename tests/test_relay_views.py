"""What a relay key may read: a request's entries without the free text admins wrote on them."""

from __future__ import annotations

from typing import Any

from tests.support import LedgerClient, unique

NOTE = "customer 42 disputed this on the phone; refunded after ticket #9913"


async def reversed_settle(ledger: LedgerClient) -> str:
    """A trusted hold (nothing held), settled, and its charge reversed by an admin with a note."""
    await ledger.fund(1, 100_000_000)
    await ledger.token(1, 1)
    rid = unique()
    held = await ledger.hold(request_id=rid, max_tokens=10)
    assert (held.status_code, held.json()["trusted"]) == (201, True), held.text
    settled = await ledger.post(
        f"/v1/holds/{rid}/settle", {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": 1}
    )
    assert settled.status_code == 200, settled.text
    entries = (await ledger.get(f"/v1/holds/{rid}", as_="admin")).json()["entries"]
    settle = next(entry for entry in entries if entry["kind"] == "settle")
    body = {"reference": unique("rev"), "note": NOTE}
    reversal = await ledger.post(f"/v1/entries/{settle['id']}/reverse", body, as_="admin")
    assert reversal.status_code == 201, reversal.text
    return rid


async def reversal_seen_by(ledger: LedgerClient, rid: str, role: str) -> dict[str, Any]:
    response = await ledger.get(f"/v1/holds/{rid}", as_=role)
    assert response.status_code == 200, response.text
    reversal: dict[str, Any] = next(entry for entry in response.json()["entries"] if entry["kind"] == "reversal")
    return reversal


async def test_a_relay_does_not_see_an_admins_reversal_note(ledger: LedgerClient) -> None:
    rid = await reversed_settle(ledger)
    for role in ("admin", "auditor"):
        assert (await reversal_seen_by(ledger, rid, role))["details"]["note"] == NOTE
    as_relay = await reversal_seen_by(ledger, rid, "relay")
    assert "note" not in as_relay["details"]
    assert as_relay["details"]["reverses_kind"] == "settle"  # the rest of the entry is unchanged
    assert NOTE not in (await ledger.get(f"/v1/holds/{rid}", as_="relay")).text
