"""`jaxlm runs`: a table of the run directories below a folder.

A run directory is a folder holding config.yaml (folders below it are not searched). Its
row comes from config.yaml, metrics.jsonl, checkpoints/ and summary.json, which the loop
writes when training starts (status `running`, the process id and host, the parameter count)
and rewrites when it ends. Parameter counts of runs without summary.json come from
`jax.eval_shape` of the model's init (no memory, no compute).

Best eval is the lowest `eval_loss` in metrics.jsonl (the loop's evaluations and those of
`jaxlm eval`); tokens/s is the median over the logged intervals after the first, which
includes compilation.

Status rules:
  finished  summary.json says finished (the loop reached train.steps), or, without
            summary.json, the last logged step is train.steps
  stopped   summary.json says stopped (a signal or preemption; the same command resumes),
            or, without summary.json, fewer steps and no file written for STALE_SECONDS
  running   summary.json says running and its process is alive (on this host: the pid
            exists; on another host: a run file changed within STALE_SECONDS), or, without
            summary.json, fewer steps and a file written within STALE_SECONDS
  failed    summary.json says running but the process is gone (a crash, kill -9, OOM)
  unreadable: <why>
            config.yaml is damaged (not YAML, an unknown key, a wrong type) or is not a
            jaxlm config; the other columns show what metrics.jsonl and checkpoints/ tell
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jaxlm.config import Config, ConfigError
from jaxlm.train import rundir

STALE_SECONDS = 900


class RunsError(ValueError):
    """A folder that does not exist or holds no runs; the CLI exits with code 2."""


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows, skipping a line that is cut short (a run still writing)."""
    return rundir.read_metrics(run_dir)


def as_float(v: Any) -> float:
    """A metrics value as a float; 'nan'/'inf' strings (how rows store them) included."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def find_runs(root: str | Path) -> list[Path]:
    """Run directories (holding config.yaml) at or below `root`, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise RunsError(f"'{root}' is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if rundir.CONFIG_FILE in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # a run's own folders (checkpoints, tokenizer) hold no runs
        else:
            dirnames.sort()
    return sorted(found)


def checkpoint_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / rundir.CHECKPOINT_DIR
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and p.is_dir())


def count_params(cfg: Config) -> int:
    """Parameters of the configured model from eval_shape: shapes only, nothing allocated."""
    import functools

    import flax.linen as nn
    import jax

    from jaxlm.families import registry

    family = registry.of(cfg.model)
    init = functools.partial(family.build_model(cfg.model).init,
                             {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)})
    shapes = jax.eval_shape(init, *family.init_inputs())
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)["params"]))


def _last_write(run_dir: Path) -> float:
    files = [run_dir / rundir.METRICS_FILE, run_dir / rundir.SUMMARY_FILE]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def status_of(run_dir: Path, summary: dict[str, Any], steps: int, total: int,
              now: float | None = None) -> str:
    """finished | stopped | running | failed, by the rules in the module docstring."""
    recent = (now or time.time()) - _last_write(run_dir) < STALE_SECONDS
    state = summary.get("status")
    if state in ("finished", "stopped"):
        return state
    if state == "running":
        if summary.get("host") == socket.gethostname() and isinstance(summary.get("pid"), int):
            return "running" if _pid_alive(summary["pid"]) else "failed"
        return "running" if recent else "failed"
    if steps >= total:
        return "finished"
    return "running" if recent else "stopped"


@dataclass
class RunInfo:
    name: str
    path: str
    preset: str
    params: int | None
    steps: int
    total_steps: int | None
    best_eval_loss: float
    tokens_per_sec: float
    last_checkpoint: int | None
    status: str


def _logged_steps(rows: list[dict[str, Any]]) -> list[int]:
    steps = [as_float(r["step"]) for r in rows if "step" in r]
    return [int(s) for s in steps if math.isfinite(s)]


def run_info(run_dir: Path, root: Path) -> RunInfo:
    """One row of the table for `run_dir` (named by its path relative to `root`). A run whose
    config.yaml cannot be read gets the status "unreadable: <why>" and what the other files
    tell."""
    rows = read_rows(run_dir)
    summary = rundir.read_summary(run_dir)
    ckpts = checkpoint_steps(run_dir)
    steps = max(_logged_steps(rows) + ckpts + [0])
    evals = [as_float(r["eval_loss"]) for r in rows if "eval_loss" in r]
    evals = [e for e in evals if math.isfinite(e)]
    # The first logged interval includes compilation, so it is left out when there are more.
    tps = [as_float(r["tokens_per_sec"]) for r in rows if "tokens_per_sec" in r]
    tps = [t for t in (tps[1:] if len(tps) > 1 else tps) if math.isfinite(t)]
    params = summary.get("params")
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    info = RunInfo(name=name, path=str(run_dir), preset="-",
                   params=params if isinstance(params, int) else None, steps=steps,
                   total_steps=None, best_eval_loss=min(evals) if evals else float("nan"),
                   tokens_per_sec=statistics.median(tps) if tps else float("nan"),
                   last_checkpoint=ckpts[-1] if ckpts else None, status="")
    try:
        cfg = rundir.load_config(run_dir)
    except ConfigError as e:
        info.status = f"unreadable: {getattr(e, 'reason', e)}"
        return info
    if info.params is None:
        info.params = count_params(cfg)
    info.preset, info.total_steps = cfg.model.preset, cfg.train.steps
    info.status = status_of(run_dir, summary, steps, cfg.train.steps)
    return info


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every run directory at or below `root`; one whose config.yaml is damaged (or is not a
    jaxlm config) is listed with the status "unreadable: <why>"."""
    root = Path(root)
    return [run_info(run_dir, root) for run_dir in find_runs(root)]


def _fmt(v: float, spec: str) -> str:
    return "-" if not math.isfinite(v) else format(v, spec)


def format_table(infos: list[RunInfo]) -> str:
    from jaxlm.train.report import human

    head = ("run", "preset", "params", "steps", "best eval", "tokens/s", "checkpoint", "status")
    body = [(i.name, i.preset, "-" if i.params is None else human(i.params),
             f"{i.steps}/{'?' if i.total_steps is None else i.total_steps}",
             _fmt(i.best_eval_loss, ".4f"), _fmt(i.tokens_per_sec, ",.0f"),
             "-" if i.last_checkpoint is None else str(i.last_checkpoint), i.status)
            for i in infos]
    widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]
    right = {2, 3, 4, 5, 6}  # numbers align right

    def line(r: tuple[str, ...]) -> str:
        cells = [r[c].rjust(w) if c in right else r[c].ljust(w) for c, w in enumerate(widths)]
        return "  ".join(cells).rstrip()

    return "\n".join([line(head), *(line(r) for r in body)])


def to_json(infos: list[RunInfo]) -> str:
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in asdict(i).items()} for i in infos]
    return json.dumps(clean, indent=2)
