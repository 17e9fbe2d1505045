"""The `jaxlm` command. User errors exit with code 2 and one short message, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXAMPLES = {
    "train": "jaxlm train train.steps=200 model.num_layers=2 run.dir=runs/quick",
    "generate": 'jaxlm generate --run runs/tiny --prompt "ROMEO:" --max-new-tokens 200',
    "eval": "jaxlm eval --run runs/mt --task translate --beams 4",
    "prepare": "jaxlm prepare shakespeare",
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
    cfg, run_dir, resuming = rundir.resolve(args.config, overrides)
    if args.print_config:
        print(config_lib.dump(cfg), end="")
        return 0
    from jaxlm import distributed

    # Before anything touches a JAX backend: join the other processes, if there are any.
    distributed.initialize(distributed.detect(args.coordinator, args.num_processes,
                                              args.process_id), args.init_timeout)
    import jax

    from jaxlm.train.loop import format_summary, train

    summary = train(cfg, run_dir, resuming)
    if not cfg.run.quiet and jax.process_index() == 0:
        print(format_summary(summary))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import jaxlm

    lm = jaxlm.load(args.run)
    texts = lm.generate([args.prompt] * args.num_samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, beams=args.beams, length_penalty=args.length_penalty)
    # A decoder continues the prompt; an encoder-decoder's output stands alone.
    prefix = "" if lm.config.model.family == "encoder_decoder" else args.prompt
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(prefix + text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
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
    from jaxlm.data.prepare import prepare

    corpus = prepare(args.name, progress=not args.quiet)
    for split in ("train", "valid", "test"):
        path = getattr(corpus, split)
        if path is not None:
            print(f"{split:6s} {path} ({path.stat().st_size:,} bytes)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxlm.convert import run

    if args.direction == "hf2jaxlm":
        out = run.hf_to_run(args.hf, args.out, args.overrides)
    else:
        out = run.run_to_hf(args.run, args.out)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxlm.api import export

    print(f"wrote {export(args.run, args.out, args.step)} (params only; jaxlm.load reads it)")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import json

    from jaxlm import config as config_lib
    from jaxlm.aot import compile_for_topology

    cfg = config_lib.load(args.config, args.overrides)
    report = compile_for_topology(cfg, args.topology)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0 if report.fits is not False else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from jaxlm import config as config_lib
    from jaxlm.bench import bench

    cfg = config_lib.load(args.config, args.overrides)
    result = bench(cfg, steps=args.steps, warmup=args.warmup)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from jaxlm import config as config_lib
    from jaxlm import profile

    if args.run:
        report = profile.from_run(args.run, steps=args.steps, overrides=args.overrides)
    else:
        cfg = config_lib.load(args.config, args.overrides)
        report = profile.profile(cfg, steps=args.steps)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    if args.out:
        print(f"wrote {profile.figure(report, args.out)}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = argparse.ArgumentParser(
        prog="jaxlm", formatter_class=fmt,
        description="Train, evaluate and sample Transformer language models with JAX.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt,
                            epilog=f"example: {EXAMPLES[name]}")
        sp.set_defaults(fn=fn)
        return sp

    t = add("train", cmd_train, "train a model (resumes if run.dir holds a run)")
    t.add_argument("--config", default=None,
                   help="config name (see configs/) or YAML path; default: tiny")
    t.add_argument("--print-config", action="store_true", help="print the resolved config")
    t.add_argument("--help-config", action="store_true", help="list every config key")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bar, model summary or final summary (= run.quiet=true)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    d = t.add_argument_group("multi-process runs (default: detected from JAXLM_*/JAX_* "
                             "coordinator variables, SLURM, or a Cloud TPU VM)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    d.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    d.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    d.add_argument("--init-timeout", type=float, default=None, metavar="S",
                   help="give up (exit 2) if the processes have not all joined after S "
                        "seconds (default: $JAXLM_INIT_TIMEOUT or 300)")

    g = add("generate", cmd_generate, "sample text from a trained run")
    g.add_argument("--run", required=True, help="run directory")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--num-samples", type=int, default=1, help="samples to draw")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--beams", type=int, default=1,
                   help="beam search width (encoder-decoder models; 1 = greedy/sampling)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks by score / length**this (0 = raw log-prob)")

    e = add("eval", cmd_eval, "evaluate a run on its held-out data")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--max-batches", type=int, default=0, help="0 = the whole validation split")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--task", choices=("lm", "translate", "summarize", "qa"), default="lm",
                   help="lm: loss/perplexity/bits per byte; translate: BLEU+chrF (with the "
                        "copy-the-source baseline); summarize: ROUGE; qa: SQuAD EM/F1")
    e.add_argument("--split", choices=("test", "valid"), default="test",
                   help="held-out pairs of a prepared corpus (test falls back to valid)")
    e.add_argument("--max-examples", type=int, default=0, help="0 = every held-out pair")
    e.add_argument("--beams", type=int, default=1, help="beam width for generation tasks")
    e.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks by score / length**this")
    e.add_argument("--max-new-tokens", type=int, default=0,
                   help="longest output of generation tasks (0 = 32 for qa, else the "
                        "training target length)")

    r = add("prepare", cmd_prepare, "download, verify and cache a corpus")
    r.add_argument("name", help="corpus name, e.g. shakespeare")
    r.add_argument("--quiet", action="store_true", help="no progress output")

    c = add("convert", cmd_convert, "convert between HF model directories and jaxlm runs")
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

    ex = add("export", cmd_export, "write a params-only copy of a run for inference")
    ex.add_argument("--run", required=True, help="run directory")
    ex.add_argument("--out", required=True, help="new directory")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")

    co = add("compile", cmd_compile, "compile the sharded train step ahead of time for a TPU "
             "topology (needs the [tpu] extra; no TPU needed) and report per-chip memory, "
             "FLOPs per step and whether it fits; exit 1 if it does not")
    co.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5p:4x4x4, v4:2x2x2")
    co.add_argument("--config", default=None, help="config name or YAML path; default: tiny")
    co.add_argument("--json", action="store_true", help="print JSON instead of a table")
    co.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    be = add("bench", cmd_bench, "time steady-state training of a configuration on random "
             "tokens: tokens/s, step time, compile time, MFU (PaLM formula and XLA cost "
             "analysis), peak memory per device")
    be.add_argument("--config", default=None, help="config name or YAML path; default: tiny")
    be.add_argument("--steps", type=int, default=20, help="timed steps")
    be.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    be.add_argument("--json", action="store_true", help="print JSON instead of a table")
    be.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    pf = add("profile", cmd_profile, "the bottleneck report of a run or a configuration: "
             "input-, host-, compute- or memory-bound, communication per collective, memory "
             "split, gradient health (with --run)")
    pf.add_argument("--run", default=None, help="run directory (its config, data, metrics "
                    "and newest checkpoint)")
    pf.add_argument("--config", default=None, help="config name or YAML path (without --run)")
    pf.add_argument("--steps", type=int, default=10, help="timed steps")
    pf.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pf.add_argument("--out", default="", metavar="FILE.png", help="also draw a PNG figure")
    pf.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    pl = add("plot", cmd_plot, "draw one PNG comparing runs: loss vs steps and tokens, eval "
             "loss, learning rate, gradient norm, throughput")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    pl.add_argument("--out", default="plot.png", metavar="FILE.png", help="the PNG to write")

    ru = add("runs", cmd_runs, "list the runs below a folder: preset, params, steps, best "
             "eval, tokens/s, last checkpoint, status")
    ru.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                    help="folder searched for run directories")
    ru.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ru.description += (". Status: finished = reached train.steps; stopped = by a signal "
                       "(the same train command resumes); running = its process is alive; "
                       "failed = its process ended before train.steps.")
    return p


def main(argv: list[str] | None = None) -> int:
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
