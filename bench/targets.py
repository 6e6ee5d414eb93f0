"""Every target a benchmark checks, in one table: the benchmarks compute PASS / MISS from it.

Keys name the figure; values are (comparison, bound) for `bench.stats.verdict`. Ratios are
numerator ÷ denominator as each benchmark's row says; `ms` keys are absolute milliseconds; counts
must stay at or below their bound (0: none allowed). docs/benchmarks.md quotes these; the smoke tests
check the benchmarks' rows against this table, not against numbers of their own.
"""

from __future__ import annotations

from bench.stats import SAME_IMAGE_MAX, SAME_IMAGE_MEAN, Op

TARGETS: dict[str, tuple[Op, float]] = {
    # bench.run (scripts/bench.sh): through the public API on tiny models.
    "P1 serving overhead": ("<=", 1.03),
    "P2 LoRA tax": ("<=", 1.05),
    "P2 LoRA churn": (">=", 0.97),
    "P3 base-model churn": (">=", 0.95),
    # A P3 run that reloaded a model while measuring did not measure keeping two resident.
    "P3 replica reloads": ("<=", 0),
    # P4: Submit / GetStatus p99 and p50 with 10,000 (and 100,000) waiting ÷ with 10 waiting, on each store.
    "P4 queue scale": ("<=", 1.5),
    # bench.gateway_load: Submit p99 with an API key ÷ without; a refusal's p99 ÷ QUOTA_BUDGET_MS (50 ms).
    "gateway auth on ÷ off": ("<=", 1.1),
    "gateway RESOURCE_EXHAUSTED ÷ budget": ("<=", 1.0),
    # bench.lora: SDXL's U-Net and rank-32 LoRAs on its 560 attention projections.
    "lora file to ready cpu": ("<=", 0.5),
    "lora repeat merges": ("<=", 0),
    # Both sides adapted the same number of layers (the difference of the counts).
    "lora same layers": ("<=", 0),
    # max |their output − ours| ÷ the LoRA's own effect on the output: a check that both sides did the
    # same work, not a precision target. float32: the same function, only the order of additions
    # differs. Half precision, against diffusers' fused weights: each merged weight rounded once either
    # way (within one rounding, tests/serving/test_lora_exact.py), and the SDXL U-Net's output (about
    # 2.5, a bfloat16 step of 0.016) rounded through hundreds of layers: 0.21 measured in bfloat16.
    # Against PEFT's unfused layers every adapted layer's output is rounded as well: 0.3 measured. A
    # LoRA applied at twice its scale, or another LoRA, differs by its whole effect (1) or more.
    "lora fused agreement float32": ("<=", 1e-3),
    "lora unfused agreement float32": ("<=", 1e-3),
    "lora fused agreement half": ("<=", 0.4),
    "lora unfused agreement half": ("<=", 0.6),
    # bench.flux_lora (CPU): a FLUX.1-structured transformer at FLUX.1's widths, rank-32 LoRAs on every
    # block Linear: the tier's miss from host RAM ÷ diffusers' load_lora_weights of the same LoRA's state
    # dict in host RAM. Its repeats and agreement use the bench.lora rows above.
    "flux lora miss from host": ("<=", 0.1),
    # bench.gpu_flux: FLUX.1 [dev]'s structure on a GPU (1024², 28-step requests estimated per step, bf16,
    # rank-32 LoRAs on every block Linear); served eager ÷ plain, and with `acceleration: "regular"` compiled.
    "gpu flux served ÷ plain eager": ("<=", 1.01),
    "gpu flux compiled ÷ plain eager": ("<=", 0.7),
    "gpu flux lora switch ms": ("<=", 50.0),
    # bench.gpu: the full SDXL pipeline on a GPU (1024², 30 steps, fp16, rank-32 LoRAs).
    "gpu lora miss from host ms": ("<=", 30.0),
    "gpu lora switch ms": ("<=", 10.0),
    "gpu served one LoRA ÷ plain eager": ("<=", 0.65),
    "gpu round-robin ÷ one LoRA": ("<=", 1.02),
    # max |Δ| between the served images with and without the LoRA: the agreement rows above need an effect to agree on.
    "gpu LoRA effect": (">=", 1.0),
    # GPU memory a resident adapter takes ÷ its tensors' bytes (= 1: nothing beside them).
    "gpu allocated ÷ tensors": ("<=", 1.01),
    # Compiled denoising: recompiles after warm-up, and a replica's start with a warm compile cache ÷ eager.
    "gpu recompiles": ("<=", 0),
    "gpu warm-cache start ÷ eager start": ("<=", 1.5),
    # bench.compile (CPU): recompiles after warm-up in a 50-LoRA round robin, and a LoRA switch on
    # the compiled SDXL U-Net ÷ on the eager one.
    "cpu compile recompiles": ("<=", 0),
    "cpu compile LoRA switch on ÷ off": ("<=", 1.05),
    # Two arms that must give the same image (bench.stats.same_image), in pixel levels of 0-255.
    "same image mean": ("<=", SAME_IMAGE_MEAN),
    "same image max": ("<=", SAME_IMAGE_MAX),
}
