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
from bench.targets import TARGETS


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


def test_the_benchmarks_targets_are_the_issues() -> None:
    """The table every benchmark takes its verdicts from holds the targets docs/benchmarks.md states."""
    assert TARGETS["P1 serving overhead"] == ("<=", 1.03)
    assert TARGETS["P2 LoRA tax"] == ("<=", 1.05) and TARGETS["P2 LoRA churn"] == (">=", 0.97)
    assert TARGETS["P3 base-model churn"] == (">=", 0.95) and TARGETS["P3 replica reloads"] == ("<=", 0)
    assert TARGETS["P4 queue scale"] == ("<=", 1.5)
    assert TARGETS["lora file to ready cpu"] == ("<=", 0.5) and TARGETS["lora repeat merges"] == ("<=", 0)
    assert TARGETS["gpu served one LoRA ÷ plain eager"] == ("<=", 0.65)
    assert TARGETS["gpu round-robin ÷ one LoRA"] == ("<=", 1.02)
    assert TARGETS["gpu lora switch ms"] == ("<=", 10.0) and TARGETS["gpu lora miss from host ms"] == ("<=", 30.0)
    assert TARGETS["gpu recompiles"] == ("<=", 0) and TARGETS["gpu warm-cache start ÷ eager start"] == ("<=", 1.5)
    assert TARGETS["gpu allocated ÷ tensors"] == ("<=", 1.01)
    assert TARGETS["gpu flux served ÷ plain eager"] == ("<=", 1.01) and TARGETS["gpu flux lora switch ms"] == ("<=", 50.0)
    assert TARGETS["gpu flux compiled ÷ plain eager"] == ("<=", 0.7)
    assert TARGETS["cpu compile recompiles"] == ("<=", 0)
    assert TARGETS["cpu compile LoRA switch on ÷ off"] == ("<=", 1.05)
    assert TARGETS["flux lora miss from host"] == ("<=", 0.1)


def test_compile_benchmark_takes_its_verdicts_from_the_table() -> None:
    from bench.compile import checks

    rows = checks({"service": {"recompiles after warm-up (metric)": 1.0},
                   "unet": {"switch compile on ÷ off": 1.05, "U-Net step compiled ÷ eager": 0.9}})
    assert [(target, status) for _, _, target, status in rows] == [("<= 0", MISS), ("<= 1.05", PASS), ("-", "INFO")]


def test_upper_bound_targets() -> None:
    # P1: service ÷ in-process must stay at or below its target (1.03).
    p1 = TARGETS["P1 serving overhead"]
    at_target = row("P1", ("service", 103.0), ("plain", 100.0), *p1)
    assert at_target.ratio == pytest.approx(1.03) and at_target.status == PASS
    assert row("P1", ("service", 104.0), ("plain", 100.0), *p1).status == MISS
    # P2 LoRA tax (1.05): 1.16-1.40 is what a plain unfused set_adapters approach gives.
    tax = TARGETS["P2 LoRA tax"]
    assert row("tax", ("rr", 116.0), ("none", 100.0), *tax).status == MISS
    assert row("tax", ("rr", 105.1), ("none", 100.0), *tax).status == MISS
    assert row("tax", ("rr", 104.9), ("none", 100.0), *tax).status == PASS
    # P4: p99 at 10,000 waiting ÷ p99 at 10 waiting (1.5).
    p4 = TARGETS["P4 queue scale"]
    assert row("P4", ("@10000", 3.0), ("@10", 2.0), *p4).status == PASS
    assert row("P4", ("@10000", 3.1), ("@10", 2.0), *p4).status == MISS


def test_lower_bound_targets_are_fast_over_slow() -> None:
    """Churn rows put the steady case on top: one LoRA (or one model) ÷ round-robin (or alternating)."""
    p3 = TARGETS["P3 base-model churn"]
    churn_free = row("churn", ("one", 300.0), ("alternating", 310.0), *p3)
    assert churn_free.ratio == pytest.approx(0.9677, abs=1e-4) and churn_free.status == PASS
    assert row("churn", ("one", 300.0), ("alternating", 320.0), *p3).status == MISS
    # Switching that is faster than the steady case is not penalised.
    assert row("churn", ("one", 300.0), ("alternating", 290.0), *p3).status == PASS
    churn = TARGETS["P2 LoRA churn"]
    assert row("churn", ("one", 300.0), ("round-robin", 310.0), *churn).status == MISS
    assert row("churn", ("one", 300.0), ("round-robin", 308.0), *churn).status == PASS


