"""The drill's options and its command-line arguments (imported by cli.py to build its parser: nothing heavy here;
httpx, which the clients need, is a development dependency)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    clients: int = 4
    users: int = 20
    warmup: float = 5.0
    """Seconds of load before the strike."""
    after: float = 5.0
    """Seconds of load on the new primary after its first write."""
    ttl: int = 10
    loop_wait: int = 2
    retry_timeout: int = 4
    """Patroni's timings (its own defaults are 30, 10 and 10)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(
            clients=args.clients,
            users=args.users,
            ttl=args.ttl,
            loop_wait=args.loop_wait,
            retry_timeout=args.retry_timeout,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=4, help="retrying relay clients (default 4)")
    parser.add_argument("--users", type=int, default=20, help="users the clients hold and settle for (default 20)")
    parser.add_argument("--ttl", type=int, default=10, help="Patroni's ttl: seconds a leader key lives (default 10)")
    parser.add_argument("--loop-wait", type=int, default=2, help="Patroni's loop_wait (default 2)")
    parser.add_argument(
        "--retry-timeout", type=int, default=4, help="Patroni's retry_timeout (default 4; loop_wait + 2x it <= ttl)"
    )
