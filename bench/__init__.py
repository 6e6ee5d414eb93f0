"""Benchmark of the hot-weights promise: `bash scripts/bench.sh [--quick] [--json PATH]`.

Starts the real embedded service (local Ray + Serve workers + gRPC gateway on loopback)
with tiny random-weight SDXL models and prints one table of ratios, measured side by side
in one run: serving overhead (P1), LoRA tax and churn (P2), base-model churn (P3) and
queue scale (P4). `bench.stats` holds the pure helpers (percentiles, rows, the table).
"""
