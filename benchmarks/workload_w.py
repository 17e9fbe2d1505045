"""Workload W, shared by the CPU benchmarks: GPT-2 shape, 4 layers, d_model 256, 4 heads,
d_ff 1024, vocab 8192, seq 256, global batch 16, float32, AdamW (lr 3e-4, betas 0.9/0.95,
eps 1e-8, weight decay 0.1) with global-norm clipping at 1.0, tied embeddings, no dropout."""

from __future__ import annotations

import os

L, D, H, F, V, T, B = 4, 256, 4, 1024, 8192, 256, 16
LR, BETAS, EPS, WD, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
# W as jaxlm config overrides of the `tiny` config.
OVERRIDES = [f"model.num_layers={L}", f"model.d_model={D}", f"model.num_heads={H}",
             f"model.d_ff={F}", f"model.vocab_size={V}", f"model.max_seq_len={T}",
             f"train.seq_len={T}", f"train.batch_size={B}", "model.dtype=float32",
             "model.tie_embeddings=true", "model.dropout=0.0", "mesh.data=1",
             f"optim.lr={LR}", f"optim.b1={BETAS[0]}", f"optim.b2={BETAS[1]}",
             f"optim.eps={EPS}", f"optim.weight_decay={WD}", f"optim.clip_norm={CLIP}",
             "optim.warmup_steps=0", "train.steps=100000", "train.time_budget=0",
             "run.cpu_threaded_matmul=true", "run.cpu_devices=1", "model.grad_barrier=false"]


def load_average() -> float:
    """The 1-minute load average (what `uptime` prints first)."""
    return os.getloadavg()[0]