def test_arms_that_did_different_work_miss_whatever_their_ratio() -> None:
    """A P3 run that reloaded a model, or a pair whose images differ, compares nothing: MISS, with the reason."""
    reloaded = row("P3", ("one", 300.0), ("alternating", 300.0), *TARGETS["P3 base-model churn"], mismatch="2 replica reloads")
    assert reloaded.ratio == 1.0 and reloaded.status == MISS
    (line,) = stats.format_table([reloaded]).splitlines()[2:]
    assert "NOT THE SAME WORK: 2 replica reloads" in line
    assert row("info", ("a", 1.0), ("b", 1.0), mismatch="x").status == stats.INFO
    assert stats.same_image(0.5, 4.0, "pair") == ""
    assert "pair: mean |Δ| 0.60" in stats.same_image(0.6, 1.0, "pair")
    assert "max |Δ| 5" in stats.same_image(0.1, 5.0, "pair")


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
    assert full.p4_huge_waiting == 100_000 and quick.p4_huge_waiting == 10_000
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


def _junit(path: Path, tests: int, failures: int = 0, skipped: int = 0) -> None:
    cases = "".join(
        f'<testcase name="t{i}">' + ('<skipped message="needs CUDA"/>' if i < skipped else "") + "</testcase>"
        for i in range(tests)
    )
    path.write_text(
        f'<testsuites><testsuite tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}">{cases}'
        "</testsuite></testsuites>",
        encoding="utf-8",
    )


def test_gpu_check_table_says_what_passed_missed_skipped_and_never_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import gpu_check, gpu_flux

    def results() -> dict[str, tuple[str, str]]:
        """check → (value, result) of the table just printed; of a name in several benchmarks, the first."""
        rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:] if " | " in line]
        table: dict[str, tuple[str, str]] = {}
        for cells in rows:
            table.setdefault(cells[1].strip(), (cells[2].strip(), cells[-1].strip()))
        return table

    # Nothing ran: every step is a row of its own, MISSING, and the check fails.
    assert gpu_check.main([str(tmp_path)]) == 1
    assert [result for _, result in results().values()] == ["MISSING", "MISSING", "MISSING"]
    # The FLUX rows as scripts/gpu_check.sh --dry-run makes them: bench.gpu_flux on the tiny FLUX, on the CPU.
    flux_args = ["--device", "cpu", "--tiny", "--repeats", "1", "--short", "1", "--long", "2"]
    assert gpu_flux.main([*flux_args, "--json", str(tmp_path / "gpu_flux.json"), "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    checks = [
        {**stats.check("served vs plain: max", 0.0, TARGETS["same image max"]), "target_key": "same image max"},
        {**stats.check("switch ms", 12.0, TARGETS["gpu lora switch ms"]), "target_key": "gpu lora switch ms"},
    ]
    (tmp_path / "gpu.json").write_text(json.dumps({"checks": checks, "errors": {}}), encoding="utf-8")
    _junit(tmp_path / gpu_check.TESTS_FILE, tests=3, skipped=3)
    # Without CUDA (dry run): the skips and the GPU timing say nothing about a GPU; the same-image check still counts.
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    table = results()
    assert table["CUDA tests passed"] == ("0 of 3, 3 skipped (needs CUDA)", "SKIP") and table["switch ms"][1] == "SKIP"
    assert table["served vs plain: max"] == ("0", "PASS") and table["sections failed"] == ("none", "PASS")
    flux_rows = ["FLUX served + one LoRA ÷ plain diffusers eager", "FLUX switch between resident LoRAs ms"]
    assert [table[name][1] for name in flux_rows] == ["SKIP", "SKIP"]
    assert table[gpu_flux.PEAK] == ("n/a", "INFO"), "the CPU has no CUDA peak; the row is there, without a target"
    assert set(gpu_flux.REPORTED) == gpu_check.REPORTED and table[gpu_flux.SWITCH_RESERVED] == ("n/a", "INFO")
    # On a GPU the same files fail: tests that skipped did not run there, and 12 ms is over the 10 ms target.
    assert gpu_check.main([str(tmp_path)]) == 1
    table = results()
    assert table["CUDA tests passed"][1] == "MISS" and table["switch ms"] == ("12", "MISS")
    _junit(tmp_path / gpu_check.TESTS_FILE, tests=3, failures=1)
    (tmp_path / "gpu.json").write_text(json.dumps({"checks": checks[:1], "errors": {"c_switch": "trace"}}), encoding="utf-8")
    assert gpu_check.main([str(tmp_path)]) == 1
    table = results()
    assert table["CUDA tests failed or errored"] == ("1", "MISS") and table["sections failed"] == ("c_switch", "MISS")


async def test_gateway_load_proves_the_auth_arm_refuses_a_keyless_call(tmp_path: Path) -> None:
    """bench.gateway_load times Submit on a gateway that must check keys: a keyless Submit there is refused,
    and the check tells a gateway that accepts it apart."""
    from bench.gateway_load import keyless_refused
    from core.config import Settings
    from tests.conftest import free_port, gateway_for, own_gateway_settings

    base = Settings(serve_grpc_port=free_port(), device="cpu", log_level="WARNING")
    async with (
        gateway_for(own_gateway_settings(base, tmp_path, grpc_host="0.0.0.0")) as keyed,
        gateway_for(own_gateway_settings(base, tmp_path)) as open_gateway,
    ):
        assert await keyless_refused(keyed.grpc_port) == ""
        assert "accepted" in await keyless_refused(open_gateway.grpc_port)


# An SDXL-shaped U-Net small enough for a smoke test (serving/tiny.py's, with its text_time conditioning).
TINY_SDXL_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 64,
    "norm_num_groups": 1,
}


