"""One run on one accelerator, one JSON + markdown table: training speed and MFU of gpt2-124m
and llama-1b in bfloat16 (attention xla / cudnn / auto, remat none / full), KV-cache decoding
tokens/s at batch 1, 16 and 64, checkpoint save/restore of the 124M train state, and cuDNN
attention against the reference in forward and gradient.

    python benchmarks/accelerator.py --out DIR [--budget 450]   # one GPU, at most 8.5 minutes
    python benchmarks/accelerator.py --smoke --out DIR          # tiny sizes, any backend

It installs nothing: it needs jax with its CUDA build, flax, optax and orbax (the device
machines' image has them; there run `PYTHONPATH=. python3 benchmarks/accelerator.py --out
$OUT`). DIR/accelerator.json and DIR/accelerator.md are rewritten after every case, so a run
cut short keeps what it measured. Each case runs in try/except and records its error; a case
that would start past the time budget is recorded as skipped, and cuDNN cases off NVIDIA GPUs
are recorded as skipped with the reason. `auto` is measured only where it stands for another
implementation than the ones measured (it is recorded as the same program otherwise).

Training speed is `jaxlm bench`'s: the AOT-compiled, donated train step on random tokens,
each step synchronised, median step time. MFU (formula) is the PaLM model FLOPs per token
(the family spec's flops_per_token) over the device's peak; MFU (XLA) uses XLA's count of the
forward and backward pass instead (attention=xla, no remat, the optimizer left out; the
gradient compiled unrolled at 1, 2 and 3 layers and extrapolated to all of them), so
rematerialisation and kernel choice do not change the FLOPs they are credited with.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

# Before jax starts: one process owns the GPU, so let it take nearly all of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import accelerator_cases as cases  # noqa: E402
from accelerator_report import Report  # noqa: E402
from checkpoint_speed import GPT2_124M  # noqa: E402

ATTENTIONS = ("xla", "cudnn", "auto")
REMATS = ("none", "full")


@dataclass(frozen=True)
class Sizes:
    """What one mode measures: the models' shapes and the counts of each part."""

    models: dict[str, tuple[str, tuple[str, ...]]]  # name -> (config, overrides)
    steps: int
    warmup: int
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    checkpoint: tuple[str, ...]  # overrides of the state saved and restored
    checkpoint_repeats: int
    cudnn_shape: tuple[int, int, int, int, int]  # B, T, N, K, H
    verify_flops: bool = False  # also count XLA's FLOPs at full depth (slow for big models)


FULL = Sizes(
    models={"gpt2-124m": ("gpt2-124m", ("train.batch_size=16", "train.seq_len=1024",
                                        "model.scan_layers=true", "mesh.data=1")),
            "llama-1b": ("llama-1b", ("train.batch_size=4", "train.seq_len=2048",
                                      "mesh.data=1", "mesh.fsdp=1"))},
    steps=10, warmup=3, decode_batches=(1, 16, 64), prompt_len=128, new_tokens=256,
    checkpoint=tuple(GPT2_124M), checkpoint_repeats=2,
    cudnn_shape=(2, 1024, 8, 2, 64))

_TINY = ("model.num_layers=4", "model.d_model=64", "model.num_heads=4", "model.d_ff=128",
         "model.vocab_size=256", "model.max_seq_len=64", "train.seq_len=64",
         "train.batch_size=2", "mesh.data=1", "mesh.fsdp=1")
SMOKE = Sizes(
    models={"gpt2-124m": ("gpt2-124m", _TINY),
            "llama-1b": ("llama-1b", (*_TINY, "model.num_kv_heads=2"))},
    steps=2, warmup=1, decode_batches=(1, 2), prompt_len=4, new_tokens=4,
    checkpoint=("model.preset=gpt2", *_TINY[:5]), checkpoint_repeats=1,
    cudnn_shape=(1, 64, 4, 2, 32), verify_flops=True)


def _watchdog(seconds: float, report: Report) -> None:
    """Ends the process `seconds` from now, the report written, if a case hangs past the
    budget (a compile cannot be interrupted from Python)."""
    def fire():
        report.note(f"stopped by the watchdog after {seconds:.0f} s")
        report.write()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def run(sizes: Sizes, report: Report, remats: tuple[str, ...] = REMATS) -> None:
    """Every case, in order of priority should the budget run out: correctness, checkpoint,
    training without remat, the first model's decoding, training with remat, the rest."""
    call = functools.partial
    report.case("cudnn_check", "causal and packed, forward and gradient",
                call(cases.cudnn_check, sizes.cudnn_shape), needs=10,
                skip=cases.cudnn_unavailable())
    report.case("checkpoint", "gpt2-124m train state", call(
        cases.checkpoint_case, list(sizes.checkpoint), sizes.checkpoint_repeats), needs=20)
    xla_fpt = {name: report.case("xla_flops", name, call(
        cases.xla_flops_per_token, config, list(overrides), sizes.verify_flops), needs=20)
        for name, (config, overrides) in sizes.models.items()}
    names = list(sizes.models)
    for i, remat in enumerate(remats):
        for name in names:
            config, overrides = sizes.models[name]
            for attention in ATTENTIONS:
                _bench(report, sizes, name, config, overrides, attention, remat, xla_fpt[name])
        if i == 0:  # the first model's decoding before the other remat policies
            _decode(report, sizes, names[0])
    for name in names[1:]:
        _decode(report, sizes, name)


def _decode(report: Report, sizes: Sizes, name: str) -> None:
    config, overrides = sizes.models[name]
    for batch in sizes.decode_batches:
        report.case("generation", f"{name} batch {batch}", functools.partial(
            cases.decode_case, config, list(overrides), batch, sizes.prompt_len,
            sizes.new_tokens), needs=25)


def _bench(report: Report, sizes: Sizes, name: str, config: str, overrides: tuple[str, ...],
           attention: str, remat: str, xla_fpt: dict) -> None:
    resolved = cases.resolved_attention(config, list(overrides), attention)
    label = f"{name} attention={attention} remat={remat}"
    same = report.find("bench", f"{name} attention={resolved} remat={remat}")
    if attention == "auto" and resolved != "auto" and same is not None:
        report.same_as("bench", label, same, f"auto is {resolved} here")
        return
    skip = cases.cudnn_unavailable() if resolved == "cudnn" else None
    peak = report.data["environment"]["peak_tflops"] * 1e12
    report.case("bench", label, functools.partial(
        cases.bench_fitting, config, [*overrides, f"model.attention={attention}",
                                   f"model.remat={remat}"],
        sizes.steps, sizes.warmup, peak, xla_fpt.get("flops_per_token")), needs=30, skip=skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="accelerator_results", help="folder for the JSON and .md")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds: no case starts after this; the watchdog ends the run 60 s "
                        "later")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI, any backend)")
    p.add_argument("--models", nargs="+", choices=tuple(FULL.models), default=tuple(FULL.models))
    p.add_argument("--remats", nargs="+", choices=REMATS, default=REMATS)
    args = p.parse_args()
    if not args.smoke and jax.default_backend() == "cpu":
        raise SystemExit("no accelerator here (jax backend 'cpu'); use --smoke for the "
                         "tiny CPU run")
    report = Report(Path(args.out), args.budget, cases.environment(smoke=args.smoke))
    _watchdog(args.budget + 60, report)
    sizes = SMOKE if args.smoke else FULL
    sizes = dataclasses.replace(sizes, models={m: sizes.models[m] for m in args.models})
    run(sizes, report, tuple(args.remats))
    report.write()
    print(report.markdown())


if __name__ == "__main__":
    main()
