"""The drill from start to end (`ledger-service ha-drill`, `python -m ledger_service.drill`): set up etcd, Patroni
and the service; run the three rounds under load, checking after each; tear everything down whatever happens;
print the table. Exit status: 0 when every round passed, 1 when a check failed, 2 when the drill could not run."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

import asyncpg

from ledger_service.drill.checks import check_journal, nodes_agree, reconcile
from ledger_service.drill.clients import Load, Records
from ledger_service.drill.etcd import EtcdCluster
from ledger_service.drill.options import Options, add_arguments
from ledger_service.drill.packages import ensure_installed
from ledger_service.drill.patroni import Cluster, Node, dcs
from ledger_service.drill.processes import BASE, DrillError, RunAs, exclusive_run, free_ports, fresh_base, sweep
from ledger_service.drill.proxy import CuttableProxy, Proxies
from ledger_service.drill.report import RoundFigures, render
from ledger_service.drill.rounds import STRIKES, Strike, Striker, wait_demoted, wait_first_write
from ledger_service.drill.service import Service

DATABASE = "ledger"


def say(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger-service ha-drill", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    options = Options.from_args(args)
    signal.signal(signal.SIGTERM, _stop)
    try:
        with exclusive_run():
            started = time.monotonic()
            rounds = asyncio.run(drill(options))
            print(render(rounds, time.monotonic() - started))
            return 0 if len(rounds) == len(STRIKES) and all(r.ok for r in rounds) else 1
    except DrillError as error:
        print(f"ledger-service ha-drill: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stopped):
        print("ledger-service ha-drill: stopped; everything it started was ended", file=sys.stderr)
        return 130


async def drill(options: Options) -> list[RoundFigures]:
    run_as = RunAs.choose()
    binaries = ensure_installed()
    base = fresh_base(run_as)
    atexit.register(sweep)  # whatever happens below, even an exit that skips the `finally`
    ports = free_ports(16)
    etcd = EtcdCluster(binaries.etcd, base, ports[0:6], run_as)
    members = etcd.client_ports
    proxies = Proxies([CuttableProxy(ports[6 + i], members[i:] + members[:i]) for i in range(3)])
    cluster = Cluster(base, ports[9:15], ports[6:9])
    admin = secrets.token_urlsafe(24)
    rounds: list[RoundFigures] = []
    passed = False
    try:
        say(f"starting etcd, Patroni and the service in {base} (logs there)")
        etcd.start()
        await etcd.healthy()
        proxies.start()
        settings = dcs(options.ttl, options.loop_wait, options.retry_timeout)
        for node in cluster.nodes:
            node.start(binaries.patroni, binaries.pg_bin, run_as, settings)
        leader, sync = await cluster.wait_healthy(within=180)
        say(f"cluster up: {leader.name} primary, {sync.name} synchronous standby")
        await create_database(leader)
        service = Service(cluster.multi_host_url(DATABASE), ports[15], admin, base / "service")
        try:
            service.start()
            await service.ready()
            await service.fund(options.users)
            say("service up, users funded")
            restart = functools.partial(Node.start, patroni=binaries.patroni, pg_bin=binaries.pg_bin, run_as=run_as,
                                        bootstrap_dcs=settings)  # fmt: skip
            rounds = await run_rounds(options, cluster, proxies, service, restart)
        finally:
            service.stop()
        passed = len(rounds) == len(STRIKES) and all(r.ok for r in rounds)
        return rounds
    finally:
        proxies.stop()
        left = sweep([node.data_dir for node in cluster.nodes], then=etcd.stop)
        if left:
            say(f"ended with SIGKILL at the end: {'; '.join(left)}")
        if passed:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"logs kept in {BASE}")


async def create_database(leader: Node) -> None:
    conn = await asyncpg.connect(leader.url("postgres"), timeout=10)
    try:
        await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()


async def run_rounds(
    options: Options, cluster: Cluster, proxies: Proxies, service: Service, restart: Callable[[Node], None]
) -> list[RoundFigures]:
    records = Records()
    run_id = f"drill{secrets.token_hex(3)}"
    striker = Striker(cluster, proxies, restart)
    rounds: list[RoundFigures] = []
    for number, strike in enumerate(STRIKES, start=1):
        primary, _ = await cluster.wait_healthy()
        figures = RoundFigures(number, strike, primary.name)
        rounds.append(figures)
        try:
            await one_round(options, figures, strike, primary, striker, service, records, run_id)
        except DrillError as error:
            figures.error = str(error)
        say(f"round {number} ({strike.name}): {'passed' if figures.ok else 'FAILED'}")
        if figures.error:
            break  # the cluster is in no known state: the next round would measure nothing
    return rounds


async def one_round(
    options: Options,
    figures: RoundFigures,
    strike: Strike,
    primary: Node,
    striker: Striker,
    service: Service,
    records: Records,
    run_id: str,
) -> None:
    acknowledged, retries, replayed, unexpected = (
        len(records.acknowledged), records.retries, len(records.replayed), len(records.unexpected),
    )  # fmt: skip
    load = Load(service.base_url, service.admin_key, options.clients, options.users, f"{run_id}-r{figures.number}",
                records)  # fmt: skip
    load.start()
    try:
        await asyncio.sleep(options.warmup)
        say(f"round {figures.number}: {strike.description} ({primary.name})")
        struck = time.monotonic()
        await striker.strike(strike, primary)
        demoted = asyncio.create_task(wait_demoted(primary, struck)) if strike.name == "partition" else None
        new = await striker.new_primary(strike, primary)
        figures.new_primary = new.name
        if demoted is not None:
            figures.demoted = await demoted
        figures.timing = await wait_first_write(records, struck)
        say(f"round {figures.number}: first write {figures.timing.first_write:.1f} s after the strike, on {new.name}")
        await asyncio.sleep(options.after)
    finally:
        await load.stop()
    figures.writes = len(records.acknowledged) - acknowledged
    figures.retries = records.retries - retries
    figures.replayed = len(records.replayed) - replayed
    figures.unexpected = records.unexpected[unexpected:]
    figures.journal = await check_journal(new.url(DATABASE), records, run_id)
    figures.reconciled = await reconcile(new.url(DATABASE), str(BASE / "reconcile.log"))
    log = primary.directory / "patroni.log"
    logged = log.stat().st_size
    healing = time.monotonic()
    await striker.heal(strike, primary)
    leader, _ = await striker.cluster.wait_healthy(within=180)
    figures.rejoined = time.monotonic() - healing
    with log.open("rb") as lines:
        lines.seek(logged)
        figures.rewound = b"pg_rewind exit code=0" in lines.read()
    replicas = [node for node in striker.cluster.nodes if node is not leader]
    figures.agree, (figures.entries, _digest) = await nodes_agree(leader, replicas, DATABASE)
