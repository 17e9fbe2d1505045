"""The `jaxlm` command. User errors exit with code 2 and one short message, no traceback."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from jaxlm import sampling

if TYPE_CHECKING:
    from jaxlm.config import Config

EXAMPLES = {
    "train": "jaxlm train train.steps=200 model.num_layers=2 run.dir=runs/quick",
    "generate": 'jaxlm generate --run runs/tiny --prompt "ROMEO:" --max-new-tokens 200',
    "chat": "jaxlm chat --run runs/sft-tiny",
    "eval": "jaxlm eval --run runs/mt --task translate --beams 4",
    "prepare": "jaxlm prepare --files corpus/ data.tokenizer=path/to/tokenizer",
    "plot": "jaxlm plot runs/tiny runs/longer --out compare.png",
    "runs": "jaxlm runs runs",
    "convert": "jaxlm convert hf2jaxlm --hf path/to/hf_model --out runs/converted",
    "export": "jaxlm export --run runs/tiny --out exports/tiny",
    "bench": "jaxlm bench --steps 20 model.num_layers=4 train.batch_size=16",
    "profile": "jaxlm profile --run runs/tiny --out profile.png",
    "compile": "jaxlm compile --topology v5p:4x4x4 model.preset=llama mesh.data=1 mesh.fsdp=-1",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxlm.checkpoint import CheckpointError
    from jaxlm.config import ConfigError
    from jaxlm.convert import ConversionError
    from jaxlm.data.pipeline import DataError
    from jaxlm.data.prepare import PrepareError
    from jaxlm.data.tokenizers import TokenizerError
    from jaxlm.plot import PlotError
    from jaxlm.runs import RunsError

    return (ConfigError, DataError, PrepareError, TokenizerError, CheckpointError,
            ConversionError, PlotError, RunsError)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxlm import config as config_lib

    if args.help_config:
        for key, tname, default, help_text in config_lib.describe():
            print(f"{key:28s} {tname:10s} {default!r:14} {help_text}")
        return 0
    from jaxlm.train import rundir

    overrides = args.overrides + (["run.quiet=true"] if args.quiet else [])
    from jaxlm.weights import checkpoint_config

    cfg, run_dir, _ = rundir.resolve(args.config, overrides, read_checkpoint=checkpoint_config)
    if args.print_config:
        print(config_lib.dump(cfg), end="")
        return 0
    from jaxlm import distributed, xla_flags

    xla_flags.apply(cfg.run.cpu_threaded_matmul, cfg.run.cpu_devices)
    # Before anything touches a JAX backend: join the other processes, if there are any.
    distributed.initialize(distributed.detect(args.coordinator, args.num_processes,
                                              args.process_id), args.init_timeout)
    import jax

    from jaxlm import compile_cache
    from jaxlm.train.loop import train
    from jaxlm.train.report import format_summary

    compile_cache.enable(cfg.run.compile_cache)  # a resume or rerun skips compiling
    summary = train(cfg, run_dir, None if cfg.run.quiet else sample_prompt(cfg),
                    started=args.started)
    if not cfg.run.quiet and jax.process_index() == 0:
        print(format_summary(summary, next_command(cfg, run_dir)))
    return 0


# What to show a person after training: the prompt that suits a prepared corpus, the task
# evaluation that suits a pair corpus.
SAMPLE_PROMPTS = {"shakespeare": "ROMEO:"}
PAIR_TASKS = {"xsum": "summarize", "disfl-qa": "qa"}


def sample_prompt(cfg) -> str | None:
    """The prompt a text model's sample continues; None for runs judged by a task score
    (pair data) and for families that do not continue a prompt."""
    from jaxlm.data.setup import uses_chat, uses_pairs
    from jaxlm.families import registry

    if (uses_pairs(cfg) or uses_chat(cfg) or cfg.data.format == "preference"
            or not registry.of(cfg.model).continues_prompt):
        return None
    return SAMPLE_PROMPTS.get(cfg.data.name, "The") if not cfg.data.files else "The"


def next_command(cfg, run_dir) -> str:
    """The command that shows what a run learned: a task score or a sample."""
    from jaxlm.data.setup import uses_chat, uses_pairs

    prompt = sample_prompt(cfg)
    if prompt is not None:
        return f'jaxlm generate --run {run_dir} --prompt "{prompt}"'
    if uses_chat(cfg):
        return f"jaxlm eval --run {run_dir} --task chat   (or: jaxlm chat --run {run_dir})"
    if cfg.data.format == "preference":  # DPO: its eval rows hold the held-out pair metrics
        return (f"jaxlm chat --run {run_dir}   (text prompts: jaxlm generate --run {run_dir} "
                "--prompt TEXT)")
    if uses_pairs(cfg):
        task = PAIR_TASKS.get(cfg.data.name, "translate")
        return f"jaxlm eval --run {run_dir} --task {task}"
    return f"jaxlm eval --run {run_dir}"


def cmd_generate(args: argparse.Namespace) -> int:
    import jaxlm
    from jaxlm import compile_cache

    compile_cache.enable()
    lm = jaxlm.load(args.run)
    texts = lm.generate([args.prompt] * args.num_samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, beams=args.beams, length_penalty=args.length_penalty)
    # A decoder continues the prompt; an encoder-decoder's output stands alone.
    from jaxlm.families import registry

    prefix = args.prompt if registry.of(lm.config.model).continues_prompt else ""
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(prefix + text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Reads user turns from stdin, one a line, and streams each reply to stdout."""
    import jaxlm
    from jaxlm import compile_cache
    from jaxlm.dialogue import session

    compile_cache.enable()
    lm = jaxlm.load(args.run)
    tty = sys.stdin.isatty()
    if tty:
        print("jaxlm chat: one line per turn; /reset clears the conversation, Ctrl-D ends",
              file=sys.stderr)

    def lines():
        while True:
            if tty:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    def write(piece: str) -> None:
        print(piece, end="", flush=True)

    session(lm, lines(), write, system=args.system,
            note=lambda s: print(s, file=sys.stderr, flush=True),
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxlm import compile_cache

    compile_cache.enable()
    if args.task and args.task != "lm":
        from jaxlm.tasks import evaluate_task

        results = evaluate_task(args.run, args.task, max_examples=args.max_examples,
                                beams=args.beams, length_penalty=args.length_penalty,
                                max_new_tokens=args.max_new_tokens, split=args.split,
                                progress=not args.quiet)
    else:
        from jaxlm.evaluate import evaluate_run

        results = evaluate_run(args.run, max_batches=args.max_batches, progress=not args.quiet)
    for k, v in results.items():
        print(f"{k:22s} {v:.4f}" if isinstance(v, float) else f"{k:22s} {v}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Downloads a named corpus; tokenizes the text a run of these settings would read
    (the corpus, --files or data.hf_path) into its token stores."""
    from jaxlm import config as config_lib
    from jaxlm.data.prepare import prepare
    from jaxlm.data.setup import prepare_stores

    name, overrides = args.name, list(args.overrides)
    if name is not None and "=" in name:  # `prepare key=value ...`: no corpus name
        name, overrides = None, [name, *overrides]
    from jaxlm.data import chat_preferences, chat_tasks

    synthetic = {m.NAME: m for m in (chat_tasks, chat_preferences)}
    if name in synthetic:  # synthetic: made here, nothing to download or tokenize
        seed, made = args.seed or 0, synthetic[name]
        files = made.write(args.out or made.default_dir(seed), seed)
        for split, path in zip(("train", "heldout"), files, strict=True):
            print(f"{split:7s} {path} ({path.stat().st_size:,} bytes)")
        return 0
    if args.out is not None or args.seed is not None:
        raise config_lib.ConfigError(f"--out and --seed apply to {' and '.join(synthetic)} "
                                     "(synthetic data), not to downloaded corpora")
    if name is None and not args.files and not any(o.startswith("data.hf_path=")
                                                   for o in overrides):
        raise config_lib.ConfigError("the following arguments are required: name (a corpus "
                                     "name), or --files, or data.hf_path=...")
    if name is not None:
        corpus = prepare(name, progress=not args.quiet)
        for split in ("train", "valid", "test"):
            path = getattr(corpus, split)
            if path is not None:
                print(f"{split:6s} {path} ({path.stat().st_size:,} bytes)")
        overrides.insert(0, f"data.name={name}")
    if args.files:
        overrides.insert(0, "data.files=" + ",".join(args.files))
    cfg = config_lib.load(args.config, overrides)
    for split, store in prepare_stores(cfg, quiet=args.quiet).items():
        print(f"{split:6s} {store.directory} ({store.num_tokens:,} tokens, documents: "
              f"{store.num_docs:,})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxlm.convert import run

    if args.direction == "hf2jaxlm":
        out = run.hf_to_run(args.hf, args.out, args.overrides)
    elif args.adapters_only:
        from jaxlm.convert.peft import save_adapters

        out = save_adapters(args.run, args.out)
    else:
        out = run.run_to_hf(args.run, args.out, dtype=args.dtype,
                            max_shard_bytes=args.max_shard_size)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxlm.api import export
    from jaxlm.checkpoint import CheckpointError

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CheckpointError(f"'{args.out}' exists and is not a directory; choose a new one")
    if args.adapters_only:
        from jaxlm.convert.peft import save_adapters

        out = save_adapters(args.run, args.out, args.step)
        print(f"wrote {out} (LoRA adapters in HF PEFT's layout)")
        return 0
    out = export(args.run, args.out, args.step, dtype=args.dtype)
    print(f"wrote {out} (params only; jaxlm.load reads it)")
    return 0


def _load_config(name: str | None, overrides: list[str]) -> Config:
    """The config as `jaxlm train` resolves it: with model.init_from, the checkpoint's
    architecture (jaxlm.weights.checkpoint_config; its weights are not read)."""
    from jaxlm import config as config_lib
    from jaxlm.weights import checkpoint_config

    return config_lib.load(name, overrides, read_checkpoint=checkpoint_config)


def cmd_compile(args: argparse.Namespace) -> int:
    import json

    from jaxlm.aot import compile_for_topology

    cfg = _load_config(args.config, args.overrides)
    report = compile_for_topology(cfg, args.topology, args.slices)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0 if report.fits is not False else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from jaxlm.bench import bench

    cfg = _load_config(args.config, args.overrides)
    from jaxlm import xla_flags

    xla_flags.apply(cfg.run.cpu_threaded_matmul, cfg.run.cpu_devices)
    result = bench(cfg, steps=args.steps, warmup=args.warmup, rounds=args.rounds)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from jaxlm import profile, xla_flags
    from jaxlm.plot import check_figure_path

    if args.out:  # refused now rather than after the profile has run
        check_figure_path(args.out, parents_must_exist=True)
    if args.trace and os.path.exists(args.trace) and not os.path.isdir(args.trace):
        from jaxlm.config import ConfigError

        raise ConfigError(f"--trace '{args.trace}' is a file; give a folder for the trace")
    if args.run:
        from jaxlm.train import rundir

        cfg = rundir.load_config(args.run, args.overrides)  # refuses bad overrides
        xla_flags.apply(cfg.run.cpu_threaded_matmul, cfg.run.cpu_devices)
        report = profile.from_run(args.run, steps=args.steps, overrides=args.overrides,
                                  trace_dir=args.trace)
    else:
        cfg = _load_config(args.config, args.overrides)
        xla_flags.apply(cfg.run.cpu_threaded_matmul, cfg.run.cpu_devices)
        report = profile.profile(cfg, steps=args.steps, trace_dir=args.trace)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    if args.out:
        print(f"wrote {profile.figure(report, args.out)}", file=sys.stderr)
    if args.trace:
        from jaxlm import trace

        print(f"open the trace with {trace.how_to_open(args.trace)}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxlm.plot import plot_runs

    print(f"wrote {plot_runs(args.run_dirs, args.out)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from jaxlm import runs

    infos = runs.list_runs(args.dir)
    if args.json:
        print(runs.to_json(infos))
    elif not infos:
        print(f"no runs under {args.dir}", file=sys.stderr)
    else:
        print(runs.format_table(infos))
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" where X says something: not to flags, required options or
    options whose unset value is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.nargs == 0 or action.default is None:
            return action.help
        if action.default == "":
            return f'{action.help} (default: "")'
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit 2), without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------ argument types
# argparse prints an ArgumentTypeError as "argument --x: <message>" and exits 2.

def _int_arg(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer >= lo (and < hi)."""
    rule = f">= {lo}" if hi is None else f">= {lo} and < {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value >= hi):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    return parse


def _float_arg(lo: float | None = None, hi: float | None = None,
               lo_open: bool = False) -> Callable[[str], float]:
    """A finite number >= lo (> lo when lo_open) and <= hi."""
    rules = ([f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []) + (
        [f"<= {hi:g}"] if hi is not None else [])

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        if below or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {' and '.join(rules)}, got {value:g}")
        return value

    return parse


POSITIVE, NON_NEGATIVE, SEED = _int_arg(1), _int_arg(0), _int_arg(0, 2**63)


def _size_arg(text: str) -> int:
    """A size such as 5GB, 500MB, 2GiB or a byte count."""
    from jaxlm.convert.safetensors_files import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _topology_arg(text: str) -> str:
    """A non-empty topology name (libtpu reads an empty one as its default topology)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a TPU topology such as v5e:4x4, got ''")
    return text.strip()


# ------------------------------------------------------------------ each command's arguments

def _train_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", default=None,
                   help="config name (see configs/) or YAML path; default: tiny")
    t.add_argument("--print-config", action="store_true", help="print the resolved config")
    t.add_argument("--help-config", action="store_true", help="list every config key")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bar, model summary or final summary (= run.quiet=true)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    d = t.add_argument_group("multi-process runs (default: JAXLM_*/JAX_* coordinator "
                             "variables, else the cluster jax.distributed detects: SLURM, "
                             "Open MPI, Cloud TPU, Kubernetes; JAXLM_DISTRIBUTED=off: one)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    d.add_argument("--num-processes", type=POSITIVE, metavar="N", help="processes in the run")
    d.add_argument("--process-id", type=NON_NEGATIVE, metavar="I", help="this process, 0..N-1")
    d.add_argument("--init-timeout", type=_float_arg(0, lo_open=True), default=None,
                   metavar="S",
                   help="give up (exit 2) if the processes have not all joined after S "
                        "seconds (default: $JAXLM_INIT_TIMEOUT or 300)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """--temperature/--top-k/--top-p/--seed, defaulting to readable text (jaxlm.sampling says
    why); 0 / 0 / 1 samples the raw model."""
    p.add_argument("--temperature", type=_float_arg(0), default=sampling.TEMPERATURE,
                   help="0 = greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=sampling.TOP_K,
                   help="keep the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=_float_arg(0, 1, lo_open=True), default=sampling.TOP_P,
                   help="nucleus sampling mass (1 = all)")
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed")


def _generate_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--run", required=True, help="run directory")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=200, help="tokens to generate")
    _sampling_args(g)
    g.add_argument("--num-samples", type=POSITIVE, default=1, help="samples to draw")
    g.add_argument("--beams", type=POSITIVE, default=1,
                   help="beam search width (encoder-decoder models; 1 = greedy/sampling)")
    g.add_argument("--length-penalty", type=_float_arg(), default=1.0,
                   help="beam search ranks by score / length**this (0 = raw log-prob)")


def _chat_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--run", required=True,
                   help="run directory, export or HF model directory (a decoder)")
    c.add_argument("--system", default="", help="system prompt that opens the conversation")
    c.add_argument("--max-new-tokens", type=POSITIVE, default=128,
                   help="longest reply in tokens")
    _sampling_args(c)
    c.description += (". Reads one user turn per line from stdin and streams each reply to "
                      "stdout through the model's chat template (the default ChatML-like one "
                      "if its tokenizer has none); /reset starts a new conversation; EOF ends.")


def _eval_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--max-batches", type=NON_NEGATIVE, default=0,
                   help="0 = the whole validation split")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--task", choices=("lm", "translate", "summarize", "qa", "chat"),
                   default="lm",
                   help="lm: loss/perplexity/bits per byte; translate: BLEU+chrF (with the "
                        "copy-the-source baseline); summarize: ROUGE; qa: SQuAD EM/F1; chat: "
                        "exact match of greedy replies on held-out conversations")
    e.add_argument("--split", choices=("test", "valid"), default="test",
                   help="held-out pairs of a prepared corpus (test falls back to valid)")
    e.add_argument("--max-examples", type=NON_NEGATIVE, default=0,
                   help="0 = every held-out pair")
    e.add_argument("--beams", type=POSITIVE, default=1, help="beam width for generation tasks")
    e.add_argument("--length-penalty", type=_float_arg(), default=1.0,
                   help="beam search ranks by score / length**this")
    e.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=0,
                   help="longest output of generation tasks (0 = 32 for qa and chat, else "
                        "the training target length)")


def _prepare_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("name", nargs="?", default=None,
                   help="corpus name, e.g. shakespeare (or use --files / data.hf_path=...)")
    r.add_argument("--files", action="append", metavar="PATH",
                   help="text/jsonl files, globs or folders (local or gs://) to tokenize; "
                        "repeat it or separate with commas")
    r.add_argument("--config", default=None,
                   help="config name or YAML path whose data settings to use (tokenizer...)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="chat-tasks / chat-preferences only: write train.jsonl and "
                        "heldout.jsonl to DIR (default: $JAXLM_CACHE/synthetic/NAME-seedS, "
                        "where data.name=NAME reads seed 0)")
    r.add_argument("--seed", type=SEED, default=None,
                   help="chat-tasks / chat-preferences only: the seed the synthetic "
                        "conversations are drawn from (default 0)")
    r.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.tokenizer=path/to/tokenizer")


def _convert_args(c: argparse.ArgumentParser) -> None:
    fmt = _HelpFormatter
    directions = c.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h = directions.add_parser("hf2jaxlm", formatter_class=fmt,
                              epilog=f"example: {EXAMPLES['convert']}",
                              help="HF directory (config.json + safetensors) -> jaxlm run")
    h.add_argument("--hf", required=True, help="HF model directory")
    h.add_argument("--out", required=True, help="new run directory")
    h.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings of the new run (train.*, optim.*, model.scan_layers, ...)")
    j = directions.add_parser("jaxlm2hf", formatter_class=fmt,
                              epilog="example: jaxlm convert jaxlm2hf --run runs/tiny "
                                     "--out hf/tiny",
                              help="jaxlm run (newest checkpoint) -> HF directory")
    j.add_argument("--run", required=True, help="run directory")
    j.add_argument("--out", required=True, help="new HF model directory")
    j.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written tensors")
    j.add_argument("--max-shard-size", type=_size_arg, default="5GB",
                   help="largest safetensors file; a larger model is written in shards "
                        "with model.safetensors.index.json (e.g. 5GB, 500MB)")
    j.add_argument("--adapters-only", action="store_true", help=ADAPTERS_ONLY_HELP)


ADAPTERS_ONLY_HELP = ("a LoRA run: write its adapters alone in HF PEFT's layout "
                      "(adapter_config.json + adapter_model.safetensors) instead of the base "
                      "weights with the adapters merged in")


def _export_args(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("--run", required=True, help="run directory")
    ex.add_argument("--out", required=True, help="new directory")
    ex.add_argument("--step", type=NON_NEGATIVE, default=None,
                    help="checkpoint step (default: newest)")
    ex.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="dtype of the exported parameters (default: the run's)")
    ex.add_argument("--adapters-only", action="store_true", help=ADAPTERS_ONLY_HELP)


def _compile_args(co: argparse.ArgumentParser) -> None:
    co.add_argument("--topology", required=True, type=_topology_arg,
                    help="e.g. v5e:4x4, v5p:4x4x4, v4:2x2x2")
    co.add_argument("--slices", type=POSITIVE, default=1,
                    help="slices of that topology joined by DCN (multislice); mesh.dcn_data "
                         "and mesh.dcn_fsdp say which axes cross them")
    co.add_argument("--config", default=None, help="config name or YAML path; default: tiny")
    co.add_argument("--json", action="store_true", help="print JSON instead of a table")
    co.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _bench_args(be: argparse.ArgumentParser) -> None:
    be.add_argument("--config", default=None, help="config name or YAML path; default: tiny")
    be.add_argument("--steps", type=POSITIVE, default=20, help="timed steps per round")
    be.add_argument("--rounds", type=POSITIVE, default=3,
                    help="timed rounds (the step time is the median round's)")
    be.add_argument("--warmup", type=NON_NEGATIVE, default=3,
                    help="untimed steps after compiling")
    be.add_argument("--json", action="store_true", help="print JSON instead of a table")
    be.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _profile_args(pf: argparse.ArgumentParser) -> None:
    which = pf.add_mutually_exclusive_group()
    which.add_argument("--run", default=None, help="run directory (its config, data, metrics "
                       "and newest checkpoint)")
    which.add_argument("--config", default=None,
                       help="config name or YAML path (without --run)")
    pf.add_argument("--steps", type=POSITIVE, default=10, help="timed steps")
    pf.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pf.add_argument("--out", default="", metavar="FILE.png", help="also draw a PNG figure")
    pf.add_argument("--trace", default=None, metavar="DIR",
                    help="also write a jax.profiler trace of a few more steps to DIR (for "
                         "XProf / TensorBoard's profile plugin)")
    pf.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _plot_args(pl: argparse.ArgumentParser) -> None:
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    pl.add_argument("--out", default="plot.png", metavar="FILE.png", help="the PNG to write")


def _runs_args(ru: argparse.ArgumentParser) -> None:
    ru.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                    help="folder searched for run directories")
    ru.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ru.description += (". Status: finished = reached train.steps; stopped = by a signal "
                       "(the same train command resumes); running = its process is alive; "
                       "failed = its process ended before train.steps; unreadable = its "
                       "config.yaml is damaged.")


# (name, function, help, arguments), in the order `jaxlm --help` lists them.
COMMANDS: list[tuple[str, Callable, str, Callable[[argparse.ArgumentParser], None]]] = [
    ("train", cmd_train, "train a model (resumes if run.dir holds a run)", _train_args),
    ("generate", cmd_generate, "sample text from a trained run", _generate_args),
    ("chat", cmd_chat, "chat with a trained decoder through its chat template, replies "
     "streamed as they are generated", _chat_args),
    ("eval", cmd_eval, "evaluate a run on its held-out data", _eval_args),
    ("prepare", cmd_prepare, "download, verify and cache a corpus, and tokenize a corpus "
     "(or --files, or an HF dataset) into its token store ahead of training", _prepare_args),
    ("convert", cmd_convert, "convert between HF model directories and jaxlm runs",
     _convert_args),
    ("export", cmd_export, "write a params-only copy of a run for inference", _export_args),
    ("compile", cmd_compile, "compile the sharded train step ahead of time for a TPU "
     "topology (needs the [tpu] extra; no TPU needed) and report per-chip memory, FLOPs per "
     "step and whether it fits; exit 1 if it does not", _compile_args),
    ("bench", cmd_bench, "time steady-state training of a configuration on random tokens: "
     "tokens/s, step time, compile time, MFU (PaLM formula and XLA cost analysis), peak "
     "memory per device", _bench_args),
    ("profile", cmd_profile, "the bottleneck report of a run or a configuration: input-, "
     "host-, compute- or memory-bound, communication per collective, memory split, gradient "
     "health (with --run)", _profile_args),
    ("plot", cmd_plot, "draw one PNG comparing runs: loss vs steps and tokens, eval loss, "
     "learning rate, gradient norm, throughput", _plot_args),
    ("runs", cmd_runs, "list the runs below a folder: preset, params, steps, best eval, "
     "tokens/s, last checkpoint, status", _runs_args),
]


def version_line() -> str:
    """'jaxlm 0.1.0 (jax 0.10.2, Python 3.11.7)', read without importing jax."""
    from importlib import metadata

    import jaxlm

    try:
        jax_version = metadata.version("jax")
    except metadata.PackageNotFoundError:
        jax_version = "not installed"
    return f"jaxlm {jaxlm.__version__} (jax {jax_version}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxlm", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Train, evaluate and sample Transformer language models with JAX.",
                epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    p.add_argument("--version", action="version", version=version_line(),
                   help="print jaxlm's version (and those of jax and Python) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, fn, help_text, add_arguments in COMMANDS:
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=_HelpFormatter, epilog=f"example: {EXAMPLES[name]}")
        sp.set_defaults(fn=fn)
        add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before JAX is imported (commands import it lazily): a run's wall time and its
    # train.time_budget count from here.
    started = time.time()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from jaxlm.train.health import TrainingDiverged

    parser = build_parser()
    # Overrides may come after flags (`train --config x a=b --quiet c=d`); argparse alone
    # stops collecting positionals at the first flag.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    args.started = started
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `jaxlm runs | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
