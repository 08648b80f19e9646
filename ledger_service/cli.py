"""`ledger-service`: serve the API, migrate, create keys, refresh snapshots."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.database import database_url, migrate
from ledger_service.db.snapshots import SnapshotRun
from ledger_service.observability import configure_logging
from ledger_service.schemas import ReconciliationView
from ledger_service.settings import Settings, SettingsError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised the way SIGINT raises KeyboardInterrupt, so that it unwinds through every `finally`.

    At its default action SIGTERM ends the process on the spot, and the embedded server it started is left
    running. uvicorn does shut down gracefully on SIGTERM, but then raises the signal again, for the action the
    process had chosen: with this one, uvicorn.run returns as it does after Ctrl-C, and the server is stopped.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def _run_with_engine(
    url: str, settings: Settings, job: Callable[..., Awaitable[T]], *, command_timeout: float | None = 60
) -> T:
    from ledger_service.db.engine import create_engine

    async def main() -> T:
        engine = create_engine(
            url, pool_size=2, command_timeout=command_timeout, statement_cache=settings.statement_cache
        )
        try:
            return await job(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT. Stopping is how a server's run ends: status 0, even when the signal came
    before it was serving (uvicorn.run itself returns normally after a signal while it serves)."""
    try:
        _serve(args, settings)
    except KeyboardInterrupt:
        log.info("stopped before serving")
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from ledger_service.api.server import ReadTimeoutProtocol

    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    with database_url(settings.database_url, settings.data_dir) as url:
        if settings.auto_migrate:
            migrate(url)
        if not settings.allow_async_replication:  # refused here as one line; each worker checks again (and warns)
            _refuse_asynchronous_cluster(url, settings)
        # Workers (and the app factory in this process) read the URL from the environment.
        os.environ["LEDGER_DATABASE_URL"] = url
        metrics_dir = _shared_metrics_dir(settings.workers)
        try:
            uvicorn.run(
                "ledger_service.api.app:serve_app",
                factory=True,
                host=host,
                port=port,
                workers=settings.workers,
                loop="uvloop",
                # httptools with a deadline for reading each request (api/server.py); the partial is what uvicorn
                # calls with its usual arguments, and pickles for the worker processes.
                http=cast(
                    "type[asyncio.Protocol]",
                    functools.partial(ReadTimeoutProtocol, read_timeout=settings.read_timeout_seconds),
                ),
                timeout_keep_alive=settings.keep_alive_seconds,
                limit_concurrency=settings.max_connections,
                log_level="info",
                log_config=None,  # ours (configure_logging): JSON lines, secrets redacted
                access_log=False,  # ours (api/middleware.py) names the route and the key
            )
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)


def _refuse_asynchronous_cluster(url: str, settings: Settings) -> None:
    """A cluster whose commits are not synchronous: AsynchronousReplication, a SettingsError (services/replicas.py)."""
    from ledger_service.services.replicas import check_replication

    checked = replace(settings, database_url=url)
    _run_with_engine(url, settings, lambda engine: check_replication(engine, checked))


