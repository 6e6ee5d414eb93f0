"""Everything that touches torch/diffusers: pipeline loading, LoRAs, generation, tiny test models."""
