"""The `jaxlm` command. User errors exit with code 2 and one short message, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXAMPLES = {
    "train": "jaxlm train train.steps=200 model.num_layers=2 run.dir=runs/quick",
    "generate": 'jaxlm generate --run runs/tiny --prompt "ROMEO:" --max-new-tokens 200',
    "eval": "jaxlm eval --run runs/tiny",
    "prepare": "jaxlm prepare shakespeare",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxlm.checkpoint import CheckpointError
    from jaxlm.config import ConfigError
    from jaxlm.data.pipeline import DataError
    from jaxlm.data.prepare import PrepareError
    from jaxlm.data.tokenizers import TokenizerError

    return (ConfigError, DataError, PrepareError, TokenizerError, CheckpointError)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxlm import config as config_lib

    if args.help_config:
        for key, tname, default, help_text in config_lib.describe():
            print(f"{key:28s} {tname:10s} {default!r:14} {help_text}")
        return 0
    from jaxlm.train import rundir

    cfg, run_dir, resuming = rundir.resolve(args.config, args.overrides)
    if args.print_config:
        print(config_lib.dump(cfg), end="")
        return 0
    from jaxlm.train.loop import format_summary, train

    summary = train(cfg, run_dir, resuming)
    if not cfg.run.quiet:
        print(format_summary(summary))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import jaxlm

    lm = jaxlm.load(args.run)
    texts = lm.generate([args.prompt] * args.num_samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxlm.evaluate import evaluate_run

    results = evaluate_run(args.run, max_batches=args.max_batches)
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


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
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
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    g = add("generate", cmd_generate, "sample text from a trained run")
    g.add_argument("--run", required=True, help="run directory")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--num-samples", type=int, default=1, help="samples to draw")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")

    e = add("eval", cmd_eval, "evaluate a run on its held-out data")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--max-batches", type=int, default=0, help="0 = the whole validation split")

    r = add("prepare", cmd_prepare, "download, verify and cache a public-domain corpus")
    r.add_argument("name", help="corpus name, e.g. shakespeare")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
