"""Pure helpers of the benchmark: percentiles, ratio rows with targets, the table, the JSON.

Nothing here imports torch, Ray or gRPC, so tests check it on fixed numbers in milliseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Op = Literal["<=", ">="]

PASS = "PASS"
MISS = "MISS"
INFO = "INFO"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def ratio(numerator: float, denominator: float) -> float:
    """numerator ÷ denominator; a zero or negative denominator is a measuring error, not infinity."""
    if denominator <= 0:
        raise ValueError(f"ratio with a non-positive denominator: {numerator} / {denominator}")
    return numerator / denominator


def verdict(value: float, op: Op | None, target: float | None) -> str:
    """PASS when `value op target` holds, MISS when not, INFO for a row without a target."""
    if op is None or target is None:
        return INFO
    if op == "<=":
        return PASS if value <= target else MISS
    if op == ">=":
        return PASS if value >= target else MISS
    raise ValueError(f"unknown comparison {op!r}")


@dataclass(frozen=True)
class Row:
    """One line of the table: ratio = numerator_ms ÷ denominator_ms, checked against a target."""

    name: str
    numerator_label: str
    numerator_ms: float
    denominator_label: str
    denominator_ms: float
    op: Op | None = None
    target: float | None = None
    detail: str = ""
    samples: dict[str, int] = field(default_factory=dict)
    # Why the arms did not do the same work (different outputs, a reload, a queue not at its depth):
    # then the ratio compares nothing and the row is a MISS, whatever its value.
    mismatch: str = ""

    @property
    def ratio(self) -> float:
        return ratio(self.numerator_ms, self.denominator_ms)

    @property
    def status(self) -> str:
        if self.mismatch and self.op is not None:
            return MISS
        return verdict(self.ratio, self.op, self.target)

    @property
    def target_text(self) -> str:
        if self.op is None or self.target is None:
            return "-"
        return f"{'≤' if self.op == '<=' else '≥'} {self.target:g}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ratio=round(self.ratio, 4), status=self.status, target_text=self.target_text)
        return data


def row(
    name: str,
    numerator: tuple[str, float],
    denominator: tuple[str, float],
    op: Op | None = None,
    target: float | None = None,
    detail: str = "",
    samples: dict[str, int] | None = None,
    mismatch: str = "",
) -> Row:
    """Shorthand: `row("P2 churn", ("one LoRA p50", 310.0), ("50 round-robin p50", 320.0), ">=", 0.95)`."""
    return Row(
        name=name,
        numerator_label=numerator[0],
        numerator_ms=numerator[1],
        denominator_label=denominator[0],
        denominator_ms=denominator[1],
        op=op,
        target=target,
        detail=detail,
        samples=dict(samples or {}),
        mismatch=mismatch,
    )


HEADERS = ("row", "numerator", "ms", "÷ denominator", "ms", "ratio", "target", "result", "detail")


def table_cells(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    return [
        (
            r.name,
            r.numerator_label,
            f"{r.numerator_ms:.2f}",
            r.denominator_label,
            f"{r.denominator_ms:.2f}",
            f"{r.ratio:.3f}",
            r.target_text,
            r.status,
            f"NOT THE SAME WORK: {r.mismatch}; {r.detail}" if r.mismatch else r.detail,
        )
        for r in rows
    ]


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table, columns padded to their widest cell; numbers right-aligned."""
    cells = [HEADERS, *table_cells(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    numeric = {2, 4, 5}

    def render(line: tuple[str, ...]) -> str:
        parts = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(line)]
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([render(HEADERS), rule, *(render(line) for line in cells[1:])])


def to_json(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    return json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=2, ensure_ascii=False)


def write_json(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(rows, meta) + "\n", encoding="utf-8")


# Cores (on average over the measured blocks) that other processes, or the hypervisor as steal, may
# take before the table says the machine was shared: kernel threads alone stay near 0.02.
CONTENTION_WARN_CORES = 0.1


def contention_note(other_cores: float, steal_cores: float) -> str:
    """A warning line for the table when the machine was shared while measuring; "" when it was not."""
    if other_cores < CONTENTION_WARN_CORES and steal_cores < CONTENTION_WARN_CORES:
        return ""
    return (
        f"WARNING: other processes used {other_cores:.2f} core(s) on average while the arms ran "
        f"(steal {steal_cores:.2f}): the service arms (replica, Serve proxy, gateway) lose more to that "
        "contention than the single in-process thread, so ratios against in-process references read high; "
        "rerun on an idle machine"
    )


# Two arms that must give the same image (same request and weights; the order of float additions may
# differ) agree within these, in pixel levels of 0-255: mean |Δ| and max |Δ| over every channel.
SAME_IMAGE_MEAN = 0.5
SAME_IMAGE_MAX = 4.0


def same_image(mean_abs: float, max_abs: float, what: str) -> str:
    """"" when two images agree within SAME_IMAGE_MEAN / SAME_IMAGE_MAX, else the reason (for `Row.mismatch`)."""
    if mean_abs <= SAME_IMAGE_MEAN and max_abs <= SAME_IMAGE_MAX:
        return ""
    return f"{what}: mean |Δ| {mean_abs:.2f}, max |Δ| {max_abs:.0f} of 255 (allowed {SAME_IMAGE_MEAN} / {SAME_IMAGE_MAX:g})"


def check(name: str, value: float, target: tuple[Op, float]) -> dict[str, Any]:
    """One verdict of a figure that is not a ratio of two timings (a count, a bound in ms, a difference)."""
    op, bound = target
    return {"name": name, "value": value, "op": op, "target": bound, "status": verdict(value, op, bound)}


def format_checks(checks: Sequence[dict[str, Any]]) -> str:
    """One line per check: name, value, target and PASS / MISS."""
    width = max((len(c["name"]) for c in checks), default=0)
    return "\n".join(
        f"{c['name']:<{width}}  {c['value']:>12.4g}  {'≤' if c['op'] == '<=' else '≥'} {c['target']:g}  {c['status']}"
        for c in checks
    )


def ms(seconds: Sequence[float]) -> list[float]:
    return [s * 1000.0 for s in seconds]
