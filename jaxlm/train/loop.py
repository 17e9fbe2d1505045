"""The training loop: data -> sharded state -> jitted steps, with logging, evaluation,
checkpoints, resume and preemption. Metrics are fetched from the device only at log steps."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import perf, progress, sharding, tracking
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.data import setup as data_setup
from jaxlm.evaluate import heldout_metrics
from jaxlm.models.transformer import build_model
from jaxlm.objectives import loss_for
from jaxlm.optim import lr_schedule, make_optimizer
from jaxlm.train import report, rundir
from jaxlm.train.health import StepHealth, TrainingDiverged
from jaxlm.train.state import count_params, init_state, state_shardings
from jaxlm.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step


@dataclass
class Summary:
    run_dir: str
    steps: int
    params: int
    train_loss: float = float("nan")
    eval_loss: float = float("nan")
    best_eval_loss: float = float("nan")
    eval_bits_per_byte: float = float("nan")
    tokens_per_sec: float = float("nan")
    wall_seconds: float = 0.0
    last_checkpoint: str = ""
    stopped_early: bool = False
    tokens: int = 0  # positions trained on: steps × batch_size × seq_len
    flops_per_token: float = float("nan")
    next_command: str = ""  # what to try on the trained run
    history: list[dict[str, Any]] = field(default_factory=list)


class _Preemption:
    """SIGTERM/SIGINT ask the loop to finish the current step, save and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _is_main() -> bool:
    return jax.process_index() == 0


def _say(msg: str, quiet: bool) -> None:
    if not quiet and _is_main():
        print(msg, file=sys.stderr, flush=True)


