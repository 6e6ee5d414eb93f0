"""How a FLUX.1 LoRA set fits one 80 GB GPU: the plan, its figures, and the default LoRA budget it gives.

FLUX LoRAs are applied as SD's are (serving/lora_tier.py, serving/lora_merge.py): the adapters stay
resident as low-rank tensors, and a request's set is merged into copies of only the layers it
adapts, swapped into the modules' own weights, and kept for a repeat. What changes is the size.
Figures from FLUX.1 [dev]'s structure (`python -m bench.flux_lora --memory`: its configs instantiated
on the meta device, activations measured under FakeTensorMode; bfloat16, GiB = 2³⁰ bytes):

- weights: transformer 11.90 B parameters = 22.17 GiB, T5-XXL encoder 8.87 GiB, CLIP-L 0.23 GiB,
  VAE 0.16 GiB: 31.43 GiB. An H100 80 GB has ~79.6 GiB, ~0.6 GiB of it CUDA's context and
  workspaces, so ~47.6 GiB are free once the pipeline is loaded.
- one merged set (a copy of every layer the set adapts): every Linear of the 19 + 38 blocks, as
  ai-toolkit and fal's trainers adapt them (494 layers, modulation projections included) 22.04 GiB;
  attention and MLP only (418) 16.03 GiB; attention only (266) 4.68 GiB.
- one adapter resident on the GPU, all 494 block Linears: rank 16 164 MiB, rank 32 328 MiB,
  rank 64 656 MiB (a 172 MB rank-16 ai-toolkit file is this set).
- activations, each stage's peak at 1024² (4096 image + 512 text tokens), one image / four (fal's
  `num_images` maximum): T5-XXL 0.31 / 1.03 GiB, transformer 0.46 / 1.82 GiB, VAE decode (the batch
  at once) 1.50 / 6.00 GiB. The stages run one after the other: 6 GiB at most for four 1024² images,
  about 1.5 GiB per megapixel. Measured with the CPU's kernels (its flash attention stands in for
  CUDA's); cuDNN's workspaces come on top.

The plan: keep the merged copies on the GPU, one set at a time (the tier drops the last set's copies
before it merges another), and reserve `ACTIVATION_RESERVE` (24 GiB: four times the peak of four
1024² images, so requests up to ~16 MP, plus workspaces and the allocator's fragmentation) for
activations. The default byte budget of a FLUX pipeline (adapters plus the kept merged set) is what is
free once it is loaded, less that reserve: on an H100 80 GB 47.6 − 24 = 23.6 GiB, room for the largest
merged set (22.04 GiB) kept for repeats plus 1.6 GiB of adapters (four all-block rank-32 LoRAs; the
rest wait in the host tier, one 328 MiB transfer away). Over it, adapters go first, then the merged
copies (a repeat then merges again). Weights, budget and reserve add up to the card (79.6 GiB); a
request of four 1024² images peaks at about 31.4 + 0.6 + 23.6 + 6 = 61.6 GiB.

One base per replica while a FLUX pipeline is on an 80 GB GPU: with the default budget the plan
takes the whole card, so the replica keeps another base (an SD/SDXL one, another FLUX checkpoint)
beside it only when the device holds both plans (serving/residency.py, setting
`device_memory_bytes`), and evicts the least recently used one otherwise, whatever
`max_pipelines_per_replica` allows. The budget is not split among pipelines: what other bases hold
is not free when it is read.

The alternative weighed: merging in place with the original weights kept in pinned host memory.
It needs no device memory for copies (and would fit two pipelines), but every switch moves the
adapted layers both ways over PCIe (2 × 22 GiB, ~1-2 s at 25-50 GB/s) where the on-device copies
switch in about 15 ms (one pass reading and writing 22 GiB at ~3 TB/s, where both sets adapt the
same layers, estimated); it is the way to go for GPUs under 80 GB.
"""

from __future__ import annotations

GIB = 1024**3
# An H100 80 GB as torch.cuda.mem_get_info reports it, and what CUDA's context and workspaces take of it.
H100_BYTES = 81559 * 1024**2
CUDA_OVERHEAD = 600 * 1024**2
# Kept free of LoRA tensors on a GPU: four times the measured activations of four 1024² images (6 GiB,
# the VAE's decode), for larger requests, cuDNN's workspaces and the allocator's fragmentation.
ACTIVATION_RESERVE = 24 * GIB


def default_budget(free: int) -> int:
    """A FLUX pipeline's adapters plus its kept merged set, from the device memory free once it is loaded.

    Not split among `max_pipelines_per_replica`: what other bases hold is not free, and another base
    stays beside a FLUX pipeline only when the device holds both plans (serving/residency.py).
    """
    return max(0, free - ACTIVATION_RESERVE)
