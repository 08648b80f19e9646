"""What one measurement counted: the clients' tally of operations, errors and latencies (Tally), and the figures
made of it (Measurement: operations per second, p50/p99, errors, CPU per operation)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    """What the clients of one measurement did."""

    operations: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def record(self, status: int, seconds: float, operations: int = 1) -> None:
        self.operations += operations if status < 300 else 0
        self.errors += 0 if status < 300 else 1
        self.latencies.append(seconds)
        self.statuses[status] = self.statuses.get(status, 0) + 1


@dataclass(frozen=True)
class Measurement:
    ops_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_op: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per operation, by party: the service, PostgreSQL, the load generator (this process)."""


def measure(tally: Tally, seconds: float) -> Measurement:
    ordered = sorted(tally.latencies) or [0.0]
    return Measurement(
        ops_per_second=tally.operations / seconds,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        errors=tally.errors,
    )
