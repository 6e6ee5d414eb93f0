"""`python -m bench [--quick] [--json PATH]`: the table on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.plan import PHASES, Plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Start the real service with tiny models and measure P1-P4 as ratios, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 1,000 waiting in P4 (~2 min)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table (and raw samples) as JSON")
    parser.add_argument(
        "--replica-cpus",
        type=int,
        default=1,
        metavar="N",
        help="CPUs (= torch threads) of the one worker replica; the in-process references use as many (default 1)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: [part.strip().upper() for part in text.split(",") if part.strip()],
        default=list(PHASES),
        metavar="P1,P4",
        help=f"run only these phases (of {', '.join(PHASES)}); the full table needs all of them",
    )
    parser.add_argument(
        "--p2-rounds",
        type=int,
        metavar="N",
        help="rounds of P2's LoRA guard (default 40, --quick 12); its interval narrows as 1/sqrt(N)",
    )
    parser.add_argument(
        "--p2-family",
        choices=["sd15", "sdxl"],
        help="tiny model family of P2's LoRA guard (default sd15)",
    )
    parser.add_argument("--verbose", action="store_true", help="forward the Ray workers' logs to stderr")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the tiny models and the data dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.only) - set(PHASES))
    if unknown:
        build_parser().error(f"--only: no phase {', '.join(unknown)} (phases: {', '.join(PHASES)})")
    from bench.run import report, run

    plan = Plan.quick_run() if args.quick else Plan.full()
    if args.p2_rounds is not None:
        if args.p2_rounds < 1:
            build_parser().error("--p2-rounds: at least 1")
        plan = dataclasses.replace(plan, p2_rounds=args.p2_rounds)
    if args.p2_family is not None:
        plan = dataclasses.replace(plan, p2_family=args.p2_family)
    # Whatever Ray or diffusers print while it runs goes to stderr; stdout carries only the table.
    with contextlib.redirect_stdout(sys.stderr):
        rows, meta = asyncio.run(
            run(
                plan,
                phases=args.only,
                replica_cpus=args.replica_cpus,
                verbose=args.verbose,
                keep_workdir=args.keep_workdir,
            )
        )
    report(rows, meta, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
