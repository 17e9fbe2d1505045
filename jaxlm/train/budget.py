"""train.time_budget: plan the step count so that the whole run ends within the budget.

A fresh run first measures what its parts cost on a copy of its initial state (for those
moments, twice its memory): compiling and a few train steps with their batches, an
evaluation, a checkpoint save, the end sample. It plans the most steps (up to train.steps)
that fit, and trains from the initial state with the learning-rate schedule of the planned
count. That count is an argument of the compiled step (nothing is compiled again) and the
optimizer state does not depend on it: the run is exactly the run of `train.steps=<planned>`.
The plan goes into config.yaml (train.steps) and metrics.jsonl (a `time_budget` event); a
resumed run keeps it and never plans again.

With optim.schedule=wsd the lr of every step before the decay does not depend on the step
count, so a fresh run plans again at each log step while its lr is held (`Replan`), from the
pace the loop itself keeps: a machine that turns slower or faster after the first measurement
still ends within the budget with its lr decayed, and the run is still exactly the run of
its final count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxlm import sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.data.paths import as_path
from jaxlm.data.setup import TrainData
from jaxlm.evaluate import heldout_metrics
from jaxlm.optim import decay_start
from jaxlm.setup import StepSetup
from jaxlm.train import rundir
from jaxlm.train.hooks import Hook, Progress, is_main, say
from jaxlm.train.state import TrainState

EVENT = "time_budget"
# Train steps are timed after the compiling one in rounds of MEASURED_STEPS until
# WARMUP_SECONDS have passed (at most 20 rounds), then in ROUNDS rounds of about
# ROUND_SECONDS each.
MEASURED_STEPS = 5
WARMUP_SECONDS = 0.5
ROUNDS = 5
ROUND_SECONDS = 0.6
# Kept free of the plan: what is not measured (writing the config and summaries, opening the
# trackers, the end of the process) and the jitter of the step time.
RESERVE_SHARE = 0.03
RESERVE_SECONDS = 2.0
# A re-plan (optim.schedule=wsd) changes the step count only when that moves the predicted
# end by at least this much: smaller changes are the pace's jitter.
REPLAN_SECONDS = 1.0


@dataclass
class Costs:
    """Seconds each part of a run takes, as measured before training."""

    setup: float  # from the start of the run to the end of planning, measuring included
    compile: float  # compiling the train step, a part of `setup`: the run reuses the program
    step: float  # one train step with its batch
    eval: float  # one evaluation, all its batches
    save: float  # one checkpoint save
    sample: float  # the end-of-training sample (0 without one)

    def describe(self) -> str:
        return (f"setting up and measuring {self.setup:.1f} s (compiling {self.compile:.1f} "
                f"s), a step {self.step * 1e3:.1f} ms, an evaluation {self.eval:.2f} s, a "
                f"checkpoint {self.save:.2f} s, the sample {self.sample:.2f} s")


def times_due(steps: int, every: int) -> int:
    """How often a hook due every `every` steps and at the last step runs in `steps` steps."""
    return 1 if every <= 0 else -(-steps // every)


def predicted_seconds(steps: int, costs: Costs, eval_every: int, save_every: int) -> float:
    """The wall time of a run of `steps` steps, from its start to its end sample."""
    return (costs.setup + steps * costs.step + costs.sample
            + times_due(steps, eval_every) * costs.eval + times_due(steps, save_every) * costs.save)


def plan_steps(costs: Costs, budget: float, max_steps: int, eval_every: int,
               save_every: int) -> int:
    """The most steps, up to `max_steps`, whose run is predicted to end within `budget` less
    the reserve; 0 when not even one fits."""
    limit = budget * (1 - RESERVE_SHARE) - RESERVE_SECONDS
    lo, hi = 0, max_steps
    while lo < hi:  # predicted_seconds grows with the step count: bisect for the last fit
        mid = (lo + hi + 1) // 2
        if predicted_seconds(mid, costs, eval_every, save_every) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _measure_steps(setup: StepSetup, data: TrainData, state: TrainState) -> tuple[float, float,
                                                                                   TrainState]:
    """(compile seconds, seconds per step, the state after the steps)."""
    def run(position):
        nonlocal state
        batch = sharding.host_batch_to_global(data.train.batch(position), setup.mesh)
        state, metrics = setup.train_step(state, batch)
        return metrics

    first = _timed(lambda: run(0))
    done, seconds = 0, 0.0
    while seconds < WARMUP_SECONDS and done < 20 * MEASURED_STEPS:  # a first estimate
        first_position = done + 1
        seconds += _timed(lambda p=first_position: [run(p + i) for i in range(MEASURED_STEPS)])
        done += MEASURED_STEPS
    # Then asynchronous rounds of about ROUND_SECONDS, dispatched as the loop dispatches
    # (small steps are not charged a pipeline drain each); their median resists a burst of
    # other work on the machine.
    count = min(int(ROUND_SECONDS * done / seconds), 2000)
    if count < 2 * MEASURED_STEPS:  # long steps: a drain is negligible beside one
        return max(first - seconds / done, 0.0), seconds / done, state
    per_step = []
    for _ in range(ROUNDS):
        first_position = done + 1
        per_step.append(_timed(lambda p=first_position: [run(p + i) for i in range(count)])
                        / count)
        done += count
    step = float(np.median(per_step))
    return max(first - step, 0.0), step, state


def _measure_eval(setup: StepSetup, data: TrainData, params: Any, batches: int) -> float:
    """One evaluation of `batches` batches, from one batch timed after compiling."""
    def evaluate():
        return heldout_metrics(setup.eval_step, params, data, setup.mesh, 1)

    _timed(evaluate)
    return batches * _timed(evaluate)


def _measure_save(state: TrainState, run_dir: Path) -> float:
    """One synchronous save (an upper bound on an asynchronous one) into the run directory,
    deleted after; every process writes its shards there, as into the run's checkpoints."""
    probe = as_path(run_dir) / ".time-budget-probe"
    if jax.process_index() == 0:
        _remove(probe)  # left by a run that was killed here
    _sync("jaxlm time budget probe: start")
    ckpt = Checkpointer(probe, keep=1, async_save=False)
    try:
        return _timed(lambda: ckpt.save(0, state, {"position": 0}, force=True))
    finally:
        ckpt.close()
        _sync("jaxlm time budget probe: end")
        if jax.process_index() == 0:
            _remove(probe)


