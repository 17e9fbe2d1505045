"""The training loop: data -> a wired step (jaxlm.setup) -> steps, with the rest done by
hooks (jaxlm.train.hooks): logging, health and rollback, evaluation, checkpoints, preemption
and progress. Metrics are fetched from the device only at log steps."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import perf, progress, sharding, trace, tracking, weights
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.data import position as data_position
from jaxlm.data import setup as data_setup
from jaxlm.data.paths import local_target
from jaxlm.evaluate import heldout_metrics
from jaxlm.setup import StepSetup, build
from jaxlm.train import budget, dispatch, hooks, prefetch, report, rundir, sample
from jaxlm.train.hooks import Progress, is_main, say
from jaxlm.train.report import Summary
from jaxlm.train.state import TrainState, count_params


def train(cfg: Config, run_dir: Path, sample_prompt: str | None = None, *,
          started: float | None = None) -> Summary:
    """Trains `cfg` in `run_dir` (resuming from its newest checkpoint) and returns a summary;
    with `sample_prompt`, its `sample` is the trained model's continuation of it. `started`
    (a time.time()) is when the run began, for its wall time and train.time_budget (default:
    now; the CLI passes its own start, so both count importing JAX)."""
    t_start = time.time() if started is None else started
    data = data_setup.build(cfg, run_dir, progress=not cfg.run.quiet)
    setup = build(cfg, mask_id=data.tokenizer.mask_id)
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINT_DIR, keep=cfg.checkpoint.keep,
                        keep_period=cfg.checkpoint.keep_period,
                        async_save=cfg.checkpoint.async_save)
    summary = Summary(run_dir=str(run_dir), steps=0, params=0)
    with jax.set_mesh(setup.mesh):
        state, position = _start(setup, ckpt, run_dir, data)
        setup, plan = _plan(setup, data, state, ckpt, run_dir, t_start, sample_prompt)
        cfg = setup.cfg  # with train.steps as planned
        # Written only now: a refused resume (another model, unreadable checkpoints) must
        # leave the run directory as it was.
        if is_main():
            rundir.write_config(run_dir, cfg)
            if not (run_dir / rundir.TOKENIZER_DIR).exists():
                with local_target(run_dir / rundir.TOKENIZER_DIR) as folder:
                    data.tokenizer.save(folder)
        summary.params = count_params(state.params)
        summary.trainable_params = count_params(setup.trainable.trained(state.params))
        summary.optimizer_state_bytes = report.state_bytes(setup.abstract_state.opt_state)
        summary.flops_per_token = setup.flops_per_token()
        summary.time_budget = cfg.train.time_budget
        _announce(setup, summary, data, run_dir)
        p = Progress(step=int(state.step), total=cfg.train.steps, position=position,
                     state=state)
        loop_hooks = _hooks(setup, data, ckpt, summary, run_dir, p.step, plan, t_start)
        batches = prefetch.Prefetcher(lambda position: _device_batch(setup, data, position),
                                      cfg.train.prefetch)
        try:
            _run(setup, batches, p, loop_hooks)
        finally:
            batches.close()
            for hook in loop_hooks:
                hook.close()
            ckpt.close()
        if p.total != cfg.train.steps:  # re-planned by train.time_budget as it trained
            setup = setup.with_steps(p.total)
            cfg = setup.cfg
        if not p.stop and sample.can_sample(setup, sample_prompt):
            summary.sample = sample.summary_sample(setup, p.state.params, data.tokenizer,
                                                   sample_prompt)
    _finish(cfg, summary, ckpt, run_dir, p, t_start)
    return summary


def _device_batch(setup: StepSetup, data: data_setup.TrainData, position: int) -> Any:
    """The global device batch at a data position (built ahead by the prefetcher)."""
    return sharding.host_batch_to_global(data.train.batch(position), setup.mesh)


def _run(setup: StepSetup, batches: prefetch.Prefetcher, p: Progress,
         loop_hooks: list[hooks.Hook]) -> None:
    """Steps until the last or a stop. Batches come from the prefetcher, metrics stay on the
    devices until the Log hook fetches them; the host waits only to keep at most
    dispatch.STEPS_AHEAD steps queued."""
    train_step = setup.train_step
    in_flight = dispatch.Window()
    while p.step < p.total and not p.stop:
        if train_step.total_steps != p.total:  # re-planned (budget.Replan): the same program
            train_step = dataclasses.replace(train_step, total_steps=p.total)
        with trace.step(p.step + 1):  # profiler traces split the timeline by step
            batch = batches.get(p.position)
            p.state, metrics = train_step(p.state, batch)
        p.step, p.position = p.step + 1, p.position + 1
        p.pending.append(metrics)
        in_flight.add(metrics)
        p.rolled_back = False
        for hook in loop_hooks:
            if hook.due(p):
                hook.run(p)
                if p.rolled_back:  # the round ends: the state is from another step now
                    break


def _plan(setup: StepSetup, data: data_setup.TrainData, state: TrainState, ckpt: Checkpointer,
          run_dir: Path, t_start: float, prompt: str | None
          ) -> tuple[StepSetup, budget.Plan | None]:
    """The setup with train.steps as train.time_budget plans it (jaxlm.train.budget). A
    budget too short for one step leaves a fresh run no folder behind."""
    def probe_sample(params):
        return sample.summary_sample(setup, params, data.tokenizer, prompt)

    try:
        return budget.plan_run(
            setup, data, state, resumed=ckpt.latest_step() is not None, run_dir=run_dir,
            t_start=t_start, sample=probe_sample if sample.can_sample(setup, prompt) else None)
    except ConfigError:
        ckpt.close()
        for folder in (ckpt.directory, run_dir):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _start(setup: StepSetup, ckpt: Checkpointer, run_dir: Path,
           data: data_setup.TrainData) -> tuple[TrainState, int]:
    """(state, data position): the newest readable checkpoint's (the training data reads on
    from there), or a fresh initialisation."""
    if ckpt.latest_step() is None:
        if setup.cfg.model.init_from:
            say(f"initialised from {setup.cfg.model.init_from} (fresh optimizer state)")
            return weights.fine_tune_state(setup), 0
        return setup.init_state(), 0
    step, state, data_item = ckpt.restore(setup.abstract_state)
    say(f"resumed {run_dir} from step {step}")
    return state, data_position.restore(data.train, data_item, step)


def _announce(setup: StepSetup, summary: Summary, data: data_setup.TrainData,
              run_dir: Path) -> None:
    cfg, mesh = setup.cfg, setup.mesh
    say(f"model: {cfg.model.preset} family={setup.family.name} "
        f"params={summary.params / 1e6:.2f}M  mesh={dict(mesh.shape)}  "
        f"devices={jax.device_count()} ({jax.devices()[0].platform})  {data.description}",
        cfg.run.quiet)
    say(report.model_summary(setup.abstract_state.params, cfg, summary.flops_per_token),
        cfg.run.quiet)
    say(report.trained_line(summary), cfg.run.quiet)
    if is_main():
        rundir.write_summary(run_dir, report.start_record(cfg, summary))


def _hooks(setup: StepSetup, data: data_setup.TrainData, ckpt: Checkpointer,
           summary: Summary, run_dir: Path, start: int,
           plan: budget.Plan | None = None, t_start: float = 0.0) -> list[hooks.Hook]:
    """In order: preemption, progress, log, re-planning (budget.Replan, when it applies),
    health (may roll back), evaluation, checkpoint, profiler trace. A new plan of
    train.time_budget is the first row they write."""
    cfg = setup.cfg
    writer = rundir.MetricsWriter(
        run_dir, enabled=is_main(),
        trackers=tracking.open_trackers(cfg, run_dir) if is_main() else ())
    if plan is not None:
        writer.write(plan.row())
        say(plan.describe(), cfg.run.quiet)
    bar = progress.bar(total=cfg.train.steps, initial=start, desc="train", unit="step",
                       quiet=cfg.run.quiet or not is_main())
    # MFU over the peak of all devices (a table, or on CPU a ~0.3 s matmul measured here).
    peak = perf.device_flops(cfg.model.dtype, seconds=0.3) * jax.device_count()
    log = hooks.Log(cfg, writer, summary, bar, summary.flops_per_token, peak)
    health = hooks.Health(cfg, ckpt, setup.abstract_state, writer, log)
    eval_batches = min(cfg.train.eval_batches, data.valid.batches_per_epoch)

    def evaluate(state):
        return heldout_metrics(setup.eval_step, setup.eval_inputs(state), data, setup.mesh,
                               eval_batches)

    replan = ([budget.Replan(plan, cfg, run_dir, writer, bar, t_start)]
              if budget.replans(cfg, plan) else [])
    return [hooks.Preemption(cfg.train.log_every), hooks.ProgressBar(bar), log, *replan, health,
            hooks.Evaluate(cfg, evaluate, writer, summary, bar, log),
            hooks.Checkpoint(cfg, ckpt, health,
                             lambda position: data_position.saved(data.train, position)),
            hooks.Trace(cfg, run_dir, start)]


def _finish(cfg: Config, summary: Summary, ckpt: Checkpointer, run_dir: Path, p: Progress,
            t_start: float) -> None:
    summary.steps, summary.stopped_early = p.step, p.stop
    if ckpt.latest_step() is not None:
        summary.last_checkpoint = str(ckpt.directory / str(ckpt.latest_step()))
    summary.wall_seconds = time.time() - t_start
    summary.tokens = p.step * cfg.train.batch_size * cfg.train.seq_len
    if p.stop:
        say(f"stopped by signal after step {p.step}; checkpoint saved at "
            f"{summary.last_checkpoint}. Run the same command to resume.")
    if np.isnan(summary.best_eval_loss):
        best = [r["eval_loss"] for r in rundir.read_metrics(run_dir) if "eval_loss" in r]
        summary.best_eval_loss = min(best) if best else float("nan")
    if is_main():
        rundir.write_summary(run_dir, report.end_record(cfg, summary))
