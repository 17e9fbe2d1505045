"""Experiment trackers that each metrics row fans out to, next to metrics.jsonl (the record
of truth): TensorBoard event files in the run directory (always) and Weights & Biases (when
`run.wandb=true` and the `wandb` package is importable; it is never required).

Every numeric key of a row becomes a scalar at the row's `step`: `eval_<name>` keys are
logged as `eval/<name>` (so `eval_loss` -> `eval/loss`), every other key as `train/<key>`
(`train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_sec`, and MFU or memory
when a row carries them). Rows that record an event (`{"event": "loss_spike", ...}`) go under
`events/<event>/<key>`, apart from the curves: they may name an earlier step, and TensorBoard
drops a tag's later points when that tag steps backwards. `tensorboard --logdir runs` lists
each run by its directory.
"""

from __future__ import annotations

import numbers
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol

from jaxlm import config as config_lib
from jaxlm.config import Config
from jaxlm.data.paths import as_path, is_remote

SKIP_KEYS = ("step", "time")
WANDB_ID_FILE = "wandb_id"


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def tag_for(key: str) -> str:
    """`eval_loss` -> `eval/loss`; `loss` -> `train/loss`."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric values (bools and strings left out) under their tracker tags."""
    values = {k: float(v) for k, v in row.items()
              if k not in SKIP_KEYS and isinstance(v, numbers.Real) and not isinstance(v, bool)}
    if "event" in row:
        return {f"events/{row['event']}/{k}": v for k, v in values.items()}
    return {tag_for(k): v for k, v in values.items()}


def _summary_writer_class() -> type:
    """tensorboardX.SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed only to accept torch tensors, which are never passed here, and that import
    costs seconds of CPU per run."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardTracker:
    """Writes event files into `logdir`, opened at the first row. On a resumed run the first
    row's step is TensorBoard's purge step, so curves of the replayed steps are not doubled."""

    def __init__(self, logdir: str | Path):
        self.logdir = as_path(logdir)  # tensorboardX writes gs:// itself
        self._writer = None

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if self._writer is None:
            resumed = any(self.logdir.glob("events.out.tfevents.*"))
            self._writer = _summary_writer_class()(logdir=str(self.logdir),
                                                   purge_step=step if resumed else None)
        for tag, value in scalars(row).items():
            self._writer.add_scalar(tag, value, step, walltime=row.get("time"))
        self._writer.flush()  # rows come every log_every steps: cheap, and live in TensorBoard

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbTracker:
    """Logs to a W&B run whose id is kept in the run directory, so a resume continues it.
    W&B steps only go forward: an event about an earlier step is logged at the latest step
    (its own step is in `events/<event>/step`), and steps replayed after a resume or a
    rollback are dropped by W&B until the run passes its latest step again."""

    def __init__(self, cfg: Config, run_dir: Path, wandb: Any):
        self.cfg, self.run_dir, self._wandb = cfg, as_path(run_dir), wandb
        self._run = None
        self._last_step = 0

    def _open(self) -> Any:
        id_file = self.run_dir / WANDB_ID_FILE
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16] + "\n")
        return self._wandb.init(project=self.cfg.run.wandb_project, name=self.run_dir.name,
                                id=id_file.read_text().strip(), resume="allow",
                                # W&B keeps its files in a local folder (its default: ./wandb)
                                dir=None if is_remote(self.run_dir) else str(self.run_dir),
                                config=config_lib.to_dict(self.cfg))

    def log(self, row: dict[str, Any]) -> None:
        if self._run is None:
            self._run = self._open()
        step, data = int(row["step"]), scalars(row)
        if "event" in row:
            data[f"events/{row['event']}/step"] = float(step)
            step = max(step, self._last_step)
        self._last_step = max(self._last_step, step)
        self._run.log(data, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_trackers(cfg: Config, run_dir: Path) -> list[Tracker]:
    """TensorBoard always; W&B when enabled and installed (a warning, not an error, if not)."""
    trackers: list[Tracker] = [TensorBoardTracker(run_dir)]
    if cfg.run.wandb:
        try:
            import wandb
        except ImportError:
            print("warning: run.wandb=true but the wandb package is not installed "
                  "(pip install wandb); logging to TensorBoard and metrics.jsonl only",
                  file=sys.stderr)
        else:
            trackers.append(WandbTracker(cfg, run_dir, wandb))
    return trackers
