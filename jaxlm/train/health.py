"""Numerical health of a run, judged from the metrics fetched at each log step (so the
jitted step never syncs with the host): runs of non-finite steps and loss spikes."""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row and no way (or no wish) to roll back."""


class StepHealth:
    """Counts consecutive bad steps: skipped (non-finite) ones and losses more than `zscore`
    standard deviations above the mean of the last `window` good losses."""

    def __init__(self, max_bad_steps: int, zscore: float, window: int = 100, warmup: int = 20):
        self.max_bad_steps = max_bad_steps
        self.zscore = zscore
        self.window: deque[float] = deque(maxlen=window)
        self.warmup = warmup
        self.bad_run = 0
        self.first_bad_step: int | None = None  # of the current bad run
        self.rollbacks = 0

    def observe(self, metrics: list[dict[str, Any]], first_step: int) -> list[dict[str, Any]]:
        """Per-step metrics (device_get'd) for steps first_step, first_step+1, ... -> events."""
        events = []
        for i, m in enumerate(metrics):
            step, loss = first_step + i, float(m["loss"])
            if int(m["bad_step"]):
                self._bad(step)
                events.append({"step": step, "event": "bad_step", "loss": loss,
                               "grad_norm": float(m["grad_norm"]), "bad_run": self.bad_run})
                continue
            if self.zscore and len(self.window) >= self.warmup:
                mean = sum(self.window) / len(self.window)
                std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
                z = (loss - mean) / max(std, 1e-6)
                if z > self.zscore:
                    # A spike counts towards the bad run: a few in a row mean the parameters
                    # were damaged by finite updates, which the in-step guard cannot see.
                    self._bad(step)
                    events.append({"step": step, "event": "loss_spike", "loss": loss,
                                   "zscore": round(z, 2), "bad_run": self.bad_run})
                    continue
            self.reset()
            self.window.append(loss)
        return events

    def _bad(self, step: int) -> None:
        if self.bad_run == 0:
            self.first_bad_step = step
        self.bad_run += 1

    @property
    def in_bad_run(self) -> bool:
        return self.bad_run > 0

    @property
    def exhausted(self) -> bool:
        return self.bad_run >= self.max_bad_steps

    def reset(self) -> None:
        self.bad_run = 0
        self.first_bad_step = None
