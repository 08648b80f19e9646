"""The posting rules of every operation, against the contract's table, and the balance invariant of drafts."""

from __future__ import annotations

import pytest

from ledger_service.domain.accounts import SubLedger
from ledger_service.domain.entries import (
    EntryDraft,
    EntryKind,
    Posting,
    UnbalancedEntry,
    allowance_postings,
    direct_charge_postings,
    funding_postings,
    hold_postings,
    release_postings,
    reversal_postings,
    settle_postings,
)

Q, A = SubLedger.QUOTA, SubLedger.ALLOWANCE


def as_set(postings: tuple[Posting, ...]) -> set[tuple[str, str, int]]:
    return {(str(p.ledger), p.account, p.amount) for p in EntryDraft(EntryKind.HOLD, postings).postings}


def test_funding() -> None:
    assert as_set(funding_postings(5, 300)) == {("quota", "system:issuance", -300), ("quota", "user:5", 300)}


def test_allowance_change_posts_the_difference() -> None:
    assert as_set(allowance_postings(9, -40)) == {("allowance", "system:allowance", 40), ("allowance", "token:9", -40)}


def test_hold_of_a_limited_token_moves_quota_and_allowance() -> None:
    postings = hold_postings(request_id="r", user_id=5, token_id=9, amount=100, limited=True)
    assert as_set(postings) == {
        ("quota", "user:5", -100),
        ("quota", "hold:r", 100),
        ("allowance", "token:9", -100),
        ("allowance", "hold:r", 100),
    }
    unlimited = hold_postings(request_id="r", user_id=5, token_id=9, amount=100, limited=False)
    assert as_set(unlimited) == {("quota", "user:5", -100), ("quota", "hold:r", 100)}


def test_settle_with_overage_takes_the_difference_from_the_user() -> None:
    postings = settle_postings(request_id="r", user_id=5, token_id=9, channel_id=3, held=100, charge=130, limited=True)
    assert as_set(postings) == {
        ("quota", "hold:r", -100),
        ("quota", "channel:3", 130),
        ("quota", "user:5", -30),
        ("allowance", "hold:r", -100),
        ("allowance", "system:allowance", 130),
        ("allowance", "token:9", -30),
    }


def test_settle_for_exactly_the_hold_leaves_out_zero_postings() -> None:
    postings = settle_postings(request_id="r", user_id=5, token_id=9, channel_id=3, held=100, charge=100, limited=False)
    assert as_set(postings) == {("quota", "hold:r", -100), ("quota", "channel:3", 100)}


def test_direct_charge_and_release() -> None:
    assert as_set(direct_charge_postings(user_id=5, token_id=9, channel_id=3, charge=7, limited=True)) == {
        ("quota", "user:5", -7),
        ("quota", "channel:3", 7),
        ("allowance", "token:9", -7),
        ("allowance", "system:allowance", 7),
    }
    assert as_set(release_postings(request_id="r", user_id=5, token_id=9, held=100, limited=False)) == {
        ("quota", "hold:r", -100),
        ("quota", "user:5", 100),
    }


def test_reversal_negates_every_posting() -> None:
    original = funding_postings(5, 300)
    assert as_set(reversal_postings(original)) == {("quota", "system:issuance", 300), ("quota", "user:5", -300)}


def test_a_draft_that_does_not_balance_cannot_be_built() -> None:
    with pytest.raises(UnbalancedEntry, match="does not balance"):
        EntryDraft(EntryKind.TOPUP, (Posting(Q, "system:issuance", -1), Posting(Q, "user:1", 2)))
    with pytest.raises(UnbalancedEntry, match="does not balance"):
        # Balanced in total, but across two ledgers: units never mix.
        EntryDraft(EntryKind.TOPUP, (Posting(Q, "user:1", 5), Posting(A, "token:1", -5)))
    with pytest.raises(UnbalancedEntry, match="twice"):
        EntryDraft(EntryKind.TOPUP, (Posting(Q, "user:1", 5), Posting(Q, "user:1", -5)))
    with pytest.raises(UnbalancedEntry, match="twice"):  # not adjacent as given: the check runs on sorted postings
        EntryDraft(EntryKind.TOPUP, (Posting(Q, "user:1", 5), Posting(Q, "user:0", 0 - 10), Posting(Q, "user:1", 5)))
    with pytest.raises(UnbalancedEntry, match="out of range"):
        EntryDraft(EntryKind.TOPUP, (Posting(Q, "user:1", 10**15 + 1), Posting(Q, "system:issuance", -(10**15 + 1))))
    # The same account in both ledgers is two postings, not one posted twice.
    both = EntryDraft(
        EntryKind.HOLD,
        (Posting(Q, "hold:r", 5), Posting(Q, "user:1", -5), Posting(A, "hold:r", 5), Posting(A, "token:1", -5)),
    )
    assert len(both.postings) == 4


def test_content_hash_changes_with_any_posting() -> None:
    a = EntryDraft(EntryKind.TOPUP, funding_postings(5, 300), user_id=5, reference="x")
    b = EntryDraft(EntryKind.TOPUP, funding_postings(5, 301), user_id=5, reference="x")
    same = EntryDraft(EntryKind.TOPUP, tuple(reversed(funding_postings(5, 300))), user_id=5, reference="x")
    assert a.content_hash() != b.content_hash()
    assert a.content_hash() == same.content_hash()
    assert len(a.content_hash()) == 32