def test_lora_rounds_compare_like_with_like_and_compute_their_verdicts(tmp_path: Path) -> None:
    """bench.lora on a tiny SDXL-shaped U-Net: both sides apply the same LoRA file to the same layers and give
    the same output (float32), every figure the verdicts need is there, and a repeat merges nothing."""
    import torch

    from bench.lora import run

    lines: list[str] = []
    result = run(torch.device("cpu"), torch.float32, 1, tmp_path, lines.append, latent=8, unet_config=TINY_SDXL_UNET)
    figures, checks = result["figures"], {c["name"]: c for c in result["checks"]}
    assert figures["adapted layers, diffusers"] == figures["adapted layers, service"] > 0
    for name in ("max |fused − service| ÷ LoRA effect", "max |diffusers − service| ÷ LoRA effect"):
        assert checks[name]["status"] == PASS and checks[name]["target"] == TARGETS["lora fused agreement float32"][1]
    assert checks["merges during repeats"]["status"] == PASS and figures["merges during repeats"] == 0
    assert figures["weight writes during repeats"] == 0, "a repeat of the installed set copied weights"
    assert checks["file → ready: service ÷ diffusers"]["target"] == TARGETS["lora file to ready cpu"][1]
    assert figures["file → ready: service ÷ diffusers"] == pytest.approx(
        figures["file → ready: service ms"] / figures["file → ready: load_lora_weights ms"]
    )
    assert len(result["raw"]["diffusers_file"]) == len(result["raw"]["service_file"]) == 1
    assert any(line.startswith("round 1/1: file → ready") for line in lines)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_flux_lora_rounds_compare_like_with_like_and_compute_their_verdicts(layout: str, tmp_path: Path) -> None:
    """bench.flux_lora on a tiny FLUX-structured transformer: both sides adapt the same layers (kohya's fused
    q/k/v split by diffusers' converter on the service's miss too), agree in float32, and a repeat merges nothing."""
    import torch

    from bench.flux_lora import run

    lines: list[str] = []
    tiny = {"num_layers": 1, "num_single_layers": 1}
    cpu, float32 = torch.device("cpu"), torch.float32
    result = run(cpu, float32, 1, tmp_path, lines.append, layout=layout, config=tiny, rank=4)  # type: ignore[arg-type]
    figures, checks = result["figures"], {c["name"]: c for c in result["checks"]}
    assert figures["adapted layers, diffusers"] == figures["adapted layers, service"] > 0
    assert checks["max |diffusers − service| ÷ LoRA effect"]["status"] == PASS
    assert checks["merges during repeats"]["status"] == PASS and figures["merges during repeats"] == 0
    assert checks["miss ÷ load_lora_weights"]["target"] == TARGETS["flux lora miss from host"][1]
    assert figures["miss ÷ load_lora_weights"] == pytest.approx(
        figures["miss from host RAM ms"] / figures["load_lora_weights(state dict) ms"]
    )
    assert any(line.startswith("round 1/1: miss from host") for line in lines)
