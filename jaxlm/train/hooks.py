"""What the training loop does besides stepping, as hooks that run when due: preemption,
progress, logging, health and rollback, evaluation, checkpoints. Each sees the mutable
`Progress` of the loop; hooks run in order, and a rollback ends the round."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import trace
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config
from jaxlm.data.paths import local_target
from jaxlm.train.health import StepHealth, TrainingDiverged
from jaxlm.train.report import Summary
from jaxlm.train.rundir import MetricsWriter


def is_main() -> bool:
    return jax.process_index() == 0


def say(msg: str, quiet: bool = False) -> None:
    if not quiet and is_main():
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Progress:
    """The loop's position, shared with the hooks. `step` optimizer steps are done; the next
    batch is the one at data `position`."""

    step: int
    total: int
    position: int
    state: Any
    pending: list[Any] = field(default_factory=list)  # device metrics since the last log
    fetched: list[dict[str, Any]] = field(default_factory=list)  # host metrics, this log
    stop: bool = False  # a preemption signal: save and leave after this step
    rolled_back: bool = False

    @property
    def last(self) -> bool:
        return self.step == self.total or self.stop


class Hook:
    """Runs `run(progress)` after the steps where `due(progress)` holds."""

    def due(self, p: Progress) -> bool:
        return True

    def run(self, p: Progress) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Every(Hook):
    """Due every `every` steps and at the last (or stopping) step."""

    every: int

    def due(self, p: Progress) -> bool:
        return (self.every > 0 and p.step % self.every == 0) or p.last


class Preemption(Hook):
    """SIGTERM/SIGINT finish the current step, save and exit cleanly. A signal may reach the
    processes of a multi-host run at different steps, and comparing costs a host sync, so they
    compare at log steps and stop together at the first where any has it."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.requested = False
        self._old: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def due(self, p: Progress) -> bool:
        return jax.process_count() == 1 or p.step % self.log_every == 0

    def run(self, p: Progress) -> None:
        if jax.process_count() == 1:
            p.stop = self.requested
            return
        from jax.experimental import multihost_utils

        p.stop = bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class ProgressBar(Hook):
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def run(self, p: Progress) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Log(Every):
    """Fetches the metrics of the interval (one host sync per log step) and writes a row:
    loss, lr, grad_norm, tokens/s, MFU, bad steps, and any further metric of the step (the
    MoE router losses moe_aux_loss, moe_z_loss). Owns the metrics writer the other hooks
    share, and closes it (with its trackers) when the loop ends."""

    def __init__(self, cfg: Config, writer: MetricsWriter, summary: Summary, bar: Any,
                 flops_per_token: float, peak_flops: float) -> None:
        self.every, self.cfg, self.writer, self.summary, self.bar = (
            cfg.train.log_every, cfg, writer, summary, bar)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.plain_every = max(cfg.train.log_every, cfg.train.steps // 20)
        self.restart_clock()

    # Step metrics the row reports in its own way (or not at all); any other is copied.
    _STEP_INTERNALS = frozenset({"loss", "lr", "grad_norm", "num_tokens", "nll_sum",
                                 "bad_step"})

    def restart_clock(self) -> None:
        self.t_log = time.time()

    def run(self, p: Progress) -> None:
        p.fetched = jax.device_get(p.pending)
        now = time.time()
        tps = len(p.pending) * self.tokens_per_step / max(now - self.t_log, 1e-9)
        p.pending = []
        m = p.fetched[-1]
        row = {"step": p.step, "loss": float(m["loss"]), "lr": float(m["lr"]),
               "grad_norm": float(m["grad_norm"]), "tokens_per_sec": round(tps, 1),
               "mfu": round(tps * self.flops_per_token / self.peak_flops, 4),
               "bad_steps": int(sum(int(f["bad_step"]) for f in p.fetched))}
        row.update({k: float(v) for k, v in m.items() if k not in self._STEP_INTERNALS})
        self.writer.write(row)
        self.summary.history.append(row)
        self.summary.train_loss, self.summary.tokens_per_sec = row["loss"], tps
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}")
        if self.bar.disable and (p.step % self.plain_every == 0 or p.step == p.total):
            say(f"step {p.step}/{p.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"grad_norm {row['grad_norm']:.3f} tokens/s {tps:,.0f}", self.cfg.run.quiet)
        self.restart_clock()

    def close(self) -> None:
        self.writer.close()


class Health(Hook):
    """Judges the fetched metrics (runs of skipped non-finite steps, loss spikes). After
    train.max_bad_steps bad steps in a row it rolls back to a checkpoint from before the bad
    run and goes on from the current data position, skipping the batches seen since (PaLM's
    recipe), or stops the run."""

    def __init__(self, cfg: Config, ckpt: Checkpointer, abstract_state: Any,
                 writer: MetricsWriter, log: Log) -> None:
        self.cfg, self.ckpt, self.abstract, self.writer, self.log = (
            cfg, ckpt, abstract_state, writer, log)
        self.health = StepHealth(cfg.train.max_bad_steps, cfg.train.spike_zscore)

    def due(self, p: Progress) -> bool:
        return bool(p.fetched)

    def run(self, p: Progress) -> None:
        for event in self.health.observe(p.fetched, p.step - len(p.fetched) + 1):
            self.writer.write(event)
            say(f"step {event['step']}: {event['event']} (loss {event['loss']:.4g})")
        p.fetched = []
        if self.health.exhausted:
            self._roll_back(p)

    def clean_checkpoint(self) -> int | None:
        """The newest checkpoint certainly from before the damage. The loss of step s is
        measured before step s's update, so a bad loss at s may come from step s-1's update
        (a learning-rate spike) or be a bad batch at s: checkpoints up to s-2 are clean."""
        first_bad = self.health.first_bad_step or 0
        clean = [s for s in self.ckpt.steps() if s < first_bad - 1]
        return clean[-1] if clean else None

    def _roll_back(self, p: Progress) -> None:
        t, bad = self.cfg.train, self.cfg.train.max_bad_steps
        self.ckpt.wait()
        back_to = self.clean_checkpoint()
        if t.on_bad_steps == "stop" or back_to is None or self.health.rollbacks >= t.max_rollbacks:
            why = ("" if t.on_bad_steps == "stop"
                   else " and no checkpoint predates the bad run" if back_to is None
                   else f" after {self.health.rollbacks} rollbacks (train.max_rollbacks)")
            raise TrainingDiverged(
                f"{bad} bad (non-finite or spiking) steps in a row up to step {p.step}{why}; "
                f"lower optim.lr, check the data near position {p.position}, or set "
                "train.on_bad_steps=rollback")
        step, p.state, data_state = self.ckpt.restore(self.abstract, back_to)
        self.ckpt.delete_after(step)
        skipped = p.position - int(data_state.get("position", step))
        self.writer.write({"step": p.step, "event": "rollback", "to_step": step,
                           "skipped_batches": skipped})
        say(f"step {p.step}: {bad} bad steps in a row; rolled back to step {step}, "
            f"skipping {skipped} batches")
        p.step, p.pending, p.rolled_back = step, [], True
        self.health.reset()
        self.health.rollbacks += 1
        self.log.restart_clock()

    @property
    def in_bad_run(self) -> bool:
        return self.health.in_bad_run


class Evaluate(Hook):
    """Held-out metrics (`evaluate(state)`) every train.eval_every steps and at the end."""

    def __init__(self, cfg: Config, evaluate: Callable[[Any], dict[str, float]],
                 writer: MetricsWriter, summary: Summary, bar: Any, log: Log) -> None:
        self.every, self.quiet = cfg.train.eval_every, cfg.run.quiet
        self.evaluate, self.writer, self.summary, self.bar, self.log = (
            evaluate, writer, summary, bar, log)

    def due(self, p: Progress) -> bool:
        return bool(self.every and p.step % self.every == 0) or p.step == p.total

    def run(self, p: Progress) -> None:
        ev = self.evaluate(p.state)
        self.writer.write({"step": p.step, **ev})
        s = self.summary
        s.history.append({"step": p.step, **ev})
        s.eval_loss = ev["eval_loss"]
        s.eval_bits_per_byte = ev.get("eval_bits_per_byte", float("nan"))
        if not s.best_eval_loss <= ev["eval_loss"]:
            s.best_eval_loss = ev["eval_loss"]
        msg = f"step {p.step}: eval_loss {ev['eval_loss']:.4f}{_headline(ev)}"
        self.bar.write(msg, file=sys.stderr) if not self.bar.disable else say(msg, self.quiet)
        self.log.restart_clock()  # evaluation time is not training throughput


def _headline(ev: dict[str, float]) -> str:
    """The evaluation's second figure: bits per byte for text, else DPO's preference
    accuracy, when the evaluation has one."""
    if "eval_bits_per_byte" in ev:
        return f" ({ev['eval_bits_per_byte']:.3f} bits/byte)"
    if "eval_dpo_accuracy" in ev:
        return f" (chosen over rejected {ev['eval_dpo_accuracy']:.1%})"
    return ""


class Checkpoint(Every):
    """Saves the state and data position every checkpoint.every steps and at the end; not
    during a run of bad steps, whose parameters may be damaged."""

    def __init__(self, cfg: Config, ckpt: Checkpointer, health: Health,
                 data_item: Callable[[int], dict[str, Any]] | None = None) -> None:
        self.every, self.ckpt, self.health = cfg.checkpoint.every, ckpt, health
        # position -> the checkpoint's data item (jaxlm.data.position.saved)
        self.data_item = data_item or (lambda position: {"position": position})

    def run(self, p: Progress) -> None:
        if self.health.in_bad_run and not p.last:
            return
        self.ckpt.save(p.step, p.state, self.data_item(p.position), force=True)


class Trace(Hook):
    """A jax.profiler trace of steps profile.start_step+1 .. start_step+profile.steps into
    <run>/profile (process 0), for XProf or TensorBoard's profile plugin. A run resumed inside
    the window traces the rest of it; one resumed past it traces nothing."""

    def __init__(self, cfg: Config, run_dir: Path, start: int) -> None:
        self.first = cfg.profile.start_step
        self.last = self.first + cfg.profile.steps
        self.dir, self.quiet = run_dir / trace.RUN_SUBDIR, cfg.run.quiet
        self.on = cfg.profile.steps > 0 and start < self.last and is_main()
        self.active = False
        if self.on and start >= self.first:
            self._start(start)

    def _start(self, step: int, state: Any = None) -> None:
        jax.block_until_ready(state)  # the steps before the window stay out of it
        self._target = contextlib.ExitStack()  # the profiler writes local files only
        trace.start(self._target.enter_context(local_target(self.dir)))
        self.active, self.started_after = True, step

    def due(self, p: Progress) -> bool:
        if self.active:
            return p.step >= self.last or p.last
        return self.on and p.step == self.first

    def run(self, p: Progress) -> None:
        if not self.active:
            self._start(p.step, p.state)
            return
        self._stop(p.step, p.state)

    def _stop(self, step: int, state: Any) -> None:
        trace.stop(state)
        self._target.close()  # a cloud run directory receives the trace now
        self.active = self.on = False
        say(f"profiler trace of steps {self.started_after + 1}-{step} in {self.dir}; open it "
            f"with {trace.how_to_open(self.dir)}", self.quiet)

    def close(self) -> None:
        if self.active:  # the loop ended inside the window (an error): keep what there is
            trace.stop()
            self._target.close()
            self.active = False
            say(f"profiler trace (cut short) in {self.dir}", self.quiet)