def train(cfg: Config, run_dir: Path, resuming: bool = False) -> Summary:
    """Trains `cfg` in `run_dir` (resuming from its newest checkpoint) and returns a summary."""
    t_start = time.time()
    quiet = cfg.run.quiet
    data = data_setup.build(cfg, run_dir, progress=not quiet)
    tokenizer, family = data.tokenizer, cfg.model.family

    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_model_fits_mesh(cfg.model, mesh)
    dp = sharding.data_parallel_size(mesh)
    if cfg.train.batch_size % (dp * cfg.optim.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel "
            f"size {dp} × optim.grad_accum_steps={cfg.optim.grad_accum_steps}")
    eval_batches = min(cfg.train.eval_batches, data.valid.batches_per_epoch)
    loss_fn = loss_for(family, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                       label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss,
                       mlm_rate=cfg.train.mlm_rate)

    model = build_model(cfg.model)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    ckpt = Checkpointer(run_dir / rundir.CHECKPOINT_DIR, keep=cfg.checkpoint.keep,
                        keep_period=cfg.checkpoint.keep_period,
                        async_save=cfg.checkpoint.async_save)
    summary = Summary(run_dir=str(run_dir), steps=0, params=0,
                      next_command=next_command(cfg, run_dir))
    with jax.set_mesh(mesh), _Preemption() as preempt:
        abstract, shardings = state_shardings(model, tx, mesh)
        position = 0
        if ckpt.latest_step() is not None:
            step0, state, data_state = ckpt.restore(abstract)
            position = int(data_state.get("position", step0))
            _say(f"resumed {run_dir} from step {step0}", False)
        else:
            state = init_state(model, tx, mesh, cfg.seed)
        # Written only now: a refused resume (another model, unreadable checkpoints) must
        # leave the run directory as it was.
        if _is_main():
            rundir.write_config(run_dir, cfg)
            if not (run_dir / rundir.TOKENIZER_DIR).exists():
                tokenizer.save(run_dir / rundir.TOKENIZER_DIR)
        metrics_out = rundir.MetricsWriter(
            run_dir, enabled=_is_main(),
            trackers=tracking.open_trackers(cfg, run_dir) if _is_main() else ())
        summary.params = count_params(state.params)
        start = int(state.step)
        _say(f"model: {cfg.model.preset} family={cfg.model.family} "
             f"params={summary.params / 1e6:.2f}M  mesh={dict(mesh.shape)}  "
             f"devices={jax.device_count()} ({jax.devices()[0].platform})  "
             f"{data.description}", quiet)
        _say(report.model_summary(abstract.params, cfg), quiet)
        # MFU in the metrics rows: model FLOPs (perf: causal attention halved) over the peak
        # of all devices (a table, or on CPU a ~0.3 s matmul measured here).
        model_flops_per_token = perf.flops_per_token(cfg, abstract.params)
        summary.flops_per_token = model_flops_per_token
        peak_flops = perf.device_flops(cfg.model.dtype, seconds=0.3) * jax.device_count()
        if _is_main():
            rundir.write_summary(run_dir, report.start_record(cfg, summary.params,
                                                              model_flops_per_token))

        train_step = jit_train_step(
            make_train_step(model, tx, schedule, grad_accum_steps=cfg.optim.grad_accum_steps,
                            loss_fn=loss_fn), shardings, mesh)
        eval_step = jit_eval_step(make_eval_step(model, loss_fn), shardings.params, mesh)

        def evaluate(params) -> dict[str, float]:
            return heldout_metrics(eval_step, params, data, mesh, eval_batches, family)

        total = cfg.train.steps
        bar = progress.bar(total=total, initial=start, desc="train", unit="step",
                           quiet=quiet or not _is_main())
        plain_every = max(cfg.train.log_every, total // 20)
        t_log, tokens_since, pending = time.time(), 0, []
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len  # positions processed
        step = start
        health = StepHealth(cfg.train.max_bad_steps, cfg.train.spike_zscore)
        while step < total:
            step += 1
            batch = sharding.host_batch_to_global(
                data_setup.batch_at(data, data.train, position, family), mesh)
            state, metrics = train_step(state, batch)
            position += 1
            # Multi-host agreement costs a host sync, so it happens at log steps only.
            stop = (_all_agree_to_stop(preempt.requested)
                    if jax.process_count() == 1 or step % cfg.train.log_every == 0
                    else False)
            tokens_since += tokens_per_step
            pending.append(metrics)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total or stop:
                fetched = jax.device_get(pending)  # one sync per log interval
                now = time.time()
                tps = tokens_since / max(now - t_log, 1e-9)
                m = fetched[-1]
                row = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                       "grad_norm": float(m["grad_norm"]), "tokens_per_sec": round(tps, 1),
                       "mfu": round(tps * model_flops_per_token / peak_flops, 4),
                       "bad_steps": int(sum(int(f["bad_step"]) for f in fetched))}
                metrics_out.write(row)
                summary.history.append(row)
                for event in health.observe(fetched, step - len(fetched) + 1):
                    metrics_out.write(event)
                    _say(f"step {event['step']}: {event['event']} (loss {event['loss']:.4g})",
                         False)
                if health.exhausted:
                    state, step, position = _recover(cfg, ckpt, abstract, step, position,
                                                     metrics_out, health.rollbacks)
                    health.reset()
                    health.rollbacks += 1
                    t_log, tokens_since, pending = time.time(), 0, []
                    continue
                summary.train_loss, summary.tokens_per_sec = row["loss"], tps
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}")
                if bar.disable and (step % plain_every == 0 or step == total):
                    _say(f"step {step}/{total} loss {row['loss']:.4f} "
                         f"lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3f} "
                         f"tokens/s {tps:,.0f}", quiet)
                t_log, tokens_since, pending = time.time(), 0, []
            eval_now = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total
            if eval_now:
                ev = evaluate(state.params)
                metrics_out.write({"step": step, **ev})
                summary.history.append({"step": step, **ev})
                summary.eval_loss, summary.eval_bits_per_byte = ev["eval_loss"], \
                    ev["eval_bits_per_byte"]
                if not summary.best_eval_loss <= ev["eval_loss"]:
                    summary.best_eval_loss = ev["eval_loss"]
                msg = (f"step {step}: eval_loss {ev['eval_loss']:.4f} "
                       f"({ev['eval_bits_per_byte']:.3f} bits/byte)")
                bar.write(msg, file=sys.stderr) if not bar.disable else _say(msg, quiet)
                t_log = time.time()  # evaluation time is not training throughput
            if step % cfg.checkpoint.every == 0 or step == total or stop:
                ckpt.save(step, state, {"position": position}, force=True)
            if stop:
                summary.stopped_early = True
                break
        bar.close()
        ckpt.close()
        metrics_out.close()
    summary.steps = step
    if ckpt.latest_step() is not None:
        summary.last_checkpoint = str(ckpt.directory / str(ckpt.latest_step()))
    summary.wall_seconds = time.time() - t_start
    summary.tokens = step * cfg.train.batch_size * cfg.train.seq_len
    if summary.stopped_early:
        _say(f"stopped by signal after step {step}; checkpoint saved at "
             f"{summary.last_checkpoint}. Run the same command to resume.", False)
    if np.isnan(summary.best_eval_loss):
        best = [r["eval_loss"] for r in rundir.read_metrics(run_dir) if "eval_loss" in r]
        summary.best_eval_loss = min(best) if best else float("nan")
    if _is_main():
        rundir.write_summary(run_dir, report.end_record(cfg, summary))
    return summary