def _remove(folder: epath.Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmtree(missing_ok=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _largest(values: np.ndarray) -> np.ndarray:
    """The elementwise largest `values` of all processes, so that every process plans
    alike."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.max(multihost_utils.process_allgather(values), axis=0)


def _agreed(costs: Costs) -> Costs:
    """Every process plans from the largest cost any of them measured."""
    return Costs(*_largest(np.asarray(dataclasses.astuple(costs), np.float64)).tolist())


@dataclass
class Plan:
    steps: int
    max_steps: int
    budget: float
    costs: Costs
    predicted: float  # seconds the planned run is predicted to take

    def row(self) -> dict[str, Any]:
        """The metrics.jsonl event; a resumed run reads `planned_steps` and `max_steps`."""
        seconds = {f"{k}_seconds": round(v, 4) for k, v in dataclasses.asdict(self.costs).items()}
        return {"step": 0, "event": EVENT, "time_budget": self.budget,
                "planned_steps": self.steps, "max_steps": self.max_steps, **seconds,
                "predicted_seconds": round(self.predicted, 3)}

    def describe(self) -> str:
        return (f"train.time_budget={self.budget:g}s: {self.steps} of at most "
                f"{self.max_steps} steps fit, predicted to end after {self.predicted:.0f} s "
                f"({self.costs.describe()})")


def _measure(setup: StepSetup, data: TrainData, state: TrainState, run_dir: Path,
             sample: Callable[[Any], str] | None) -> Costs:
    """What the run's parts cost, measured on a copy of `state`; `setup` is left 0 for the
    caller."""
    state = jax.tree.map(jnp.copy, state)  # the train step donates (consumes) its input
    compile_s, step_s, state = _measure_steps(setup, data, state)
    batches = min(setup.cfg.train.eval_batches, data.valid.batches_per_epoch)
    eval_s = _measure_eval(setup, data, setup.eval_inputs(state), batches)
    save_s = _measure_save(state, run_dir)
    sample_s = 0.0
    if sample is not None:  # the end sample reuses the decoding this first one compiles
        _timed(lambda: sample(state.params))
        sample_s = _timed(lambda: sample(state.params))
    return Costs(setup=0.0, compile=compile_s, step=step_s, eval=eval_s, save=save_s,
                 sample=sample_s)


def kept_plan(run_dir: Path) -> dict[str, Any] | None:
    """The newest time_budget event of a run directory's metrics, if any."""
    rows = [r for r in rundir.read_metrics(run_dir) if r.get("event") == EVENT]
    return rows[-1] if rows else None


def plan_run(setup: StepSetup, data: TrainData, state: TrainState, *, resumed: bool,
             run_dir: Path, t_start: float,
             sample: Callable[[Any], str] | None) -> tuple[StepSetup, Plan | None]:
    """(setup, plan) to train `state` with. A fresh run with train.time_budget > 0 is
    planned. A resumed run keeps the plan it started with, unless train.steps now asks for
    another count than that plan's limit."""
    t = setup.cfg.train
    if resumed:
        kept = kept_plan(run_dir)
        same_command = kept is not None and kept.get("max_steps") == t.steps
        if same_command and kept["planned_steps"] != t.steps:
            return setup.with_steps(int(kept["planned_steps"])), None
        return setup, None
    if t.time_budget <= 0:
        return setup, None
    costs = _measure(setup, data, state, run_dir, sample)
    costs = _agreed(dataclasses.replace(costs, setup=time.time() - t_start))
    every = (t.eval_every, setup.cfg.checkpoint.every)
    steps = plan_steps(costs, t.time_budget, t.steps, *every)
    if steps == 0:
        raise ConfigError(
            f"train.time_budget={t.time_budget:g} is too short here: one step would end "
            f"after {predicted_seconds(1, costs, *every):.1f} s ({costs.describe()}); raise "
            "it, or set 0 to train train.steps steps")
    plan = Plan(steps, t.steps, t.time_budget, costs, predicted_seconds(steps, costs, *every))
    return setup.with_steps(steps), plan


def times_before(step: int, every: int) -> int:
    """How many steps of 1..step-1 are multiples of `every` (a hook's runs before `step`)."""
    return 0 if every <= 0 else (step - 1) // every


def replans(cfg: Config, plan: Plan | None) -> bool:
    """Whether a fresh run's plan is re-planned as it trains: optim.schedule=wsd, and the
    planned count leaves its warmup whole (the warmup's length would change with it)."""
    return plan is not None and cfg.optim.schedule == "wsd" and plan.steps > cfg.optim.warmup_steps


class Replan(Hook):
    """optim.schedule=wsd under train.time_budget: at each log step while the lr is held,
    plans the step count again from the loop's own pace since its first log step (its
    evaluations and checkpoints taken out at their measured cost), keeping the count at
    least long enough that the lr so far is the new count's too. Runs after the Log hook,
    whose fetch of the step metrics waits for the devices, so the clock reads finished steps.
    A changed count is written where the first plan was (metrics.jsonl, config.yaml)."""

    def __init__(self, plan: Plan, cfg: Config, run_dir: Path, writer: rundir.MetricsWriter,
                 bar: Any, t_start: float) -> None:
        self.plan, self.cfg, self.run_dir, self.writer, self.bar = plan, cfg, run_dir, writer, bar
        self.t_start = t_start
        self.every = (cfg.train.eval_every, cfg.checkpoint.every)
        self.origin: tuple[int, float] | None = None  # (step, time) the pace is measured from

    def due(self, p: Progress) -> bool:
        return p.step % self.cfg.train.log_every == 0 and p.step <= decay_start(
            self.cfg.optim, p.total)

    def run(self, p: Progress) -> None:
        now = time.time()
        if self.origin is None or p.step <= self.origin[0]:  # the first log step, a rollback
            self.origin = (p.step, now)
            return
        costs = self.costs(p.step, now)
        steps = max(plan_steps(costs, self.plan.budget, self.plan.max_steps, *self.every),
                    self.shortest_from(p.step))
        if abs(steps - p.total) * costs.step >= REPLAN_SECONDS:
            self.replan(p, steps, costs)

    def costs(self, step: int, now: float) -> Costs:
        """The plan's costs with the step's cost the loop's own since `origin`, and `setup`
        what makes predicted_seconds of any count the time spent so far plus what is left."""
        c, (s0, t0), (eval_every, save_every) = self.plan.costs, self.origin, self.every
        hooks_s = ((times_before(step, eval_every) - times_before(s0, eval_every)) * c.eval
                   + (times_before(step, save_every) - times_before(s0, save_every)) * c.save)
        pace = float(_largest(np.float64(max(now - t0 - hooks_s, 0.0) / (step - s0))))
        spent = (now - self.t_start - step * pace - times_before(step, eval_every) * c.eval
                 - times_before(step, save_every) * c.save)
        return dataclasses.replace(c, setup=spent, step=pace)

    def shortest_from(self, step: int) -> int:
        """The fewest steps whose lr is held at least until `step` (bisection: decay_start
        grows with the count)."""
        lo, hi = max(step, self.cfg.optim.warmup_steps + 1), self.plan.max_steps
        while lo < hi:
            mid = (lo + hi) // 2
            if decay_start(self.cfg.optim, mid) >= step:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def replan(self, p: Progress, steps: int, costs: Costs) -> None:
        before, p.total = p.total, steps
        self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train,
                                                                           steps=steps))
        every = self.every
        self.writer.write({**Plan(steps, self.plan.max_steps, self.plan.budget, costs,
                                  predicted_seconds(steps, costs, *every)).row(),
                           "step": p.step, "replanned_from": before})
        if is_main():
            rundir.write_config(self.run_dir, self.cfg)
        self.bar.total = steps
        self.bar.refresh()
        say(f"step {p.step}: train.time_budget re-planned {before} -> {steps} steps "
            f"(the loop's pace {costs.step * 1e3:.1f} ms a step)", self.cfg.run.quiet)
