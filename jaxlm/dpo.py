"""Direct preference optimisation (Rafailov et al., 2023): the sigmoid DPO loss on the
summed log-probabilities of a chosen and a rejected response under the trained policy and a
frozen reference model, with conservative label smoothing as HF TRL's cDPO, and optionally
RPO's NLL term on the chosen responses (Pang et al., 2024; TRL's rpo_alpha).

The reference's log-probabilities are computed once per batch inside the step, from frozen
weights and without gradient: with LoRA the base model without its adapters (no second copy
of the weights), otherwise a copy of the starting parameters kept in the train state
(TrainStateWithReference.ref_params: checkpointed, never seen by the optimizer).

Counting: the DPO loss is a mean over pairs, so the loss's `num_tokens` counts pairs (the
train step weights micro-batches by it) and each `X_sum` is a per-pair mean times that count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import lora
from jaxlm.data.batch import LMBatch, PreferenceBatch

if TYPE_CHECKING:
    from jaxlm.config import Config
    from jaxlm.train.state import TrainState

# A DPO step runs the policy forward and backward on two sequences per pair (3 passes' cost
# each) and the reference forward on both (1 pass each): 8/3 of one sequence's training cost.
FLOPS_FACTOR = (2 * 3 + 2 * 1) / 3


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array,
                   mask_BT: jax.Array) -> jax.Array:
    """Σ_t mask · log p(target_t) per row [B], the log-softmax in float32."""
    logits = logits_BTV.astype(jnp.float32)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    logp_BT = target_logit_BT - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(logp_BT * mask_BT.astype(jnp.float32), axis=-1)


def dpo_loss(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array,
             ref_chosen_B: jax.Array, ref_rejected_B: jax.Array, *, beta: float,
             label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair losses -(1-ε)·log σ(βz) - ε·log σ(-βz), z = (π_c - ref_c) - (π_r - ref_r)
    on summed log-probabilities; and the implicit rewards β(π - ref) of chosen and rejected
    (without gradient)."""
    chosen_ratio_B = policy_chosen_B - ref_chosen_B
    rejected_ratio_B = policy_rejected_B - ref_rejected_B
    z_B = beta * (chosen_ratio_B - rejected_ratio_B)
    losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B)
                - label_smoothing * jax.nn.log_sigmoid(-z_B))
    rewards = jax.lax.stop_gradient((beta * chosen_ratio_B, beta * rejected_ratio_B))
    return losses_B, rewards[0], rewards[1]


def rpo_loss(losses_B: jax.Array, policy_chosen_B: jax.Array, chosen_tokens_B: jax.Array, *,
             sft_weight: float) -> tuple[jax.Array, jax.Array]:
    """mean(losses_B) + sft_weight · NLL, and NLL: the chosen responses' mean per-token
    negative log-likelihood over all of the batch's response tokens (TRL's token mean),
    from their summed log-probabilities and token counts (with gradient accumulation, each
    micro-batch's, weighted by its pairs). It keeps the chosen replies' likelihood up while
    DPO separates them from near misses."""
    nll = -jnp.sum(policy_chosen_B) / jnp.maximum(jnp.sum(chosen_tokens_B), 1.0)
    loss = jnp.mean(losses_B)
    # A static 0 leaves the loss bit-identical to DPO's (no 0 · NLL term).
    return (loss + sft_weight * nll if sft_weight else loss), nll


