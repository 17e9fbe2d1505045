"""`jaxlm plot`: one PNG comparing runs from their metrics.jsonl and config.yaml.

Panels: loss against steps and against tokens (train solid, evaluation dashed with dots),
learning rate, gradient norm, throughput, and a table of each run's final numbers. Tokens
are step × train.batch_size × train.seq_len of each run's config. A step logged twice (a
resumed or rolled-back run replays steps after its checkpoint) keeps its latest value. Rows
written by `jaxlm eval` (kind=eval, the whole validation split) and event rows (loss spikes,
rollbacks) are left out of the curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxlm.runs import as_float, read_rows
from jaxlm.train import rundir

FIGSIZE = (15.0, 8.0)
DPI = 100


class PlotError(ValueError):
    """No run to plot; the CLI exits with code 2."""


@dataclass
class Curves:
    name: str
    tokens_per_step: int
    rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key`, sorted by step, the last write of a step winning."""
        by_step: dict[int, float] = {}
        for r in self.rows:
            if key in r and "step" in r and r.get("kind") != "eval" and "event" not in r:
                by_step[int(r["step"])] = as_float(r[key])
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, with parent folders added until the names are distinct."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]


def check_figure_path(out: str | Path, parents_must_exist: bool = False) -> Path:
    """`out` as a path matplotlib can write a figure to, checked before any work is done:
    not a directory, no file among its parent folders (which must exist if
    `parents_must_exist`), and a format matplotlib knows (from the suffix)."""
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out)
    if out.is_dir():
        raise PlotError(f"--out '{out}' is a directory; give a file name such as plot.png")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise PlotError(f"cannot write '{out}': '{parent}' is a file, not a folder")
    if parents_must_exist and not out.parent.is_dir():
        raise PlotError(f"cannot write '{out}': the folder '{out.parent}' does not exist")
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        what = f"unknown figure format '{out.suffix}'" if out.suffix else "no file suffix"
        raise PlotError(f"cannot write '{out}': {what}; use one of "
                        + ", ".join(f".{f}" for f in sorted(formats)))
    return out


def load_curves(run_dirs: list[str | Path]) -> list[Curves]:
    dirs = [Path(d) for d in run_dirs]
    out = []
    for d, name in zip(dirs, run_names(dirs)):
        cfg = rundir.load_config(d)  # ConfigError (exit 2) if it is not a run directory
        out.append(Curves(name, cfg.train.batch_size * cfg.train.seq_len, read_rows(d)))
    if not any(c.series("loss")[0] for c in out):
        raise PlotError("none of the runs has logged a training step yet (empty metrics.jsonl)")
    return out


def _last(values: list[float]) -> float:
    return values[-1] if values else float("nan")


def _num(v: float, spec: str = ".4f") -> str:
    return format(v, spec) if math.isfinite(v) else "-"


def plot_runs(run_dirs: list[str | Path], out: str | Path = "plot.png") -> Path:
    """Draws the comparison of `run_dirs` into the PNG `out` and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from jaxlm.train.report import human

    out = check_figure_path(out)
    curves = load_curves(run_dirs)
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    (ax_step, ax_tok, ax_lr), (ax_gn, ax_tps, ax_tab) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    table = []
    for i, c in enumerate(curves):
        colour = colours[i % len(colours)]
        steps, loss = c.series("loss")
        esteps, eloss = c.series("eval_loss")
        for ax, scale in ((ax_step, 1), (ax_tok, c.tokens_per_step)):
            ax.plot([s * scale for s in steps], loss, color=colour, lw=1.4,
                    label=f"{c.name} train")
            if esteps:
                ax.plot([s * scale for s in esteps], eloss, color=colour, ls="--", marker="o",
                        ms=4, label=f"{c.name} eval")
        for ax, key in ((ax_lr, "lr"), (ax_gn, "grad_norm"), (ax_tps, "tokens_per_sec")):
            ax.plot(*c.series(key), color=colour, lw=1.4, label=c.name)
        finite = [e for e in eloss if math.isfinite(e)]
        table.append([c.name, str(steps[-1] if steps else 0), _num(_last(loss)),
                      _num(min(finite) if finite else float("nan")),
                      _num(_last(c.series("tokens_per_sec")[1]), ",.0f")])
    titles = [(ax_step, "loss vs step", "step", "loss"),
              (ax_tok, "loss vs tokens", "tokens", "loss"),
              (ax_lr, "learning rate", "step", "lr"),
              (ax_gn, "gradient norm (before clipping)", "step", "global norm"),
              (ax_tps, "throughput", "step", "tokens/s")]
    for ax, title, xlabel, ylabel in titles:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    readable = FuncFormatter(lambda v, _: human(v))  # 1.5M, not 1.5e6 in the corner
    ax_tok.xaxis.set_major_formatter(readable)
    ax_tps.yaxis.set_major_formatter(readable)
    ax_tab.axis("off")
    ax_tab.set_title("runs")
    tab = ax_tab.table(cellText=table, loc="center",
                       colLabels=["run", "steps", "last loss", "best eval", "tokens/s"])
    tab.auto_set_font_size(False)
    tab.set_fontsize(9)
    tab.scale(1.0, 1.6)
    tab.auto_set_column_width(list(range(5)))
    for i in range(len(table)):  # the run's name in its line colour
        tab[i + 1, 0].get_text().set_color(colours[i % len(colours)])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
