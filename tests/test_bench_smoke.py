"""The benchmark's pure helpers on fixed numbers (not timed; the service is not started here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench/` sits beside the packages

from bench import stats
from bench.plan import Plan
from bench.stats import MISS, PASS, row


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 5.0
    assert stats.median(values) == 3.0
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert stats.percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)
    assert stats.percentile(list(map(float, range(1, 101))), 99) == pytest.approx(99.01)
    assert stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="percentile of no values"):
        stats.percentile([], 50)
    with pytest.raises(ValueError, match="q must be within 0..100, got 101"):
        stats.percentile([1.0], 101)


def test_ratio_is_numerator_over_denominator() -> None:
    assert stats.ratio(103.0, 100.0) == pytest.approx(1.03)
    with pytest.raises(ValueError, match="ratio with a non-positive denominator: 1.0 / 0.0"):
        stats.ratio(1.0, 0.0)


def test_upper_bound_targets() -> None:
    # P1: service ÷ in-process must stay at or below 1.03.
    at_target = row("P1", ("service", 103.0), ("plain", 100.0), "<=", 1.03)
    assert at_target.ratio == pytest.approx(1.03) and at_target.status == PASS
    assert row("P1", ("service", 104.0), ("plain", 100.0), "<=", 1.03).status == MISS
    # P2 LoRA tax: 1.16-1.40 is what a plain unfused set_adapters approach gives: a MISS against 1.10.
    assert row("tax", ("rr", 116.0), ("none", 100.0), "<=", 1.10).status == MISS
    assert row("tax", ("rr", 109.0), ("none", 100.0), "<=", 1.10).status == PASS
    # P4: p99 at 10,000 waiting ÷ p99 at 10 waiting.
    assert row("P4", ("@10000", 3.0), ("@10", 2.0), "<=", 1.5).status == PASS
    assert row("P4", ("@10000", 3.1), ("@10", 2.0), "<=", 1.5).status == MISS


def test_lower_bound_targets_are_fast_over_slow() -> None:
    """Churn rows put the steady case on top: one LoRA (or one model) ÷ round-robin (or alternating)."""
    churn_free = row("churn", ("one", 300.0), ("round-robin", 310.0), ">=", 0.95)
    assert churn_free.ratio == pytest.approx(0.9677, abs=1e-4) and churn_free.status == PASS
    costly = row("churn", ("one", 300.0), ("round-robin", 330.0), ">=", 0.95)
    assert costly.status == MISS
    # Switching that is faster than the steady case is not penalised.
    assert row("churn", ("one", 300.0), ("round-robin", 290.0), ">=", 0.95).status == PASS


def test_rows_without_a_target_are_info() -> None:
    naive = row("naive", ("naive", 220.0), ("plain", 100.0))
    assert naive.status == stats.INFO and naive.target_text == "-"
    assert naive.ratio == pytest.approx(2.2)
    with pytest.raises(ValueError, match="unknown comparison '=='"):
        stats.verdict(1.0, "==", 1.0)  # type: ignore[arg-type]


def test_table_has_one_line_per_row_with_ratio_target_and_result() -> None:
    rows = [
        row("P1 serving overhead p50", ("Subscribe p50", 1040.0), ("in-process p50", 1000.0), "<=", 1.03),
        row("P2 LoRA churn", ("one p50", 300.0), ("rr p50", 310.0), ">=", 0.95, detail="d"),
        row("P2 naive (info)", ("naive p50", 650.0), ("plain p50", 300.0)),
    ]
    lines = stats.format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("row") and "ratio" in lines[0] and "result" in lines[0]
    assert set(lines[1]) <= {"-", "+"}
    assert "1040.00" in lines[2] and "1.040" in lines[2] and "≤ 1.03" in lines[2] and "MISS" in lines[2]
    assert "0.968" in lines[3] and "≥ 0.95" in lines[3] and "PASS" in lines[3]
    assert "2.167" in lines[4] and "INFO" in lines[4]
    # Columns line up: every separator sits at the same place on every line.
    bars = {tuple(i for i, ch in enumerate(line) if ch in "|+") for line in lines[:4]}
    assert len(bars) == 1


def test_json_round_trip(tmp_path: Path) -> None:
    rows = [row("P4 Submit p99", ("@10000", 3.0), ("@10", 2.0), "<=", 1.5, samples={"large": 5})]
    path = tmp_path / "out" / "bench.json"
    stats.write_json(path, rows, {"quick": True})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["meta"] == {"quick": True}
    (only,) = data["rows"]
    assert only["ratio"] == 1.5 and only["status"] == PASS and only["op"] == "<="
    assert only["numerator_ms"] == 3.0 and only["denominator_ms"] == 2.0 and only["samples"] == {"large": 5}


def test_quick_plan_is_smaller_than_full() -> None:
    full, quick = Plan.full(), Plan.quick_run()
    assert full.p4_large_waiting == 10_000 and quick.p4_large_waiting == 1_000
    assert full.num_loras == quick.num_loras == 50
    assert quick.p1_rounds * quick.p1_block < full.p1_rounds * full.p1_block
    assert quick.p4_samples < full.p4_samples


def test_contention_note_only_when_other_processes_took_cpu() -> None:
    assert stats.contention_note(0.02, 0.0) == ""
    shared = stats.contention_note(0.85, 0.01)
    assert shared.startswith("WARNING") and "0.85 core(s)" in shared
    assert stats.contention_note(0.0, 0.3).startswith("WARNING")


def test_only_names_phases_case_insensitively_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import build_parser, main

    assert build_parser().parse_args(["--only", "p1, P4"]).only == ["P1", "P4"]
    assert build_parser().parse_args([]).only == ["P1", "P2", "P3", "P4"]
    with pytest.raises(SystemExit) as exited:
        main(["--only", "P1,P5"])
    assert exited.value.code == 2
    assert "--only: no phase P5" in capsys.readouterr().err


def test_drift_adjustment_removes_a_rounds_common_slowdown_and_keeps_the_arms_difference() -> None:
    from bench.run import drift_adjusted_samples

    # Three rounds of (no LoRA, LoRA): the LoRA arm costs 10% more; round 2 ran 50% slower as a whole.
    none, lora = [100.0, 150.0, 100.0], [110.0, 165.0, 110.0]
    adjusted_none, adjusted_lora = drift_adjusted_samples([none, lora])
    assert adjusted_none == pytest.approx([100.0, 100.0, 100.0])
    assert adjusted_lora == pytest.approx([110.0, 110.0, 110.0])


def test_ratio_interval_is_narrow_when_every_round_agrees_and_wide_when_they_do_not() -> None:
    from bench.run import Arm, ratio_interval

    async def untimed() -> float:
        raise AssertionError("only the samples are read")

    def arms(none: list[float], lora: list[float]) -> list[Arm]:
        return [Arm("none", untimed, seconds=none), Arm("lora", untimed, seconds=lora)]

    steady = arms([0.100, 0.150, 0.100, 0.120], [0.110, 0.165, 0.110, 0.132])
    assert ratio_interval(steady, numerator=1, denominator=0) == pytest.approx((1.1, 1.1))
    low, high = ratio_interval(arms([0.1] * 8, [0.09, 0.12] * 4), numerator=1, denominator=0)
    assert low < 1.0 < high


def test_p2_rounds_flag_sets_the_guards_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import build_parser, main

    assert build_parser().parse_args(["--p2-rounds", "120"]).p2_rounds == 120
    assert build_parser().parse_args([]).p2_rounds is None
    with pytest.raises(SystemExit) as exited:
        main(["--p2-rounds", "0"])
    assert exited.value.code == 2
    assert "--p2-rounds: at least 1" in capsys.readouterr().err


def test_p2_runs_on_tiny_sd15_unless_told_otherwise() -> None:
    from bench.__main__ import build_parser

    assert Plan.full().p2_family == "sd15" and Plan.quick_run().p2_family == "sd15"
    assert build_parser().parse_args(["--p2-family", "sdxl"]).p2_family == "sdxl"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--p2-family", "sd3"])


def test_lora_options_run_hotswap_and_merged_copies_on_one_unet_with_the_same_output(tmp_path: Path) -> None:
    """bench.lora --options on the tiny SDXL: both arms apply each LoRA, and the outputs agree."""
    import torch

    from bench.lora import FORWARD_PAIRS, compare_options
    from serving.lora_cache import HostLoraCache
    from serving.pipelines import LoadedPipeline
    from serving.tiny import _build_pipeline, make_tiny_lora

    torch.manual_seed(0)
    pipe = _build_pipeline("sdxl")
    paths = [make_tiny_lora(tmp_path / f"lora_{seed}.safetensors", components=["unet"], seed=seed) for seed in (1, 2, 3)]
    host = HostLoraCache(0)
    loaded = LoadedPipeline(pipe, family="sdxl", model_name="tiny", host_loras=host)
    lines: list[str] = []
    figures, raw = compare_options(pipe, loaded, host, paths, latent=8, say=lines.append)
    assert len(raw["hotswap"]) == len(raw["switch"]) == 2
    assert len(raw["forward_hotswap"]) == len(raw["forward_merged"]) == 2 * FORWARD_PAIRS
    # Each LoRA changes the output, and hotswap gives what the merged copies give.
    assert min(raw["lora_effect"]) > 1e-3
    assert figures["max |hotswap − merged| output"] < 1e-3 * figures["max |merged − plain| (LoRA effect)"] + 1e-5
    assert loaded.lora_merges >= 3
    assert any("PEFT layers" in line for line in lines)