def response_logps(apply_fn: Callable, params: Any, rows: LMBatch, *,
                   rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """The summed log-probability [B] of each row's loss-masked (response) targets."""
    logits_BTV = apply_fn({"params": params}, rows.inputs, positions_BT=rows.positions,
                          segment_ids_BT=rows.segment_ids, deterministic=deterministic,
                          rngs=None if rng is None else {"dropout": rng})
    return sequence_logps(logits_BTV, rows.targets, rows.loss_mask)


def with_reference_logps(apply_fn: Callable, ref_params: Any,
                         batch: PreferenceBatch) -> PreferenceBatch:
    """The batch with the reference model's summed response log-probabilities: frozen
    weights, no dropout, no gradient."""
    ref = jax.lax.stop_gradient(ref_params)
    chosen = response_logps(apply_fn, ref, batch.chosen)
    rejected = response_logps(apply_fn, ref, batch.rejected)
    return batch.replace(ref_chosen_logp=jax.lax.stop_gradient(chosen),
                         ref_rejected_logp=jax.lax.stop_gradient(rejected))


def preference_loss(apply_fn: Callable, params: Any, batch: PreferenceBatch, *,
                    rng: jax.Array | None = None, deterministic: bool = True,
                    beta: float = 0.1, label_smoothing: float = 0.0, sft_weight: float = 0.0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean DPO loss over the batch's pairs plus sft_weight · the chosen responses' NLL
    (rpo_loss; an objectives.LossFn); its sums count pairs and carry the rewards, their
    margin, the accuracy (chosen reward > rejected reward), the policy's summed
    log-probabilities, how often it gives the chosen one more, and the chosen NLL."""
    if batch.ref_chosen_logp is None or batch.ref_rejected_logp is None:
        raise ValueError("preference_loss needs the reference log-probabilities: pass the "
                         "batch through with_reference_logps first")
    rngs = (None, None) if rng is None else (jax.random.fold_in(rng, 0),
                                             jax.random.fold_in(rng, 1))
    chosen_B = response_logps(apply_fn, params, batch.chosen, rng=rngs[0],
                              deterministic=deterministic)
    rejected_B = response_logps(apply_fn, params, batch.rejected, rng=rngs[1],
                                deterministic=deterministic)
    losses_B, reward_c_B, reward_r_B = dpo_loss(
        chosen_B, rejected_B, batch.ref_chosen_logp, batch.ref_rejected_logp, beta=beta,
        label_smoothing=label_smoothing)
    loss, chosen_nll = rpo_loss(losses_B, chosen_B, jnp.sum(batch.chosen.loss_mask, axis=-1),
                                sft_weight=sft_weight)
    pairs = jnp.asarray(losses_B.shape[0], jnp.float32)
    sums = {"nll_sum": loss * pairs, "num_tokens": pairs,
            "dpo_chosen_reward_sum": jnp.sum(reward_c_B),
            "dpo_rejected_reward_sum": jnp.sum(reward_r_B),
            "dpo_reward_margin_sum": jnp.sum(reward_c_B - reward_r_B),
            "dpo_accuracy_sum": jnp.sum((reward_c_B > reward_r_B).astype(jnp.float32)),
            # the policy's own preference, without the reference (before DPO: the base's)
            "dpo_logp_accuracy_sum": jnp.sum((chosen_B > rejected_B).astype(jnp.float32)),
            "dpo_chosen_logp_sum": jax.lax.stop_gradient(jnp.sum(chosen_B)),
            "dpo_rejected_logp_sum": jax.lax.stop_gradient(jnp.sum(rejected_B)),
            # per response token (a per-pair mean like the rest: this batch's, times pairs)
            "dpo_chosen_nll_sum": jax.lax.stop_gradient(chosen_nll * pairs)}
    return loss, sums


def loss_fn(cfg: Config) -> Callable:
    """The run's DPO objective (dpo.beta, dpo.label_smoothing, dpo.sft_weight)."""
    return functools.partial(preference_loss, beta=cfg.dpo.beta,
                             label_smoothing=cfg.dpo.label_smoothing,
                             sft_weight=cfg.dpo.sft_weight)


# ---------------------------------------------------------------- the reference model

def keeps_reference_copy(cfg: Config) -> bool:
    """Whether the train state holds a frozen copy of the starting parameters (DPO without
    LoRA; with LoRA the reference is the base without its adapters)."""
    return cfg.train.objective == "dpo" and not cfg.lora.rank


def reference_fn(cfg: Config) -> Callable[[TrainState], Any]:
    """state -> the reference model's parameters (usable inside jit)."""
    if cfg.lora.rank:
        return lambda state: lora.without_adapters(state.params)
    return lambda state: state.ref_params


def train_step_with_reference(step: Callable, apply_fn: Callable,
                              reference: Callable[[TrainState], Any]) -> Callable:
    """step(state, batch) fed batches that carry the reference log-probabilities."""
    def wrapped(state: TrainState, batch: PreferenceBatch):
        return step(state, with_reference_logps(apply_fn, reference(state), batch))

    return wrapped


def eval_step_with_reference(step: Callable, apply_fn: Callable,
                             reference: Callable[[TrainState], Any]) -> Callable:
    """eval(state without optimizer state, batch, index) from eval(params, batch, index)."""
    def wrapped(state: TrainState, batch: PreferenceBatch, index: jax.Array):
        return step(state.params, with_reference_logps(apply_fn, reference(state), batch),
                    index)

    return wrapped


def synthetic_batch(chosen: LMBatch, rejected: LMBatch) -> PreferenceBatch:
    """A preference batch of two synthetic row batches, the loss on each row's second half
    (a prompt, then a response), for bench, profile and compile."""
    T = chosen.inputs.shape[1]
    mask = np.zeros_like(np.asarray(chosen.loss_mask))
    mask[:, T // 2:] = 1.0
    return PreferenceBatch(chosen=chosen.replace(loss_mask=mask),
                           rejected=rejected.replace(loss_mask=mask.copy()))
