"""Profiler traces (jax.profiler) of a window of train steps, written where TensorBoard's
profile plugin and XProf look for them: <dir>/plugins/profile/<run>/<host>.xplane.pb (with a
<host>.trace.json.gz that Perfetto opens). Each step is a `StepTraceAnnotation` named "train",
so the tools split the timeline by step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

RUN_SUBDIR = "profile"  # a run directory's traces
STEP_NAME = "train"


def step(number: int) -> Any:
    """The annotation around one train step (near-free while no trace is recording)."""
    return jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=number)


def start(log_dir: str | Path) -> None:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(log_dir))


def stop(work: Any = None) -> None:
    """Waits for `work` (the state of the last traced step), then ends the trace."""
    if work is not None:
        jax.block_until_ready(work)
    jax.profiler.stop_trace()


def trace_files(log_dir: str | Path) -> list[Path]:
    """The traces under `log_dir`, oldest first."""
    return sorted(Path(log_dir).glob("plugins/profile/*/*.xplane.pb"))


def how_to_open(log_dir: str | Path) -> str:
    return (f"xprof --logdir {log_dir} (pip install xprof), or tensorboard --logdir {log_dir} "
            "with xprof installed: Profile tab")