def _shared_metrics_dir(workers: int) -> str | None:
    """With several workers, each keeps its own metrics; prometheus-client's multiprocess mode adds them up, in a
    directory of files every worker writes to. One worker needs none of this."""
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    directory = tempfile.mkdtemp(prefix="ledger-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if settings.pgbouncer == "transaction":
        raise SettingsError(
            "migrations hold a session's advisory lock, which pgbouncer's transaction pooling breaks: run"
            " `ledger-service migrate` with LEDGER_DATABASE_URL pointing at PostgreSQL itself and LEDGER_PGBOUNCER"
            " unset"
        )
    with database_url(settings.database_url, settings.data_dir) as url:
        migrate(url)
    print("migrations applied")
    return 0


def cmd_create_key(args: argparse.Namespace, settings: Settings) -> int:
    from ledger_service.schemas import ApiKeyCommand
    from ledger_service.services.api_keys import ApiKeyService

    command = ApiKeyCommand(name=args.name, role=args.role)
    with database_url(settings.database_url, settings.data_dir) as url:
        if settings.auto_migrate:
            migrate(url)
        created = _run_with_engine(url, settings, lambda engine: ApiKeyService(engine).create(command))
    print(f"created {created.role} key {created.id} ({created.name}); the secret is shown only this once:")
    print(created.key)
    return 0


def cmd_snapshot(args: argparse.Namespace, settings: Settings) -> int:
    from ledger_service.services.audit import AuditService
    from ledger_service.services.housekeeping import refresh_snapshots

    async def run(engine: AsyncEngine) -> tuple[SnapshotRun | None, int]:
        snapshot = await refresh_snapshots(engine, checkpoint_every=settings.snapshot_history_seconds)
        sealed = await AuditService(engine, sweep_interval_seconds=settings.sweep_interval_seconds).seal()
        return snapshot, sealed

    with database_url(settings.database_url, settings.data_dir) as url:
        snapshot, sealed = _run_with_engine(url, settings, run)
    if snapshot is None:
        print("another process is refreshing the snapshots right now; nothing done")
    else:
        print(
            f"snapshots at horizon {snapshot.horizon}: {snapshot.accounts_changed} accounts,"
            f" {snapshot.subjects_changed} usage subjects"
        )
    print(f"sealed {sealed} entries")
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from ledger_service.services.audit import AuditService

    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    async def run(engine: AsyncEngine) -> ReconciliationView:
        audit = AuditService(
            engine,
            sweep_interval_seconds=settings.sweep_interval_seconds,
            snapshot_interval_seconds=settings.snapshot_interval_seconds,
        )
        return await audit.reconcile(progress)

    with database_url(settings.database_url, settings.data_dir) as url:
        # Unbounded statements: on a journal of a million requests, recomputing the snapshots alone runs past the
        # service's 60 s, and an operator who asked for the check wants its answer, not a timeout.
        report = _run_with_engine(url, settings, run, command_timeout=None)
    print(render_reconciliation(report))
    return 0 if report.ok else 1


def render_reconciliation(report: ReconciliationView) -> str:
    """The report as a table an operator can read at a glance, offenders listed under each failed check."""
    width = max(len(check.name) for check in report.checks)
    lines = [f"reconciliation at {report.checked_at.isoformat()}", ""]
    for check in report.checks:
        lines.append(f"  {check.name:<{width}}  {'ok' if check.ok else 'FAILED':<6}  {check.detail}")
        lines.extend(f"  {'':<{width}}          - {offender}" for offender in check.offenders)
    failed = sum(not check.ok for check in report.checks)
    lines += ["", "the books reconcile" if report.ok else f"{failed} of {len(report.checks)} checks FAILED"]
    return "\n".join(lines)


def cmd_import_relay(args: argparse.Namespace, settings: Settings) -> int:
    from ledger_service.commands.import_relay import render, run_import, write_json
    from ledger_service.domain.relay_import import check_source_id
    from ledger_service.relay.source import SourceError

    try:
        if args.source_id is not None:
            check_source_id(args.source_id)
    except ValueError as error:
        print(f"ledger-service import-relay: {error}", file=sys.stderr)
        return 2
    with database_url(settings.database_url, settings.data_dir) as url:

        async def prepare() -> None:
            if settings.auto_migrate:
                await asyncio.to_thread(migrate, url)

        try:
            report = _run_with_engine(
                url,
                settings,
                lambda engine: run_import(
                    engine, settings, args.source, source_id=args.source_id, dry_run=args.dry_run, prepare=prepare
                ),
            )
        except SourceError as error:
            print(f"ledger-service import-relay: {error}", file=sys.stderr)
            return 2
    print(render(report))
    if args.json:
        write_json(report, args.json)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from ledger_service.bench.options import SCENARIOS, Options
    from ledger_service.bench.run import main_bench

    scenarios = tuple((args.scenarios or ",".join(SCENARIOS)).split(","))
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        print(
            f"ledger-service bench: unknown scenarios {', '.join(unknown)}; choose from {','.join(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    options = Options(
        clients=args.clients,
        users=args.users,
        channels=args.channels,
        duration=args.duration,
        runs=args.runs,
        workers=args.workers,
        coalesce_groups=args.coalesce_groups,
        pool_size=args.pool_size,
        read_postings=args.read_postings,
        scenarios=scenarios,
        profile=args.profile,
    )
    return main_bench(options, args.json, lambda message: print(f"  ... {message}", file=sys.stderr, flush=True))


def cmd_ha_drill(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from ledger_service.drill.run import run_from_args
    except ImportError as error:  # httpx, for the relay clients, comes with the development dependencies
        print(f"ledger-service ha-drill: {error}; run it from the project's .venv (make ha-drill)", file=sys.stderr)
        return 2
    return run_from_args(args)


def cmd_compare_relay(args: argparse.Namespace, settings: Settings) -> int:
    """The shadow period's check: the relay's own bills against the ledger's (services/relay_compare.py).
    Exit 0 when everything matches within tolerance, 1 otherwise, 2 (one line) on bad arguments or an unreadable
    source; the ledger database is the one `serve` uses."""
    from sqlalchemy.exc import SQLAlchemyError
    from tqdm import tqdm

    from ledger_service.domain.relay_compare import Tolerances
    from ledger_service.relay.source import SourceError
    from ledger_service.services.relay_compare import CompareOptions, CompareReport, compare_relay, render

    def fail(message: str) -> int:
        print(f"ledger-service compare-relay: {message}", file=sys.stderr)
        return 2

    try:
        since, until = _instant(args.since, "--since"), _instant(args.until, "--until")
    except ValueError as error:
        return fail(str(error))
    if since >= until:
        return fail(f"--since {args.since} is not before --until {args.until}")
    if args.time_tolerance < 0 or args.amount_tolerance < 0 or args.balance_tolerance < 0:
        return fail("tolerances cannot be negative")
    options = CompareOptions(
        since=since,
        until=until,
        tolerances=Tolerances(args.time_tolerance, args.amount_tolerance, args.balance_tolerance),
        csv_path=args.csv,
        json_path=args.json,
    )

    def bar(total: int) -> Any:
        return tqdm(total=total, unit="log", desc="relay logs", file=sys.stderr, dynamic_ncols=True)

    async def run(engine: AsyncEngine) -> CompareReport:
        return await compare_relay(engine, args.source, options, progress=bar)

    try:
        with database_url(settings.database_url, settings.data_dir) as url:
            report = _run_with_engine(url, settings, run, command_timeout=None)
    except SourceError as error:
        return fail(str(error))
    except SQLAlchemyError as error:  # the ledger's database (the relay's errors are SourceErrors)
        reason = " ".join(str(getattr(error, "orig", None) or error).split("[SQL:")[0].split())
        return fail(f"cannot read the ledger database: {reason}")
    except OSError as error:  # --csv/--json not writable, or the ledger's server unreachable
        if error.filename:
            return fail(f"{error.strerror or error}: {error.filename}")
        return fail(f"cannot reach the ledger database: {error}")
    print(render(report))
    return 0 if report.ok else 1


def cmd_external_upload(args: argparse.Namespace, settings: Settings) -> int:
    """Store a provider's usage or cost export with its records (docs/external.md). Exit 0 with a one-line summary
    (also when the same bytes were uploaded before), 2 with one line on stderr when the file cannot be read or is
    malformed; nothing is stored then."""
    from sqlalchemy.exc import SQLAlchemyError

    from ledger_service.commands.external import UploadFailed, read_file, render, run_upload
    from ledger_service.domain.external import Source

    def fail(message: str) -> int:
        print(f"ledger-service external upload: {' '.join(message.split())}", file=sys.stderr)
        return 2

    if args.channel is not None and not 1 <= args.channel <= 2**63 - 1:
        return fail(f"--channel must be a ledger channel id (a positive integer), got {args.channel}")
    try:
        content = read_file(args.file)
        with database_url(settings.database_url, settings.data_dir) as url:  # migrated: `serve` or `migrate`
            outcome = _run_with_engine(
                url,
                settings,
                lambda engine: run_upload(
                    engine, content, source=Source(args.source), filename=args.file.name[-200:], channel_id=args.channel
                ),
            )
    except UploadFailed as error:
        return fail(str(error))
    except SQLAlchemyError as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split("[SQL:")[0].split())
        return fail(f"cannot write to the ledger database: {reason}")
    except OSError as error:
        return fail(f"cannot reach the ledger database: {error}")
    print(render(outcome))
    return 0


def _add_external(commands: Any) -> None:
    from ledger_service.domain.external import Source

    external = commands.add_parser("external", help="provider records for external reconciliation (docs/external.md)")
    actions = external.add_subparsers(dest="action", required=True, parser_class=_OneLineErrors)
    upload = actions.add_parser(
        "upload", help="store a provider's usage or cost export and its records (the same file again: no change)"
    )
    upload.add_argument("file", type=Path, help="the provider's file: JSON, JSON Lines or CSV")
    upload.add_argument("--source", required=True, choices=[source.value for source in Source], help="its shape")
    upload.add_argument(
        "--channel", type=int, help="the ledger channel of records whose api key or project the channel map lacks"
    )
    upload.set_defaults(handler=cmd_external_upload)


def _instant(text: str, name: str) -> datetime:
    """An ISO 8601 instant; one without an offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} {text!r} is not an ISO 8601 time (e.g. 2026-01-31T00:00:00Z)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class _OneLineErrors(argparse.ArgumentParser):
    """Argument errors as one line on stderr, status 2 (argparse would print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _add_compare_relay(commands: Any) -> None:
    compare = commands.add_parser(
        "compare-relay",
        help="compare a relay's own bills (logs, balances) with the ledger's over a window (exit 1 on differences)",
    )
    compare.add_argument("source", help="the relay's database URL: sqlite:///path, mysql://..., postgresql://...")
    compare.add_argument("--since", required=True, help="window start, ISO 8601 (inclusive; UTC without offset)")
    compare.add_argument("--until", required=True, help="window end, ISO 8601 (exclusive)")
    compare.add_argument("--csv", type=Path, help="write every compared log and account to this CSV file")
    compare.add_argument("--json", type=Path, help="write the summary and every difference to this JSON file")
    compare.add_argument(
        "--time-tolerance", type=float, default=60.0, help="seconds a log and a charge may be apart (default 60)"
    )
    compare.add_argument(
        "--amount-tolerance", type=int, default=0, help="quota a pair may differ by and still match (default 0)"
    )
    compare.add_argument("--balance-tolerance", type=int, default=0, help="quota a balance may differ by (default 0)")
    compare.set_defaults(handler=cmd_compare_relay)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="ledger-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrors)

    serve = commands.add_parser("serve", help="run the HTTP API (starts the embedded PostgreSQL if no URL is set)")
    serve.add_argument("--host", help="listen address (LEDGER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (LEDGER_PORT, default 8080)")
    serve.set_defaults(handler=cmd_serve)

    commands.add_parser("migrate", help="apply pending database migrations").set_defaults(handler=cmd_migrate)

    key = commands.add_parser("create-key", help="create an API key and print its secret once")
    key.add_argument("--role", required=True, choices=["admin", "relay", "auditor"])
    key.add_argument("--name", required=True)
    key.set_defaults(handler=cmd_create_key)

    commands.add_parser("snapshot", help="materialize balance snapshots now").set_defaults(handler=cmd_snapshot)
    commands.add_parser(
        "reconcile", help="recompute the books and check everything derived from them (exit 1 on any failure)"
    ).set_defaults(handler=cmd_reconcile)
    relay_import = commands.add_parser(
        "import-relay", help="bring a one-api or new-api database's balances, tokens and prices into the ledger"
    )
    relay_import.add_argument("source", help="the relay's database URL: sqlite:///path, mysql://..., postgresql://...")
    relay_import.add_argument("--dry-run", action="store_true", help="print the plan and post nothing")
    relay_import.add_argument(
        "--source-id", help="the name entry references give this relay (default: its kind and a hash of the URL)"
    )
    relay_import.add_argument("--json", type=Path, help="also write every item of the run to this JSON file")
    relay_import.set_defaults(handler=cmd_import_relay)
    bench = commands.add_parser(
        "bench", help="the relay workload against the service, side by side with pgbench TPC-B on the same server"
    )
    bench.add_argument("--clients", type=int, default=16, help="concurrent relay clients (default 16)")
    bench.add_argument("--users", type=int, default=100, help="users (and as many tokens) in the workload")
    bench.add_argument("--channels", type=int, default=100, help="channels settlements are spread over")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per scenario and per pgbench run")
    bench.add_argument("--runs", type=int, default=3, help="runs per scenario; medians are reported")
    bench.add_argument("--workers", type=int, default=1, help="service worker processes")
    bench.add_argument(
        "--coalesce-groups", type=int, help="LEDGER_COALESCE_GROUPS of the service (0: no coalescing; default: its own)"
    )
    bench.add_argument(
        "--pool-size", type=int, help="LEDGER_POOL_SIZE of the service (each worker's two pools; default: its own)"
    )
    bench.add_argument("--read-postings", type=int, default=1_000_000, help="postings of the large account")
    bench.add_argument("--scenarios", help="comma-separated subset to run (default: every scenario)")
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.add_argument(
        "--profile",
        help="sample the service with py-spy during the first run of the first scenario; raw stacks to this file",
    )
    bench.set_defaults(handler=cmd_bench)
    _add_compare_relay(commands)
    _add_external(commands)
    from ledger_service.drill.options import add_arguments as add_drill_arguments

    drill = commands.add_parser(
        "ha-drill", help="the failover drill: etcd, a 3-node Patroni cluster and the service on loopback, three rounds"
    )
    add_drill_arguments(drill)
    drill.set_defaults(handler=cmd_ha_drill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _raise_stopped)
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_format)
        return handler(args, replace(settings))
    except SettingsError as error:  # from the environment, or found when used (LEDGER_DATA_DIR)
        print(f"ledger-service: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        # A command stopped before it was done, with the embedded server stopped on the way out: the shell's
        # status for death by that signal, 128 + its number.
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        print(f"ledger-service: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
