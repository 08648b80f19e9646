"""The three rounds, each under load: what strikes the primary, how the drill waits for the cluster to write again,
what it measures, and how the old primary is brought back.

1. `postmaster`: SIGKILL to the primary's postmaster. Patroni still holds the leader key; it restarts PostgreSQL in
   place (crash recovery) and no failover happens.
2. `patroni`: SIGKILL to the primary's Patroni and its postmaster at once. The leader key expires (`ttl`) and
   Patroni promotes the synchronous standby. The old node is started again: Patroni rewinds it (pg_rewind) and it
   follows the new primary.
3. `partition`: the primary's road to etcd is cut (proxy.py) while everything else of it keeps running. Its Patroni
   cannot renew the leader key; after `retry_timeout` it demotes its PostgreSQL, the key expires and the
   synchronous standby is promoted. Writes the isolated primary acknowledged meanwhile were flushed by that standby
   (synchronous_mode_strict), so they must all be on the new primary. The cut is lifted: Patroni rewinds the node
   and it follows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from ledger_service.drill.clients import Records
from ledger_service.drill.patroni import Cluster, Node
from ledger_service.drill.processes import DrillError
from ledger_service.drill.proxy import Proxies


@dataclass(frozen=True)
class Strike:
    name: str
    description: str
    fails_over: bool


STRIKES = (
    Strike("postmaster", "SIGKILL the primary's postmaster", fails_over=False),
    Strike("patroni", "SIGKILL the primary's Patroni and postmaster", fails_over=True),
    Strike("partition", "cut the primary off from etcd", fails_over=True),
)


@dataclass(frozen=True)
class Timing:
    first_failure: float | None
    """Seconds from the strike to the first attempt that failed (None: none did)."""
    first_write: float
    """Seconds from the strike to the first success of an attempt sent once writes had started failing."""
    acknowledged_before_outage: int
    """Writes acknowledged after the strike but before the first failure (the isolated primary's, in round 3)."""


def timing(records: Records, struck: float, *, require_failure: bool = True) -> Timing | None:
    """The round's timing once a write has succeeded after the outage began (None until then). Without
    `require_failure`, a round in which no attempt failed counts from the strike."""
    after = [attempt for attempt in records.attempts if attempt[1] >= struck]
    failures = [ended for _sent, ended, ok in after if not ok]
    first_failure = min(failures) if failures else None
    if first_failure is None and require_failure:
        return None
    since = first_failure if first_failure is not None else struck
    writes = [ended for sent, ended, ok in after if ok and sent >= since]
    if not writes:
        return None
    before = sum(1 for _sent, ended, ok in after if ok and (first_failure is None or ended < first_failure))
    return Timing(
        first_failure=None if first_failure is None else first_failure - struck,
        first_write=min(writes) - struck,
        acknowledged_before_outage=before,
    )


async def wait_first_write(records: Records, struck: float, within: float = 120) -> Timing:
    """Waits for the first write after the outage the strike caused; if no write ever failed, the first write after
    the strike."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = timing(records, struck)
        if found is not None:
            return found
        await asyncio.sleep(0.2)
    found = timing(records, struck, require_failure=False)
    if found is None:
        raise DrillError(f"no successful write within {within:.0f} s of the strike")
    return found


async def accepts_writes(node: Node) -> bool:
    try:
        conn = await asyncpg.connect(node.url("postgres"), timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return not await conn.fetchval("SELECT pg_is_in_recovery()")
    except (OSError, asyncpg.PostgresError):
        return False
    finally:
        await conn.close()


async def wait_demoted(node: Node, struck: float, within: float = 60) -> float:
    """Seconds from the strike until `node` no longer takes writes (stopped, or in recovery)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not await accepts_writes(node):
            return time.monotonic() - struck
        await asyncio.sleep(0.2)
    raise DrillError(f"{node.name} still takes writes {within:.0f} s after it was cut off from etcd")


@dataclass
class Striker:
    """Carries out the strikes on a cluster, and heals them."""

    cluster: Cluster
    proxies: Proxies
    restart: Callable[[Node], None]
    """Starts a node's Patroni again (after the `patroni` strike)."""

    async def strike(self, strike: Strike, primary: Node) -> None:
        if strike.name == "postmaster":
            primary.kill_postmaster()
        elif strike.name == "patroni":
            primary.kill_patroni()
        else:
            self.proxies.set_cut(primary.index, True)

    async def heal(self, strike: Strike, primary: Node) -> None:
        if strike.name == "patroni":
            self.restart(primary)
        elif strike.name == "partition":
            self.proxies.set_cut(primary.index, False)

    async def new_primary(self, strike: Strike, old: Node) -> Node:
        if not strike.fails_over:
            return await self.cluster.wait_leader()
        return await self.cluster.wait_leader(other_than=old.name, avoid=[old])
