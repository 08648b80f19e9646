"""What a benchmark run is asked to do: the scenarios, in the order they run, and the options of `ledger-service
bench` (cli.py parses the command line into Options)."""

from __future__ import annotations

from dataclasses import dataclass

MEASURED = ("single", "batch", "hot", "direct", "bare", "schema")
"""The scenarios measured against pgbench, in the order they run; `reads` runs last, on a database of its own."""
SCENARIOS = (*MEASURED, "reads")
IN_PROCESS = {"direct": "planner", "bare": "client", "schema": "client"}
"""The scenarios this process drives without the service, with what its CPU time is reported as."""


@dataclass(frozen=True)
class Options:
    clients: int = 16
    users: int = 100
    channels: int = 100
    duration: float = 10.0
    runs: int = 3
    workers: int = 1
    coalesce_groups: int | None = None
    """LEDGER_COALESCE_GROUPS of the service under test; None: the service's default."""
    pool_size: int | None = None
    """LEDGER_POOL_SIZE of the service under test (each worker's two pools); None: the service's default."""
    read_postings: int = 1_000_000
    scenarios: tuple[str, ...] = SCENARIOS
    profile: str | None = None
    """Write py-spy's raw stacks of the service, sampled during the first run of the first scenario, to this file."""