def _all_agree_to_stop(requested: bool) -> bool:
    """Preemption on multi-host: a signal may reach the processes at different steps; they
    compare at each log step and stop (and save) together at the first one where any has it."""
    if jax.process_count() == 1:
        return requested
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(requested))))


def _recover(cfg: Config, ckpt: Checkpointer, abstract, step: int, position: int,
             metrics_out, rollbacks_so_far: int) -> tuple:
    """After max_bad_steps bad steps in a row (non-finite or loss spikes): roll back to the
    newest checkpoint and go on from the current data position, skipping the batches seen
    since (PaLM's recipe)."""
    bad = cfg.train.max_bad_steps
    if (cfg.train.on_bad_steps == "stop" or ckpt.latest_step() is None
            or rollbacks_so_far >= cfg.train.max_rollbacks):
        why = ("" if cfg.train.on_bad_steps == "stop"
               else " and there is no checkpoint to roll back to" if ckpt.latest_step() is None
               else f" after {rollbacks_so_far} rollbacks (train.max_rollbacks)")
        raise TrainingDiverged(
            f"{bad} bad (non-finite or spiking) steps in a row up to step {step}{why}; lower "
            f"optim.lr, check "
            f"the data near position {position}, or set train.on_bad_steps=rollback")
    ckpt.wait()
    back_to, state, data_state = ckpt.restore(abstract)
    skipped = position - int(data_state.get("position", back_to))
    metrics_out.write({"step": step, "event": "rollback", "to_step": back_to,
                       "skipped_batches": skipped})
    _say(f"step {step}: {bad} bad steps in a row; rolled back to step {back_to}, "
         f"skipping {skipped} batches", False)
    return state, back_to, position


def next_command(cfg: Config, run_dir: str | Path) -> str:
    """The command that shows what this run learned: a task score or a sample."""
    if data_setup.uses_pairs(cfg):
        task = {"xsum": "summarize", "disfl-qa": "qa"}.get(cfg.data.name, "translate")
        return f"jaxlm eval --run {run_dir} --task {task}"
    if cfg.model.family != "decoder":
        return f"jaxlm eval --run {run_dir}"
    prompt = "ROMEO:" if cfg.data.name == "shakespeare" else "The"
    return f"jaxlm generate --run {run_dir} --prompt \"{prompt}\""


def format_summary(s: Summary) -> str:
    lines = [
        "─" * 60,
        f" run          {s.run_dir}",
        f" steps        {s.steps}   params {s.params / 1e6:.2f}M   wall {s.wall_seconds:.0f}s",
        f" train loss   {s.train_loss:.4f}",
        f" eval loss    {s.eval_loss:.4f}  (best {s.best_eval_loss:.4f}, "
        f"{s.eval_bits_per_byte:.3f} bits/byte)",
        f" tokens/s     {s.tokens_per_sec:,.0f}   tokens {report.human(s.tokens)}   "
        f"FLOPs/token {report.human(s.flops_per_token)}",
        f" checkpoint   {s.last_checkpoint or '-'}"
        + ("   (stopped early: run the same command to resume)" if s.stopped_early else ""),
        f" view         jaxlm plot {s.run_dir}   |   tensorboard --logdir {s.run_dir}",
        f" next         {s.next_command}",
        "─" * 60,
    ]
    return "\n".join(lines)
