"""The benchmark's figures: medians (with min and max) over runs, the results that --json writes, the progress
line of each run and the summary printed at the end."""

from __future__ import annotations

import statistics
from typing import Any

from ledger_service.bench.measurement import Measurement
from ledger_service.bench.options import MEASURED


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_runs(runs: dict[str, list[Measurement]], tps: list[float]) -> dict[str, Any]:
    """pgbench's tps, then each measured scenario's figures over the runs, with its ratio to pgbench run by run;
    and how the hot channel compares with the spread one."""
    results: dict[str, Any] = {"pgbench_tps": summarize(tps)}
    for name, measurements in runs.items():
        if not measurements:
            continue
        ratios = [m.ops_per_second / t for m, t in zip(measurements, tps, strict=True)]
        results[name] = {
            "ops_per_second": summarize([m.ops_per_second for m in measurements]),
            "p50_ms": summarize([m.p50_ms for m in measurements]),
            "p99_ms": summarize([m.p99_ms for m in measurements]),
            "ratio_to_pgbench": summarize(ratios),
            "errors": sum(m.errors for m in measurements),
            "cpu_ms_per_op": {
                party: summarize([m.cpu_ms_per_op[party] for m in measurements])
                for party in measurements[0].cpu_ms_per_op
            },
        }
    if runs["hot"] and runs["single"]:
        results["hot_vs_spread"] = summarize(
            [h.ops_per_second / s.ops_per_second for h, s in zip(runs["hot"], runs["single"], strict=True)]
        )
    return results


def run_line(run: int, runs: int, name: str, measured: Measurement) -> str:
    """The progress line of one run of one measured scenario (`run` counts from 0)."""
    return (
        f"run {run + 1}/{runs} {name}: {measured.ops_per_second:.0f} ops/s,"
        f" p50 {measured.p50_ms:.1f} ms, p99 {measured.p99_ms:.1f} ms, errors {measured.errors};"
        " CPU ms per op: " + ", ".join(f"{party} {ms:.2f}" for party, ms in measured.cpu_ms_per_op.items())
    )


def render(results: dict[str, Any]) -> str:
    lines = [f"pgbench TPC-B: {results['pgbench_tps']['median']:.0f} tps (median of {results['options']['runs']})", ""]
    lines.append(f"{'scenario':<10} {'ops/s median (min-max)':<26} {'p50 ms':>8} {'p99 ms':>8} {'x pgbench':>10}")
    for name in MEASURED:
        if name in results:
            row = results[name]
            ops = row["ops_per_second"]
            lines.append(
                f"{name:<10} {ops['median']:>8.0f} ({ops['min']:.0f}-{ops['max']:.0f}){'':<8}"
                f" {row['p50_ms']['median']:>8.1f} {row['p99_ms']['median']:>8.1f}"
                f" {row['ratio_to_pgbench']['median']:>10.2f}"
            )
    for name in MEASURED:
        if name in results:
            cpu = results[name]["cpu_ms_per_op"]
            lines.append(f"{name} CPU ms per op: " + ", ".join(f"{p} {v['median']:.2f}" for p, v in cpu.items()))
    if "hot_vs_spread" in results:
        lines.append(f"\nhot channel / 100 channels: {results['hot_vs_spread']['median']:.2f}")
    if "reads" in results:
        reads = results["reads"]
        lines.append(
            f"balance read: {reads['latency_ms_1k']['median']:.2f} ms (1,000 postings),"
            f" {reads['latency_ms_large']['median']:.2f} ms (large): x{reads['large_over_small']['median']:.2f}"
        )
    books = results["books"]
    lines.append(f"\nbooks: ledgers sum to {books['ledger_totals']}; reconciliation ok: {books['reconciliation_ok']}")
    return "\n".join(lines)


def books_ok(results: dict[str, Any]) -> bool:
    """The workload's books balance and reconcile, and the reads scenario's (if it ran) balance."""
    ok: bool = results["books"]["balanced"] and results["books"]["reconciliation_ok"]
    if "reads" in results:
        ok = ok and results["reads"]["books"]["balanced"]
    return ok
