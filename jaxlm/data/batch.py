"""Typed batches: the contract between the data layer and the objectives.

Each model family trains on one of these (named fields, not dicts whose keys change with the
family). They are pytrees (`flax.struct`), so the same value holds numpy arrays on the host,
sharded `jax.Array`s on the mesh or `ShapeDtypeStruct`s for tracing; optional fields left as
None are absent from the tree."""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np

Array = Any  # np.ndarray | jax.Array | jax.ShapeDtypeStruct


@flax.struct.dataclass
class LMBatch:
    """Next-token prediction: targets[b, t] follows inputs[b, t]. Packed rows carry segment
    ids (1.. per document, 0 = padding) and positions restarting at each document."""

    inputs: Array  # [B, T] int32
    targets: Array  # [B, T] int32
    loss_mask: Array  # [B, T] float32, 1 = counted
    positions: Array | None = None  # [B, T] int32
    segment_ids: Array | None = None  # [B, T] int32


@flax.struct.dataclass
class MLMBatch:
    """Masked LM: the tokens themselves; the step picks and corrupts the positions."""

    inputs: Array  # [B, T] int32
    loss_mask: Array  # [B, T] float32, 1 = a real (maskable) token


@flax.struct.dataclass
class Seq2SeqBatch:
    """Teacher forcing: the decoder reads tgt_in (the target shifted right behind the decoder
    start token) and predicts tgt_out."""

    src: Array  # [B, S] int32
    src_mask: Array  # [B, S] float32, 1 = real token
    tgt_in: Array  # [B, T] int32
    tgt_out: Array  # [B, T] int32
    loss_mask: Array  # [B, T] float32


@flax.struct.dataclass
class PreferenceBatch:
    """Preference pairs (DPO): the same prompt with the chosen and with the rejected
    response, each a padded next-token row whose loss_mask covers the response only. The
    reference model's summed log-probabilities [B] are filled in by the train step."""

    chosen: LMBatch
    rejected: LMBatch
    ref_chosen_logp: Array | None = None  # [B] float32
    ref_rejected_logp: Array | None = None  # [B] float32


Batch = LMBatch | MLMBatch | Seq2SeqBatch | PreferenceBatch


def take_rows(batch: Batch, rows: np.ndarray) -> Batch:
    """The batch's rows `rows` (a host-side gather on every field)."""
    return jax.tree.map(lambda x: x[rows], batch)


def shift_right(tgt: np.ndarray, start_id: int) -> np.ndarray:
    """The decoder input of teacher forcing: `start_id`, then the target without its end."""
    return np.concatenate([np.full((tgt.shape[0], 1), start_id, tgt.dtype), tgt[:, :-1]], 1)


def seq2seq_batch(src: np.ndarray, tgt: np.ndarray, src_mask: np.ndarray,
                  tgt_mask: np.ndarray, start_id: int) -> Seq2SeqBatch:
    return Seq2SeqBatch(src=src, src_mask=src_mask.astype(np.float32),
                        tgt_in=shift_right(tgt, start_id), tgt_out=tgt,
                        loss_mask=tgt_mask.astype(np.float32))
