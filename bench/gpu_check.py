"""`python -m bench.gpu_check OUT [--dry-run]`: the one table of scripts/gpu_check.sh, from what its steps left in OUT.

Each step writes its figures where this reads them: the CUDA-marked tests a JUnit XML
(`cuda-tests.xml`), each benchmark a JSON with a "checks" list of `bench.stats.check` dicts (name,
value, op, target, status) computed against bench/targets.py and an "errors" map of sections that
failed. A step that left nothing (it failed to start, or ran out of its share of the 9.5 minutes) is a
row of its own, so a short table cannot pass for a complete one. The exit status is 0 only when
every row passed; in a dry run (no CUDA) the tests' skips and the CPU benchmark's timing targets are
SKIP instead, since they say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.stats import MISS, PASS

SKIP = "SKIP"
MISSING = "MISSING"
TESTS_FILE = "cuda-tests.xml"
# The benchmarks scripts/gpu_check.sh runs, by the JSON each writes.
BENCHMARKS = {"gpu.json": "bench.gpu", "gpu_flux.json": "bench.gpu_flux"}
# Figures shown without a target (the JSON's metrics by name): what the FLUX rows measure of memory.
REPORTED = {"FLUX allocated, loaded", "FLUX peak reserved, switching LoRAs", "FLUX peak allocated, with a LoRA set"}
INFO = "INFO"
# Targets that hold on any device (the same work, counts); the others are GPU timings, memory and
# effects the tiny CPU model is too small to show.
DEVICE_FREE = {"same image mean", "same image max", "lora repeat merges"}


@dataclass(frozen=True)
class Line:
    source: str
    name: str
    value: str
    target: str
    status: str


def test_lines(path: Path, dry_run: bool) -> list[Line]:
    if not path.exists():
        return [Line("pytest -m cuda", "CUDA tests", "-", "ran", MISSING)]
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    reasons = sorted(
        {(skip.get("message") or "").strip() for case in root.iter("testcase") for skip in case.iter("skipped")}
    )
    lines = [
        Line(
            "pytest -m cuda",
            "CUDA tests failed or errored",
            str(count["failures"] + count["errors"]),
            "≤ 0",
            PASS if count["failures"] + count["errors"] == 0 else MISS,
        )
    ]
    skipped_text = f"{count['skipped']} skipped ({'; '.join(reasons)})" if count["skipped"] else "0 skipped"
    ran_all = count["tests"] > 0 and count["skipped"] == 0
    lines.append(
        Line(
            "pytest -m cuda",
            "CUDA tests passed",
            f"{passed} of {count['tests']}, {skipped_text}",
            "all",
            PASS if ran_all else (SKIP if dry_run else MISS),
        )
    )
    return lines


def benchmark_lines(path: Path, source: str, dry_run: bool) -> list[Line]:
    if not path.exists():
        return [Line(source, f"{path.name} written", "-", "yes", MISSING)]
    document = json.loads(path.read_text(encoding="utf-8"))
    lines = []
    for check in document.get("checks", []):
        status = check["status"]
        if dry_run and check.get("target_key") not in DEVICE_FREE:
            status = SKIP
        op = "≤" if check["op"] == "<=" else "≥"
        lines.append(Line(source, check["name"], f"{check['value']:.4g}", f"{op} {check['target']:g}", status))
    for metric in document.get("metrics", []):
        if metric["name"] in REPORTED:
            value = "n/a" if metric["value"] is None else f"{metric['value']:,.0f} {metric['unit']}"
            lines.append(Line(source, metric["name"], value, "reported", INFO))
    errors = sorted(document.get("errors", {}))
    lines.append(
        Line(source, "sections failed", ", ".join(errors) or "none", "none", MISS if errors else PASS)
    )
    return lines


def collect(out: Path, dry_run: bool) -> list[Line]:
    lines = test_lines(out / TESTS_FILE, dry_run)
    for file, source in BENCHMARKS.items():
        lines += benchmark_lines(out / file, source, dry_run)
    return lines


def format_lines(lines: Sequence[Line]) -> str:
    header = Line("source", "check", "value", "target", "result")
    rows = [header, *lines]
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("source", "name", "value", "target", "status")]

    def render(r: Line) -> str:
        cells = (r.source, r.name, r.value, r.target, r.status)
        return " | ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([render(header), "-+-".join("-" * w for w in widths), *(render(r) for r in lines)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder the steps wrote into")
    parser.add_argument("--dry-run", action="store_true", help="no CUDA: GPU-only rows are SKIP, not MISS")
    args = parser.parse_args(argv)
    lines = collect(args.out, args.dry_run)
    print(format_lines(lines))
    counts = {status: sum(line.status == status for line in lines) for status in (PASS, MISS, MISSING, SKIP)}
    print("\n" + ", ".join(f"{n} {status}" for status, n in counts.items()) + ("; dry run, no CUDA" if args.dry_run else ""))
    return 0 if counts[MISS] == counts[MISSING] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
