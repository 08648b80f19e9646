"""Each round's figures, and the table the drill prints."""

from __future__ import annotations

from dataclasses import dataclass

from ledger_service.drill.checks import JournalCheck
from ledger_service.drill.rounds import Strike, Timing


@dataclass
class RoundFigures:
    number: int
    strike: Strike
    old_primary: str
    new_primary: str = "-"
    timing: Timing | None = None
    demoted: float | None = None
    """Round 3: seconds from the cut until the isolated primary stopped taking writes."""
    writes: int = 0
    """Writes acknowledged during the round."""
    retries: int = 0
    replayed: int = 0
    unexpected: list[str] | None = None
    journal: JournalCheck | None = None
    reconciled: bool | None = None
    rejoined: float | None = None
    """Seconds from healing the old primary until three members run again."""
    rewound: bool = False
    """Patroni ran pg_rewind on the old primary to bring it back."""
    agree: bool | None = None
    entries: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.unexpected
            and self.journal is not None
            and self.journal.ok
            and bool(self.reconciled)
            and bool(self.agree)
        )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("ok" if value else "FAILED")


def render(rounds: list[RoundFigures], total_seconds: float) -> str:
    header = ("round", "strike", "primary", "1st fail s", "1st write s", "demoted s", "acked", "acked alone",
              "retries", "replays", "lost", "doubled", "zero-sum", "reconcile", "rejoin s", "rewound", "agree",
              "entries")  # fmt: skip
    rows = [header]
    for r in rounds:
        journal = r.journal
        rows.append((
            str(r.number), r.strike.name, f"{r.old_primary}->{r.new_primary}",
            _seconds(r.timing.first_failure if r.timing else None),
            _seconds(r.timing.first_write if r.timing else None),
            _seconds(r.demoted), str(r.writes),
            str(r.timing.acknowledged_before_outage) if r.timing else "-",
            str(r.retries), str(r.replayed),
            str(len(journal.lost)) if journal else "-", str(len(journal.doubled)) if journal else "-",
            _yes(all(v == 0 for v in journal.ledgers.values()) if journal else None),
            _yes(r.reconciled), _seconds(r.rejoined), "yes" if r.rewound else "no", _yes(r.agree), str(r.entries),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    for r in rounds:
        if r.error:
            lines.append(f"round {r.number}: {r.error}")
        for problem in (r.unexpected or [])[:10]:
            lines.append(f"round {r.number}: unexpected answer: {problem}")
        if r.journal is not None:
            lines += [f"round {r.number}: LOST {item}" for item in r.journal.lost[:10]]
            lines += [f"round {r.number}: DOUBLED {item}" for item in r.journal.doubled[:10]]
            if not r.journal.retried_ok:
                lines.append(f"round {r.number}: a retried request is not in the journal exactly once")
    passed = sum(r.ok for r in rounds)
    verdict = "PASSED" if passed == len(rounds) == 3 else "FAILED"
    lines.append(f"drill {verdict}: {passed} of 3 rounds passed, in {total_seconds:.0f} s")
    return "\n".join(lines)
