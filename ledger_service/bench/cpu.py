"""Where the CPU time of a measurement goes: per party (the service, PostgreSQL, this process as the load
generator) from Linux's /proc, and, with --profile, inside the service by library, sampled with py-spy."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


def cpu_seconds(service_pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds used so far, per process: the service's process tree, PostgreSQL's processes and this process
    (the load generator), each tagged with its party (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        found[pid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    tagged: dict[int, tuple[str, float]] = {}
    for pid, (name, seconds) in found.items():
        ancestor = pid
        while ancestor > 1 and ancestor != service_pid:
            ancestor = parents.get(ancestor, 1)
        if ancestor == service_pid:
            tagged[pid] = ("service", seconds)
        elif pid == os.getpid():
            tagged[pid] = ("load", seconds)
        elif name.startswith("postgres"):
            tagged[pid] = ("postgres", seconds)
    return tagged


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per party between two readings. A process that ended in between is not counted (its time is
    gone from /proc); PostgreSQL's backends and the service's processes live through a measurement."""
    used = {"service": 0.0, "postgres": 0.0, "load": 0.0}
    for pid, (party, seconds) in after.items():
        earlier = before.get(pid)
        used[party] += seconds - (earlier[1] if earlier is not None and earlier[0] == party else 0.0)
    return used


def cpu_ms_per_op(used: dict[str, float], operations: float, in_process_as: str | None) -> dict[str, float]:
    """CPU milliseconds per operation, by party, from `cpu_used`. `in_process_as`: what this process's time is
    reported as when it drove the scenario without the service (options.IN_PROCESS), None otherwise."""
    cpu = {party: seconds * 1000 / operations for party, seconds in used.items()}
    if in_process_as is not None:  # this process did the work: the service only ran its background jobs
        cpu = {in_process_as: cpu["load"], "postgres": cpu["postgres"], "service": cpu["service"]}
    return cpu


PROFILE_GROUPS = ("sqlalchemy", "asyncpg", "litestar", "uvicorn", "ledger_service", "msgspec", "prometheus_client")


def profile_breakdown(raw: str) -> dict[str, float]:
    """Share of samples by the library of the innermost frame, from py-spy's `raw` (collapsed stacks) output."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        leaf = stack.split(";")[-1]
        group = next((name for name in PROFILE_GROUPS if f"({name}/" in leaf or f"/{name}/" in leaf), "other")
        counts[group] = counts.get(group, 0) + int(number)
    total = sum(counts.values()) or 1
    return {group: round(count / total, 3) for group, count in sorted(counts.items(), key=lambda kv: -kv[1])}


async def sample_service(pid: int, seconds: float, output: str) -> dict[str, float]:
    """Sample the service process with py-spy (a dev dependency) for `seconds`; the raw stacks go to `output`."""
    py_spy = str(Path(sys.executable).parent / "py-spy")
    process = await asyncio.create_subprocess_exec(
        py_spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "200", "-f", "raw", "-o", output,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await process.wait()
    return profile_breakdown(await asyncio.to_thread(Path(output).read_text))
