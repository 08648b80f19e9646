"""The benchmark's pure helpers (the benchmark itself runs with `make bench`, not in the test suite)."""

from __future__ import annotations

from ledger_service.bench import Tally, measure, profile_breakdown


def test_profile_breakdown_groups_samples_by_the_innermost_library() -> None:
    raw = "\n".join(
        [
            "handle (litestar/routes/http.py:81);execute (sqlalchemy/engine/base.py:1494) 6",
            "handle (litestar/routes/http.py:81);__do_execute (asyncpg/prepared_stmt.py:257) 3",
            "open_hold (ledger_service/services/ledger.py:193) 1",
            "garbage line without a count",
        ]
    )
    assert profile_breakdown(raw) == {"sqlalchemy": 0.6, "asyncpg": 0.3, "ledger_service": 0.1}


def test_measure_counts_only_successes_and_takes_percentiles() -> None:
    tally = Tally()
    for i in range(100):
        tally.record(200 if i < 98 else 503, seconds=(i + 1) / 1000)
    result = measure(tally, seconds=2.0)
    assert (result.ops_per_second, result.errors) == (49.0, 2)
    assert result.p50_ms == 51.0
    assert result.p99_ms == 100.0
