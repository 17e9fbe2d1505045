"""Held-out evaluation: loss, perplexity, bits per byte (and MLM accuracy), used by the
training loop and by `jaxlm eval`."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.data import setup as data_setup
from jaxlm.data.paths import as_path
from jaxlm.progress import bar
from jaxlm.setup import build
from jaxlm.train import rundir
from jaxlm.train.step import token_means


def heldout_metrics(eval_step: Callable, params: Any, data: data_setup.TrainData, mesh: Mesh,
                    num_batches: int, progress: bool = False) -> dict[str, float]:
    """Sums the eval step's counts over the first `num_batches` validation batches
    (`progress`: a bar on stderr when it is a terminal)."""
    sums: dict[str, float] = {}
    quiet = not progress or jax.process_index() != 0
    for i in bar(range(num_batches), desc="eval", unit="batch", quiet=quiet, leave=False):
        batch = sharding.host_batch_to_global(data.valid.batch(i), mesh)
        out = eval_step(params, batch, i)
        for k, v in jax.device_get(out).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = max(sums.get("num_tokens", 0.0), 1.0)
    loss = sums.get("nll_sum", float("nan")) / n
    result = {"eval_loss": loss}
    if data.bytes_per_token > 0:  # the loss is a text likelihood (not DPO's)
        result.update(eval_ppl=math.exp(min(loss, 50.0)),
                      eval_bits_per_byte=loss / math.log(2) / data.bytes_per_token)
    if "num_correct" in sums:
        result["eval_accuracy"] = sums["num_correct"] / n
    # Each other `X_sum` as its mean, named as the train step logs it (DPO's rewards, margin,
    # accuracy; the MoE router losses).
    result.update({f"eval_{k}": float(v)
                   for k, v in token_means({**sums, "num_tokens": n}).items()})
    return result


def evaluate_run(run_dir: str | Path, max_batches: int = 0,
                 progress: bool = False) -> dict[str, Any]:
    """Evaluates a run's newest checkpoint on its whole validation split (or `max_batches`);
    appends the result to metrics.jsonl and writes eval.json."""
    from jaxlm.api import load

    run_dir = as_path(run_dir)
    lm = load(run_dir)
    cfg = lm.config
    if cfg.train.objective == "dpo":
        raise ConfigError(f"{run_dir} is a DPO run: its held-out pair metrics "
                          "(eval_dpo_accuracy, eval_dpo_reward_margin, ...) are the eval rows "
                          "of its metrics.jsonl; jaxlm eval --run scores language-model runs")
    data = data_setup.build(cfg, run_dir, progress=False)
    n = data.valid.batches_per_epoch
    n = min(n, max_batches) if max_batches else n
    setup = build(dataclasses.replace(cfg, mesh=MeshConfig(data=-1, fsdp=1, tensor=1)),
                  mask_id=data.tokenizer.mask_id)
    with jax.set_mesh(setup.mesh):
        params = jax.device_put(lm.params, setup.state_shardings.params)
        results = heldout_metrics(setup.eval_step, params, data, setup.mesh, n, progress)
    ckpts = run_dir / rundir.CHECKPOINT_DIR
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    results = {"step": max(steps, default=0), **results, "eval_batches": n}
    rundir.MetricsWriter(run_dir).write({**results, "kind": "eval"})
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
