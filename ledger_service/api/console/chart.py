"""The overview's usage chart, laid out on the server: bar geometry for an SVG the template draws (no script)."""

from __future__ import annotations

from dataclasses import dataclass

from ledger_service.services.console import DayUsage

WIDTH = 720
HEIGHT = 200
LEFT = 64
BOTTOM = 28
TOP = 12


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    title: str
    show_label: bool


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    top: int
    baseline: float
    bars: list[Bar]
    ticks: list[tuple[float, str]]
    peak: int


def _nice_max(value: int) -> int:
    if value <= 0:
        return 1
    magnitude = int(10 ** (len(str(value)) - 1))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return int(step * magnitude)
    return int(10 * magnitude)


def usage_chart(days: list[DayUsage]) -> Chart:
    peak = max((day.quota for day in days), default=0)
    top_value = _nice_max(peak)
    plot_height = HEIGHT - TOP - BOTTOM
    plot_width = WIDTH - LEFT - 8
    slot = plot_width / max(len(days), 1)
    baseline = TOP + plot_height
    bars = []
    for n, day in enumerate(days):
        value = max(day.quota, 0)
        height = plot_height * value / top_value
        label = day.day.strftime("%m-%d")
        bars.append(
            Bar(
                x=round(LEFT + n * slot + slot * 0.15, 1),
                y=round(baseline - height, 1),
                width=round(slot * 0.7, 1),
                height=round(height, 1),
                label=label,
                title=f"{day.day:%Y-%m-%d}: {day.quota:,} quota, {day.requests:,} requests",
                show_label=n % 5 == 0 or n == len(days) - 1,
            )
        )
    ticks = [(round(baseline - plot_height * f, 1), f"{int(top_value * f):,}") for f in (0, 0.5, 1)]
    return Chart(WIDTH, HEIGHT, LEFT, TOP, baseline, bars, ticks, peak)
