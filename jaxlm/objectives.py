"""Training objectives: token cross entropy in float32; causal LM, masked LM (BERT/RoBERTa
dynamic masking) and seq2seq teacher forcing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.chunked_ce import chunked_cross_entropy
from jaxlm.data.batch import LMBatch, MLMBatch, Seq2SeqBatch

# loss(apply_fn, params, batch, *, rng, deterministic) -> (mean loss, sums for metrics). A sum
# named `X_sum` (other than nll_sum) is a per-token mean times num_tokens: the train step
# reports X (the MoE router losses).
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
# extra(intermediates the model sowed) -> (weighted loss to add, {name: unweighted mean}).
ExtraLoss = Callable[[Any], tuple[jax.Array, dict[str, jax.Array]]]


def cross_entropy(
    logits_BTV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over unmasked tokens of -log p(target); returns (loss, {nll_sum, num_tokens}).

    The log-softmax runs in float32 whatever the logits' dtype.
    """
    logits = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    loss_BT = nll_BT
    if label_smoothing:
        mean_logit_BT = jnp.mean(logits, axis=-1)
        loss_BT = (1 - label_smoothing) * nll_BT + label_smoothing * (log_z_BT - mean_logit_BT)
    if z_loss:
        loss_BT = loss_BT + z_loss * jnp.square(log_z_BT)
    mask = jnp.ones_like(nll_BT) if mask_BT is None else mask_BT.astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    denom = jnp.maximum(num_tokens, 1.0)
    loss = jnp.sum(loss_BT * mask) / denom
    return loss, {"nll_sum": jnp.sum(nll_BT * mask), "num_tokens": num_tokens}


def causal_lm_loss(apply_fn: Callable, params: Any, batch: LMBatch, *,
                   rng: jax.Array | None = None, deterministic: bool = True,
                   label_smoothing: float = 0.0, z_loss: float = 0.0,
                   extra_loss: ExtraLoss | None = None, chunk: int = 0,
                   logit_softcap: float = 0.0, zigzag: int = 0):
    """Next-token loss on an LMBatch, plus `extra_loss` of what the model sows into its
    "intermediates" collection (the MoE router losses), each reported as `{name}_sum`.

    With `chunk` > 0 the model returns its final hidden states and output projection, and
    the cross entropy takes `chunk` positions at a time (jaxlm.chunked_ce: the [B, T, V]
    logits never exist whole), soft-capping the logits at `logit_softcap` as the model does.
    `zigzag` > 1: the batch goes to the model in the zig-zag order of that many context
    shards (jaxlm.models.context; the loss is a sum over tokens, so their order is free)."""
    if zigzag > 1:
        from jaxlm.models import context

        batch = context.zigzag_batch(batch, zigzag)
    kw = dict(positions_BT=batch.positions, segment_ids_BT=batch.segment_ids,
              deterministic=deterministic, rngs=None if rng is None else {"dropout": rng},
              **({"hidden": True} if chunk else {}), **({"zigzag": zigzag} if zigzag > 1 else {}))
    if extra_loss is None:
        out = apply_fn({"params": params}, batch.inputs, **kw)
    else:
        out, sown = apply_fn({"params": params}, batch.inputs, mutable=["intermediates"], **kw)
    ce = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    if chunk:
        x_BTD, w_VD = out
        loss, sums = chunked_cross_entropy(x_BTD, w_VD, batch.targets, batch.loss_mask,
                                           chunk=chunk, softcap=logit_softcap, **ce)
    else:
        loss, sums = cross_entropy(out, batch.targets, batch.loss_mask, **ce)
    if extra_loss is None:
        return loss, sums
    added, means = extra_loss(sown["intermediates"])
    sums.update({f"{k}_sum": v * sums["num_tokens"] for k, v in means.items()})
    return loss + added, sums


def mask_tokens(tokens_BT: jax.Array, maskable_BT: jax.Array, rng: jax.Array, *, mask_id: int,
                vocab_size: int, rate: float = 0.15) -> tuple[jax.Array, jax.Array]:
    """BERT's corruption: pick `rate` of the maskable tokens; of those 80% -> [MASK],
    10% -> a random token, 10% unchanged. Returns (corrupted inputs, picked mask)."""
    pick_rng, kind_rng, tok_rng = jax.random.split(rng, 3)
    picked = (jax.random.uniform(pick_rng, tokens_BT.shape) < rate) & maskable_BT
    kind = jax.random.uniform(kind_rng, tokens_BT.shape)
    random_tokens = jax.random.randint(tok_rng, tokens_BT.shape, 0, vocab_size, tokens_BT.dtype)
    corrupted = jnp.where(kind < 0.8, mask_id, jnp.where(kind < 0.9, random_tokens, tokens_BT))
    return jnp.where(picked, corrupted, tokens_BT), picked


def masked_lm_loss(apply_fn: Callable, params: Any, batch: MLMBatch, *,
                   rng: jax.Array | None = None, deterministic: bool = True, mask_id: int,
                   vocab_size: int, rate: float = 0.15, label_smoothing: float = 0.0,
                   z_loss: float = 0.0):
    """Masked-LM loss on an MLMBatch: the masking is drawn from `rng` inside the step, so
    every training step re-masks (RoBERTa's dynamic masking); evaluation passes a key per
    batch index, so its masks are fixed across evaluations but differ between batches."""
    tokens = batch.inputs
    maskable = batch.loss_mask > 0
    mask_rng = jax.random.PRNGKey(0) if rng is None else jax.random.fold_in(rng, 1)
    inputs, picked = mask_tokens(tokens, maskable, mask_rng, mask_id=mask_id,
                                 vocab_size=vocab_size, rate=rate)
    logits = apply_fn({"params": params}, inputs, padding_mask_BT=maskable,
                      deterministic=deterministic,
                      rngs=None if rng is None else {"dropout": rng})
    loss, aux = cross_entropy(logits, tokens, picked, label_smoothing=label_smoothing,
                              z_loss=z_loss)
    correct = (jnp.argmax(logits, -1) == tokens) & picked
    return loss, {**aux, "num_correct": jnp.sum(correct.astype(jnp.float32))}


def seq2seq_loss(apply_fn: Callable, params: Any, batch: Seq2SeqBatch, *,
                 rng: jax.Array | None = None, deterministic: bool = True,
                 label_smoothing: float = 0.0, z_loss: float = 0.0):
    """Teacher forcing: the decoder reads the target shifted right (tgt_in) and predicts
    tgt_out."""
    logits = apply_fn({"params": params}, batch.src, batch.tgt_in,
                      src_padding_mask_BS=batch.src_mask > 0,
                      tgt_padding_mask_BT=batch.loss_mask > 0,
                      deterministic=deterministic,
                      rngs=None if rng is None else {"dropout": rng})
    return cross_entropy(logits, batch.tgt_out, batch.loss_mask,
                         label_smoothing=label_smoothing, z_loss=z_loss)

