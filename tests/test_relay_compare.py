"""`compare-relay` end to end: shadow traffic posted to the ledger over HTTP and written to a real relay database.

For every dialect x kind: a clean shadow period compares clean (exit 0); one planted difference of each kind
(an amount, a log only in the relay, a charge only in the ledger, a user's and a token's balance) is found exactly
once and nothing else is (exit 1); logs at the window's edges are not reported missing; the relay database is
never changed. The CLI's exit codes and one-line errors are checked on a real process.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service import cli
from ledger_service.db.engine import create_engine
from ledger_service.domain.relay_compare import Tolerances
from ledger_service.domain.relays import LOG_CONSUME, RelayKind, RelayLog, RelayToken, RelayUser
from ledger_service.services.relay_compare import CompareOptions, CompareReport, compare_relay
from ledger_service.settings import Settings
from tests.relay_support import MakeRelayDb, RelayDb, free_port
from tests.support import ADMIN_SECRET, LedgerClient, unique

pytest_plugins = ("tests.relay_fixtures",)


@dataclass(frozen=True)
class Call:
    user: int
    token: int
    channel: int
    model: str
    prompt: int
    completion: int
    quota: int


CALLS = [
    Call(1, 1, 1, "gpt-4", 1000, 200, 33_000),
    Call(1, 2, 2, "gpt-3.5-turbo", 150, 5, 120),
    Call(2, 3, 1, "gpt-4(1)", 1000, 0, 12_345),
    Call(1, 1, 1, "gemini-1.5-flash", 0, 0, 0),  # a free call
    Call(2, 3, 2, "claude-3-haiku(14)", 300, 40, 900),
    Call(1, 2, 1, "gpt-4", 1000, 200, 33_000),  # the same usage as the first, on another token
]
FUNDS = {1: 1_000_000, 2: 500_000}
ALLOWANCES: dict[int, tuple[int, int | None]] = {1: (1, 200_000), 2: (1, None), 3: (2, 50_000)}
"""token -> (user, allowance; None: unlimited)."""


@dataclass
class Shadow:
    """What the shadow period left on both sides."""

    relay: RelayDb
    ledger: LedgerClient
    logs: list[RelayLog] = field(default_factory=list)
    quota: dict[int, int] = field(default_factory=dict)
    remaining: dict[int, int] = field(default_factory=dict)
    next_log: int = 1

    async def call(self, call: Call, *, relay_quota: int | None = None, to_ledger: bool = True) -> str:
        """One relayed call: the ledger's consumption (as the shadowing relay posts it) and the relay's own log."""
        request_id = unique("shadow")
        if to_ledger:
            body = {
                "request_id": request_id,
                "user_id": call.user,
                "token_id": call.token,
                "channel_id": call.channel,
                "model": call.model,
                "prompt_tokens": call.prompt,
                "completion_tokens": call.completion,
                "quota": call.quota,
            }
            response = await self.ledger.post("/v1/consumptions", body)
            assert response.status_code == 201, response.text
        new = self.relay.is_new_api
        log = RelayLog(
            id=self.next_log,
            type=LOG_CONSUME,
            created_at=int(time.time()),
            user_id=call.user,
            token_id=call.token if new else None,
            token_name=f"token-{call.token}",
            channel_id=call.channel,
            model_name=call.model,
            quota=call.quota if relay_quota is None else relay_quota,
            prompt_tokens=call.prompt,
            completion_tokens=call.completion,
            request_id=None if new else request_id,
        )
        self.next_log += 1
        self.logs.append(log)
        await self.relay.add_logs([log])
        # The relay bills itself by its own log; the ledger by what was posted.
        self.quota[call.user] -= log.quota
        if self.remaining.get(call.token) is not None:
            self.remaining[call.token] -= log.quota
        return request_id

    async def write_balances(self) -> None:
        users = [RelayUser(u, q) for u, q in self.quota.items()]
        tokens = [
            RelayToken(t, user, self.remaining.get(t, 0), allowance is None, 1)
            for t, (user, allowance) in ALLOWANCES.items()
        ]
        if self.relay.is_new_api:  # soft-deleted rows the ledger never heard of: not compared
            users.append(RelayUser(9, 4_444, deleted=True))
            tokens.append(RelayToken(9, 9, 77, False, 1, deleted=True))
        await self.relay.add_users(users)
        await self.relay.add_tokens(tokens)


async def shadow_period(relay: RelayDb, ledger: LedgerClient) -> Shadow:
    shadow = Shadow(relay, ledger)
    for user, amount in FUNDS.items():
        await ledger.fund(user, amount)
        shadow.quota[user] = amount
    for token, (user, allowance) in ALLOWANCES.items():
        await ledger.token(token, user, allowance)
        if allowance is not None:
            shadow.remaining[token] = allowance
    for call in CALLS:
        await shadow.call(call)
    return shadow


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    created = create_engine(database_url, pool_size=2)
    try:
        yield created
    finally:
        await created.dispose()


def window(hours: float = 1) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=hours), now + timedelta(hours=hours)


async def compare(engine: AsyncEngine, relay: RelayDb, since: datetime, until: datetime, **kw: Any) -> CompareReport:
    return await compare_relay(engine, relay.url, CompareOptions(since=since, until=until, **kw))


def differences(report: CompareReport) -> list[tuple[str, str, Any]]:
    """(record, outcome, what) of every reported difference."""
    out = []
    for row in report.shown:
        what = row["request_id"] or row["model"] if row["record"] == "log" else row["user_id"] or row["token_id"]
        out.append((row["record"], row["outcome"], what))
    return out


async def test_a_clean_shadow_period_matches(relay_db: RelayDb, ledger: LedgerClient, engine: AsyncEngine) -> None:
    shadow = await shadow_period(relay_db, ledger)
    await shadow.write_balances()
    before = await relay_db.checksum()

    report = await compare(engine, relay_db, *window())

    assert report.tally.as_dict() == {
        "logs": {"matched": len(CALLS), "amount_differs": 0, "only_in_relay": 0, "only_in_ledger": 0},
        "users": {"compared": 2, "drifted": 0},
        "tokens": {"compared": 3, "drifted": 0},
        "differences": 0,
        "ok": True,
    }
    assert report.shown == []
    assert report.source.kind is relay_db.kind
    assert await relay_db.checksum() == before


async def test_each_planted_difference_is_found_once(
    relay_db: RelayDb, ledger: LedgerClient, engine: AsyncEngine, tmp_path: Path
) -> None:
    shadow = await shadow_period(relay_db, ledger)
    differs = await shadow.call(Call(1, 1, 2, "gpt-4o", 10, 10, 500), relay_quota=507)
    shadow.quota[1] += 7  # keep the balances equal: only the log is to differ
    shadow.remaining[1] += 7
    await shadow.call(Call(2, 3, 2, "only-in-relay", 10, 10, 60), to_ledger=False)
    only_in_ledger = unique("ledger-only")
    consumption = {"request_id": only_in_ledger, "user_id": 1, "token_id": 2, "channel_id": 1,
                   "model": "only-in-ledger", "prompt_tokens": 1, "completion_tokens": 1, "quota": 70}  # fmt: skip
    assert (await ledger.post("/v1/consumptions", consumption)).status_code == 201
    shadow.quota[1] -= 70  # the relay's balance agrees: only the log is missing
    shadow.quota[2] += 60  # the relay-only call never reached the ledger's balances either
    shadow.remaining[3] += 60
    shadow.quota[2] += 1  # a user's balance drifts by one
    shadow.remaining[1] -= 1000  # and a token's by a thousand
    await shadow.write_balances()
    before = await relay_db.checksum()

    csv_path, json_path = tmp_path / "compare.csv", tmp_path / "compare.json"
    report = await compare(engine, relay_db, *window(), csv_path=csv_path, json_path=json_path)

    assert report.tally.logs == {"matched": len(CALLS), "amount_differs": 1, "only_in_relay": 1, "only_in_ledger": 1}
    assert (report.tally.users_drifted, report.tally.tokens_drifted) == (1, 1)
    found = differences(report)
    relay_only = "only-in-relay" if relay_db.is_new_api else shadow.logs[-1].request_id
    assert sorted(found, key=str) == sorted(
        [
            ("log", "amount_differs", differs),
            ("log", "only_in_relay", relay_only),
            ("log", "only_in_ledger", only_in_ledger),
            ("user", "drift", 2),
            ("token", "drift", 1),
        ],
        key=str,
    )
    amount_row = next(row for row in report.shown if row["outcome"] == "amount_differs")
    assert (amount_row["relay_quota"], amount_row["ledger_quota"], amount_row["difference"]) == (507, 500, -7)
    assert await relay_db.checksum() == before

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r["record"] == "log"]) == len(CALLS) + 3
    assert len([r for r in rows if r["record"] in ("user", "token")]) == 2 + 3
    assert {r["outcome"] for r in rows} == {
        "matched",
        "amount_differs",
        "only_in_relay",
        "only_in_ledger",
        "ok",
        "drift",
    }
    document = json.loads(json_path.read_text())
    assert len(document["differences"]) == 5
    assert document["summary"]["differences"] == 5
    assert document["summary"]["ok"] is False


async def test_logs_at_the_window_edges_are_not_reported_missing(
    relay_db: RelayDb, ledger: LedgerClient, engine: AsyncEngine, tmp_path: Path
) -> None:
    shadow = await shadow_period(relay_db, ledger)
    await shadow.write_balances()

    async def edge_call(request_id: str, model: str) -> float:
        body = {"request_id": request_id, "user_id": 1, "token_id": 2, "channel_id": 1, "model": model,
                "prompt_tokens": 1, "completion_tokens": 1, "quota": 1000}  # fmt: skip
        assert (await ledger.post("/v1/consumptions", body)).status_code == 201
        at = await ledger.conn.fetchval("SELECT created_at FROM entries WHERE request_id = $1", request_id)
        return float(at.timestamp())

    def edge_log(id_: int, at: int, request_id: str, model: str) -> RelayLog:
        new = relay_db.is_new_api
        token, rid = (2, None) if new else (None, request_id)
        return RelayLog(id_, LOG_CONSUME, at, 1, token, "token-2", 1, model, 1000, 1, 1, rid)

    # A log inside [since, ...) whose charge was booked just before `since`: matched, not only_in_relay.
    charged_a = await edge_call("edge-a", "edge-model-a")
    since = math.floor(charged_a) + 1
    await relay_db.add_logs([edge_log(100, since, "edge-a", "edge-model-a")])
    start = datetime.fromtimestamp(since, UTC)
    report = await compare(engine, relay_db, start, start + timedelta(hours=1))
    assert report.tally.logs == {"matched": 1, "amount_differs": 0, "only_in_relay": 0, "only_in_ledger": 0}

    # A log inside [..., until) whose charge was booked at or after `until`: matched, not only_in_relay.
    charged_b = await edge_call("edge-b", "edge-model-b")
    until = math.floor(charged_b)
    await relay_db.add_logs([edge_log(101, until - 1, "edge-b", "edge-model-b")])
    end = datetime.fromtimestamp(until, UTC)
    csv_path = tmp_path / "edge.csv"
    report = await compare(engine, relay_db, end - timedelta(hours=1), end, csv_path=csv_path)
    assert report.tally.logs["only_in_relay"] == report.tally.logs["only_in_ledger"] == 0
    assert report.tally.logs["amount_differs"] == 0
    with csv_path.open(newline="") as f:
        edge = [row for row in csv.DictReader(f) if row["request_id"] == "edge-b"]
    assert [(row["outcome"], row["relay_log_id"]) for row in edge] == [("matched", "101")]


# The command --------------------------------------------------------------------------------------------------------


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEDGER_DATABASE_URL": database_url, "LEDGER_ADMIN_KEY": ADMIN_SECRET}
    return subprocess.run(
        [sys.executable, "-m", "ledger_service", "compare-relay", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_the_command_exits_0_on_a_match_and_1_on_differences(
    sqlite_relay_db: RelayDb, ledger: LedgerClient, database_url: str, tmp_path: Path
) -> None:
    shadow = await shadow_period(sqlite_relay_db, ledger)
    await shadow.write_balances()
    since, until = (moment.isoformat().replace("+00:00", "Z") for moment in window())
    done = await asyncio.to_thread(run_cli, database_url, sqlite_relay_db.url, "--since", since, "--until", until)
    assert done.returncode == 0, done.stderr
    assert "everything matches" in done.stdout
    assert f"matched         {len(CALLS):>10}" in done.stdout

    await sqlite_relay_db.set_user_quota(1, 5)
    await shadow.call(Call(1, 1, 1, "relay-only", 1, 1, 1), to_ledger=False)
    csv_path = tmp_path / "out.csv"
    args = [sqlite_relay_db.url, "--since", since, "--until", until, "--csv", str(csv_path), "--balance-tolerance", "3"]
    done = await asyncio.to_thread(run_cli, database_url, *args)
    assert done.returncode == 1, done.stderr
    assert "only_in_relay" in done.stdout
    assert "drift           user 1" in done.stdout
    assert "2 differences" in done.stdout
    assert csv_path.read_text().startswith("record,outcome,time,")


def test_many_differences_are_capped_on_the_screen() -> None:
    from ledger_service.domain.relay_compare import Tally
    from ledger_service.domain.relays import RelayKind
    from ledger_service.relay.source import SourceInfo
    from ledger_service.services.relay_compare import render

    since, until = window()
    info = SourceInfo(RelayKind.ONE_API, "sqlite", "sqlite:////x.db", "one-api-0123456789")
    report = CompareReport(info, since, until, Tolerances(), Tally.empty())
    report.shown = [
        {"record": "user", "outcome": "drift", "user_id": i, "token_id": "", "reason": "r"} for i in range(20)
    ]
    report.hidden = 7
    text = render(report)
    assert "... 7 more, see --csv" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday", "--until", "2026-01-02T00:00:00Z"], "--since 'yesterday' is not an ISO 8601 time"),
        (["--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"], "is not before --until"),
        (["--since", "2026-01-01T00:00:00Z"], "the following arguments are required: --until"),
        (["--since", "2026-01-01", "--until", "2026-01-02", "--time-tolerance", "-1"], "cannot be negative"),
    ],
)
async def test_bad_arguments_exit_2_with_one_line(
    args: list[str], message: str, database_url: str, tmp_path: Path
) -> None:
    done = await asyncio.to_thread(run_cli, database_url, f"sqlite:///{tmp_path}/relay.db", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert message in done.stderr


async def test_an_unreadable_source_exits_2_with_one_line(database_url: str, tmp_path: Path) -> None:
    times = ["--since", "2026-01-01T00:00:00Z", "--until", "2026-01-02T00:00:00Z"]
    cases = [
        (f"sqlite:///{tmp_path}/missing.db", "does not exist"),
        ("mysql://relay:Sup3r-Secret@127.0.0.1:1/relay", "cannot open relay database mysql://relay:***@127.0.0.1:1"),
        ("ftp://example.com/relay", "unsupported relay database URL scheme 'ftp'"),
    ]
    for url, message in cases:
        done = await asyncio.to_thread(run_cli, database_url, url, *times)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert message in done.stderr
        assert "Sup3r-Secret" not in done.stderr
        assert "Traceback" not in done.stderr


def test_the_parser_knows_the_command() -> None:
    args = cli.build_parser().parse_args(["compare-relay", "sqlite:///r.db", "--since", "a", "--until", "b"])
    assert args.handler is cli.cmd_compare_relay
    assert (args.time_tolerance, args.amount_tolerance, args.balance_tolerance) == (60.0, 0, 0)
    assert isinstance(Settings(), Settings)


async def test_an_unwritable_output_or_unreachable_ledger_exits_2_with_one_line(
    make_relay_db: MakeRelayDb, database_url: str, tmp_path: Path
) -> None:
    relay = await make_relay_db(RelayKind.ONE_API, "sqlite")
    times = ["--since", "2026-01-01T00:00:00Z", "--until", "2026-01-02T00:00:00Z"]
    done = await asyncio.to_thread(run_cli, database_url, relay.url, *times, "--csv", f"{tmp_path}/no/dir/out.csv")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "No such file or directory" in done.stderr

    closed = f"postgresql://ledger@127.0.0.1:{free_port()}/ledger"
    done = await asyncio.to_thread(run_cli, closed, relay.url, *times)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "ledger database" in done.stderr
