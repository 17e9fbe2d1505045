"""What the loop tells a person about a run: the model summary at start (parameters per
module, sharding of the largest tensors, FLOPs per token) and the records in summary.json
that `jaxlm runs` reads (status, parameter count, totals)."""

from __future__ import annotations

import os
import re
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import jax

from jaxlm.config import Config

_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")


@dataclass
class Summary:
    """What a training run reports at its end (and writes to summary.json)."""

    run_dir: str
    steps: int
    params: int
    train_loss: float = float("nan")
    eval_loss: float = float("nan")
    best_eval_loss: float = float("nan")
    eval_bits_per_byte: float = float("nan")
    tokens_per_sec: float = float("nan")
    wall_seconds: float = 0.0
    last_checkpoint: str = ""
    stopped_early: bool = False
    tokens: int = 0  # positions trained on: steps × batch_size × seq_len
    flops_per_token: float = float("nan")
    time_budget: float = 0.0  # train.time_budget the step count was planned for (0 = none)
    trainable_params: int = 0  # parameters the optimizer trains (LoRA: the adapters alone)
    optimizer_state_bytes: int = 0  # the optimizer state's size, over all devices
    sample: str = ""  # the prompt and its continuation by the trained model
    history: list[dict[str, Any]] = field(default_factory=list)


def format_summary(s: Summary, next_command: str = "") -> str:
    lines = [
        "─" * 60,
        f" run          {s.run_dir}",
        f" steps        {s.steps}   params {s.params / 1e6:.2f}M   wall {s.wall_seconds:.0f}s"
        + (f"   (planned for train.time_budget={s.time_budget:g}s)" if s.time_budget else ""),
        f" train loss   {s.train_loss:.4f}",
        f" eval loss    {s.eval_loss:.4f}  (best {s.best_eval_loss:.4f}, "
        f"{s.eval_bits_per_byte:.3f} bits/byte)",
        f" tokens/s     {s.tokens_per_sec:,.0f}   tokens {human(s.tokens)}   "
        f"FLOPs/token {human(s.flops_per_token)}",
        f" checkpoint   {s.last_checkpoint or '-'}"
        + ("   (stopped early: run the same command to resume)" if s.stopped_early else ""),
        f" view         jaxlm plot {s.run_dir}   |   tensorboard --logdir {s.run_dir}",
    ]
    if s.sample:  # control bytes a byte-level model may emit must not reach the terminal
        shown = "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in s.sample)
        first, *rest = shown.split("\n")
        lines += [f" sample       {first}"] + [f"              {line}" for line in rest]
    if next_command:
        lines.append(f" next         {next_command}")
    return "\n".join(lines + ["─" * 60])


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _size(leaf: Any) -> int:
    n = 1
    for d in leaf.shape:
        n *= int(d)
    return n


def params_by_module(params: Any) -> list[tuple[str, int]]:
    """(name, count) per top-level module and, one level down, per child; numbered siblings
    (`layers_0`, `layers_1`, ...) fold into one `layers_0..N (×n)` entry."""
    rows: list[tuple[str, int]] = []
    for top in sorted(params):
        sub = params[top]
        rows.append((top, sum(_size(x) for x in jax.tree.leaves(sub))))
        if not isinstance(sub, dict) or not any(isinstance(v, dict) for v in sub.values()):
            continue  # a module of plain tensors (a norm, an embedding): its total says it all
        groups: dict[str, list[int]] = defaultdict(list)
        order: list[str] = []
        for child in sub:
            match = _NUMBERED.match(child)
            key = match.group(1) if match else child
            if key not in groups:
                order.append(key)
            groups[key].append(sum(_size(x) for x in jax.tree.leaves(sub[child])))
        for key in order:
            counts = groups[key]
            label = f"{key}_0..{len(counts) - 1} (×{len(counts)})" if len(counts) > 1 else key
            rows.append((f"  {label}", sum(counts)))
    return rows


def largest_tensors(params: Any, k: int = 3) -> list[tuple[str, tuple, str, tuple]]:
    """(path, shape, PartitionSpec, per-device shard shape) of the k largest parameters;
    leaves are ShapeDtypeStructs or arrays carrying a NamedSharding."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    leaves.sort(key=lambda pl: -_size(pl[1]))
    out = []
    for path, leaf in leaves[:k]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        sh = getattr(leaf, "sharding", None)
        spec = str(sh.spec) if hasattr(sh, "spec") else "-"
        shard = tuple(sh.shard_shape(leaf.shape)) if sh is not None else tuple(leaf.shape)
        out.append((name, tuple(leaf.shape), spec, shard))
    return out


def model_summary(params: Any, cfg: Config, fpt: float) -> str:
    """A few lines for the start of training (`fpt`: model FLOPs per token); `params` may
    be abstract (eval_shape)."""
    total = sum(_size(x) for x in jax.tree.leaves(params))
    lines = [f"parameters  {human(total)} ({total:,})"]
    for name, n in params_by_module(params):
        lines.append(f"  {name:34s} {human(n):>8s}  {100 * n / max(total, 1):5.1f}%")
    lines.append("largest tensors (shape, mesh sharding, per-device shard)")
    for name, shape, spec, shard in largest_tensors(params):
        lines.append(f"  {name:34s} {str(shape):16s} {spec:28s} {shard}")
    step_tokens = cfg.train.batch_size * cfg.train.seq_len
    lines.append(f"FLOPs/token ≈ 6N + attention (causal half) = {human(fpt)}  "
                 f"({human(fpt * step_tokens)} per step of {step_tokens:,} tokens)")
    return "\n".join(lines)


def state_bytes(tree: Any) -> int:
    """Bytes of a (possibly abstract) tree of arrays."""
    return sum(_size(x) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def trained_line(s: Summary) -> str:
    """What the optimizer trains and holds state for (LoRA: the adapters alone)."""
    share = 100 * s.trainable_params / max(s.params, 1)
    return (f"trained     {human(s.trainable_params)} of {human(s.params)} parameters "
            f"({share:.2f}%); optimizer state {s.optimizer_state_bytes / 2**20:.2f} MiB")


def start_record(cfg: Config, summary: Any) -> dict[str, Any]:
    """summary.json while training: `running`, with the process that can be checked, and
    what the loop's Summary knows before the first step."""
    return {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
            "started": round(time.time(), 3), "preset": cfg.model.preset,
            "params": summary.params, "flops_per_token": summary.flops_per_token,
            "trainable_params": summary.trainable_params,
            "optimizer_state_bytes": summary.optimizer_state_bytes,
            "total_steps": cfg.train.steps}


def end_record(cfg: Config, summary: Any) -> dict[str, Any]:
    """summary.json after the loop: `finished` at train.steps, else `stopped` (a signal).
    Carries the loop's Summary fields that are plain JSON values."""
    fields = {k: v for k, v in vars(summary).items()
              if isinstance(v, (int, float, str, bool)) or v is None}
    done = summary.steps >= cfg.train.steps
    return {"status": "finished" if done else "stopped", "ended": round(time.time(), 3),
            "preset": cfg.model.preset, "total_steps": cfg.train.steps,
            **fields}
