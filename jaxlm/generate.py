"""Jit-compiled sampling for decoder-only models: greedy, temperature, top-k, top-p.

Prompts are left-padded to one length; positions restart at each prompt's first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / the top-p nucleus to -inf (the top token always stays)."""
    neg = jnp.finfo(logits_BV.dtype).min
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token if the probability mass strictly before it is < top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff, neg, logits_BV)
    return logits_BV


def sample(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1)


@partial(jax.jit, static_argnames=("model", "prompt_len", "temperature", "top_k", "top_p"))
def _decode(model: nn.Module, params: Any, buf_BL: jax.Array, valid_BL: jax.Array,
            rng: jax.Array, eos_id: int, *, prompt_len: int, temperature: float, top_k: int,
            top_p: float) -> jax.Array:
    L = buf_BL.shape[1]

    def body(i, carry):
        buf, valid, done = carry
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        logits = model.apply({"params": params}, buf, positions_BT=positions,
                             padding_mask_BT=valid)
        nxt = sample(logits[:, i - 1], jax.random.fold_in(rng, i), temperature, top_k, top_p)
        nxt = jnp.where(done, eos_id, nxt).astype(buf.dtype)
        buf = buf.at[:, i].set(nxt)
        valid = valid.at[:, i].set(~done)
        return buf, valid, done | (nxt == eos_id)

    done = jnp.zeros((buf_BL.shape[0],), bool)
    buf, _, _ = jax.lax.fori_loop(prompt_len, L, body, (buf_BL, valid_BL, done))
    return buf


def generate_ids(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, max_len: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                 pad_id: int = 0) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` ids (stopping after EOS).

    Beyond the model's `max_len` positions the context slides: each further round keeps the
    last max_len // 2 tokens and samples the other half (two compiled shapes in all).
    """
    seqs = [list(p)[-(max_len - 1):] for p in prompts]  # keep room for one new token
    if min(len(p) for p in seqs) == 0:
        raise ValueError("empty prompt")
    new: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    rng = jax.random.PRNGKey(seed)
    round_ = 0
    while not all(done) and min(len(n) for n in new) < max_new_tokens:
        keep = max_len // 2 if round_ else max(len(s) for s in seqs)
        context = [s[-keep:] for s in seqs]
        want = max_new_tokens - min(len(n) for n in new)
        out = _sample_round(model, params, context, want, max_len, temperature, top_k, top_p,
                            jax.random.fold_in(rng, round_), eos_id, pad_id)
        for b, ids in enumerate(out):
            if done[b]:
                continue
            ids = ids[: max_new_tokens - len(new[b])]
            if eos_id is not None and eos_id in ids:
                ids, done[b] = ids[: ids.index(eos_id)], True
            new[b] += ids
            seqs[b] += ids
            done[b] = done[b] or len(new[b]) >= max_new_tokens
        round_ += 1
    return new


def _sample_round(model, params, prompts, max_new_tokens, max_len, temperature, top_k, top_p,
                  rng, eos_id, pad_id) -> list[list[int]]:
    P = max(len(p) for p in prompts)
    L = min(P + max_new_tokens, max_len)
    buf = np.full((len(prompts), L), pad_id, np.int32)
    valid = np.zeros((len(prompts), L), bool)
    for b, p in enumerate(prompts):
        buf[b, P - len(p):P] = p
        valid[b, P - len(p):P] = True
    out = _decode(model, params, jnp.asarray(buf), jnp.asarray(valid), rng,
                  -1 if eos_id is None else eos_id, prompt_len=P, temperature=float(temperature),
                  top_k=int(top_k or 0), top_p=float(top_p))
    return [row[P:].tolist() for row in np.asarray(out)]
