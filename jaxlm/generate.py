"""Jit-compiled decoding: greedy, temperature, top-k, top-p; beam search for encoder-decoders.

Decoder-only models prefill the (left-padded) prompts in one call, then decode one token per
step against a KV cache, all inside one compiled `while_loop` that stops once every row has
emitted EOS. Positions restart at each prompt's first token. `_decode_full` recomputes the
whole prefix every step: the reference the cached path is tested and benchmarked against.

Encoder-decoder models encode the source once; the first decoder step projects it into the
cache's cross-attention keys and values, and every later step feeds one target token against
the self-attention KV cache. Beam search reorders that cache as beams are re-ranked.
`_seq2seq_full` reruns the decoder over the whole target buffer each step: the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.transformer import init_cache


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / the top-p nucleus to -inf (the top token always stays)."""
    neg = jnp.finfo(logits_BV.dtype).min
    if top_k and 0 < top_k < logits_BV.shape[-1]:  # k >= vocabulary: every token stays
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
    """One token per row: argmax when temperature <= 0, else from the filtered softmax."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1)


_STATIC = ("model", "max_new", "temperature", "top_k", "top_p")


def unrolled_for_decoding(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
    """The model with unrolled layers and its parameters split per layer, if it scans them.

    A scanned stack passes its stacked KV cache through `nn.scan` as input and output, so
    every decoding step writes the whole cache again; unrolled layers update their caches in
    place (3-4x the tokens/s on CPU, benchmarks/README.md). Costs one copy of the layer
    parameters per call."""
    if not model.cfg.scan_layers:
        return model, params

    def split(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: split(v) for k, v in tree.items() if k != "layers"}
        if "layers" in tree:  # a scanned Stack: leading axis = layer
            stacked = tree["layers"]
            n = jax.tree.leaves(stacked)[0].shape[0]
            out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                        for i in range(n)})
        return out

    return type(model)(dataclasses.replace(model.cfg, scan_layers=False)), split(params)


def _sampling_loop(step, logits_BV: jax.Array, cache: Any, rng: jax.Array, eos_id: jax.Array,
                   max_new: int, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """[B, max_new] ids sampled one per step from `logits_BV`, each fed back through
    `step(tok_B, i, cache) -> (logits_BV, cache)`; EOS-filled after a row's EOS, and the loop
    ends once every row has emitted it."""
    B = logits_BV.shape[0]
    first = sample(logits_BV, jax.random.fold_in(rng, 0), temperature, top_k, top_p)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, done, out = carry
        tok = jnp.where(done, eos_id, tok).astype(jnp.int32)
        out = out.at[:, i].set(tok)
        done = done | (tok == eos_id)
        logits_BV, cache = step(tok, i, cache)
        nxt = sample(logits_BV, jax.random.fold_in(rng, i + 1), temperature, top_k, top_p)
        return i + 1, nxt, cache, done, out

    out = jnp.full((B, max_new), eos_id, jnp.int32)
    carry = (jnp.int32(0), first, cache, jnp.zeros((B,), bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


@partial(jax.jit, static_argnames=_STATIC)
def _decode_cached(model: nn.Module, params: Any, prompt_BP: jax.Array, valid_BP: jax.Array,
                   rng: jax.Array, eos_id: jax.Array, *, max_new: int, temperature: float,
                   top_k: int, top_p: float) -> jax.Array:
    """[B, max_new] new ids (EOS-filled after a row's EOS): prefill, then cached steps."""
    B, P = prompt_BP.shape
    cache = init_cache(model.cfg, B, P + max_new)
    slots_valid = jnp.concatenate([valid_BP, jnp.ones((B, max_new), bool)], axis=1)
    pos_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
    apply = partial(model.apply, {"params": params}, padding_mask_BT=slots_valid)
    logits, cache = apply(prompt_BP, positions_BT=pos_BP, cache=cache)
    next_pos_B = pos_BP[:, -1] + 1

    def step(tok_B, i, cache):
        logits, cache = apply(tok_B[:, None], positions_BT=(next_pos_B + i)[:, None],
                              cache=cache)
        return logits[:, 0], cache

    return _sampling_loop(step, logits[:, -1], cache, rng, eos_id, max_new, temperature,
                          top_k, top_p)


@partial(jax.jit, static_argnames=_STATIC)
def _decode_full(model: nn.Module, params: Any, prompt_BP: jax.Array, valid_BP: jax.Array,
                 rng: jax.Array, eos_id: jax.Array, *, max_new: int, temperature: float,
                 top_k: int, top_p: float) -> jax.Array:
    """Like `_decode_cached` but reruns the model over the whole buffer at every step."""
    B, P = prompt_BP.shape
    buf = jnp.concatenate([prompt_BP, jnp.zeros((B, max_new), prompt_BP.dtype)], axis=1)
    valid = jnp.concatenate([valid_BP, jnp.zeros((B, max_new), bool)], axis=1)

    def body(i, carry):
        buf, valid, done = carry
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        logits = model.apply({"params": params}, buf, positions_BT=positions,
                             padding_mask_BT=valid)
        nxt = sample(logits[:, P + i - 1], jax.random.fold_in(rng, i), temperature, top_k,
                     top_p)
        nxt = jnp.where(done, eos_id, nxt).astype(buf.dtype)
        buf = buf.at[:, P + i].set(nxt)
        valid = valid.at[:, P + i].set(True)
        return buf, valid, done | (nxt == eos_id)

    done = jnp.zeros((B,), bool)
    buf, _, _ = jax.lax.fori_loop(0, max_new, body, (buf, valid, done))
    return buf[:, P:]


def generate_ids(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, max_len: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                 pad_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` ids (stopping after EOS, which is not
    returned). `use_cache=False` recomputes the whole prefix each step (the slow reference).

    Beyond the model's `max_len` positions the context slides: each further round keeps the
    last max_len // 2 tokens and samples the other half.
    """
    model, params = unrolled_for_decoding(model, params)
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
        decode = _decode_cached if use_cache else _decode_full
        out = _sample_round(decode, model, params, context, want, max_len, temperature, top_k,
                            top_p, jax.random.fold_in(rng, round_), eos_id, pad_id)
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


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    P = max(len(p) for p in prompts)
    buf = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for b, p in enumerate(prompts):
        buf[b, P - len(p):] = p
        valid[b, P - len(p):] = True
    return buf, valid


def _sample_round(decode, model, params, prompts, max_new_tokens, max_len, temperature, top_k,
                  top_p, rng, eos_id, pad_id) -> list[list[int]]:
    buf, valid = _left_pad(prompts, pad_id)
    max_new = min(buf.shape[1] + max_new_tokens, max_len) - buf.shape[1]
    out = decode(model, params, jnp.asarray(buf), jnp.asarray(valid), rng,
                 jnp.int32(-1 if eos_id is None else eos_id), max_new=max_new,
                 temperature=float(temperature), top_k=int(top_k or 0), top_p=float(top_p))
    return np.asarray(out).tolist()


# ----------------------------------------------------------------------- encoder-decoder
def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    S = max(len(s) for s in seqs)
    buf = np.full((len(seqs), S), pad_id, np.int32)
    valid = np.zeros((len(seqs), S), bool)
    for b, s in enumerate(seqs):
        buf[b, :len(s)] = s
        valid[b, :len(s)] = True
    return buf, valid


def _encode(model, params, src_BS, valid_BS):
    return model.apply({"params": params}, src_BS, src_padding_mask_BS=valid_BS, method="encode")


def _decode_logits(model, params, tgt_BT, enc_BSD, valid_BS):
    return model.apply({"params": params}, tgt_BT, enc_BSD, src_padding_mask_BS=valid_BS,
                       method="decode")


def _decode_step(model, params, tok_B, enc_BSD, valid_BS, cache):
    """Logits [B, V] after feeding one target token per row, and the advanced cache."""
    logits, cache = model.apply({"params": params}, tok_B[:, None], enc_BSD,
                                src_padding_mask_BS=valid_BS, cache=cache, method="decode")
    return logits[:, 0], cache


@partial(jax.jit, static_argnames=_STATIC)
def _seq2seq_sample(model: nn.Module, params: Any, src_BS: jax.Array, valid_BS: jax.Array,
                    rng: jax.Array, start_id: jax.Array, eos_id: jax.Array, *, max_new: int,
                    temperature: float, top_k: int, top_p: float) -> jax.Array:
    """[B, max_new] target ids (EOS-filled after EOS), decoded against a KV cache."""
    B = src_BS.shape[0]
    enc = _encode(model, params, src_BS, valid_BS)
    cache = init_cache(model.cfg, B, max_new + 1, cross=True)
    start = jnp.full((B,), start_id, jnp.int32)
    logits, cache = _decode_step(model, params, start, enc, valid_BS, cache)
    # Cross-attention keys and values are in the cache now: no encoder output needed.
    step = lambda tok_B, i, cache: _decode_step(model, params, tok_B, None, valid_BS, cache)
    return _sampling_loop(step, logits, cache, rng, eos_id, max_new, temperature, top_k,
                          top_p)


@partial(jax.jit, static_argnames=_STATIC)
def _seq2seq_full(model: nn.Module, params: Any, src_BS: jax.Array, valid_BS: jax.Array,
                  rng: jax.Array, start_id: jax.Array, eos_id: jax.Array, *, max_new: int,
                  temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Like `_seq2seq_sample`, but the decoder reruns over a fixed target buffer every step
    (causal, so the unfilled slots never matter)."""
    B = src_BS.shape[0]
    enc = _encode(model, params, src_BS, valid_BS)
    buf = jnp.full((B, max_new + 1), start_id, jnp.int32)

    def body(i, carry):
        buf, done = carry
        logits = _decode_logits(model, params, buf, enc, valid_BS)
        logits_BV = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
        tok = sample(logits_BV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        tok = jnp.where(done, eos_id, tok).astype(jnp.int32)
        buf = jax.lax.dynamic_update_index_in_dim(buf, tok, i + 1, axis=1)
        return buf, done | (tok == eos_id)

    buf, _ = jax.lax.fori_loop(0, max_new, body, (buf, jnp.zeros((B,), bool)))
    return buf[:, 1:]


def _reorder_beams(cache: dict, rows: jax.Array) -> dict:
    """The cache with its self-attention rows gathered by `rows` [B*K] (cross-attention keys
    and values are the same for every beam of a source, so they stay)."""
    def layer(c):
        return {**c, "self": jax.tree.map(lambda x: jnp.take(x, rows, axis=-4), c["self"])}

    layers = cache["layers"]
    layers = tuple(map(layer, layers)) if isinstance(layers, tuple) else layer(layers)
    return {**cache, "layers": layers}


@partial(jax.jit, static_argnames=("model", "beams", "max_new", "length_penalty"))
def _beam_search(model: nn.Module, params: Any, src_BS: jax.Array, valid_BS: jax.Array,
                 start_id: jax.Array, eos_id: jax.Array, *, beams: int, max_new: int,
                 length_penalty: float) -> jax.Array:
    """[B, max_new] ids of the best hypothesis by score / len**length_penalty (len counts the
    generated tokens, EOS included). As in HF: 2·beams candidates per step; an EOS candidate
    finishes a hypothesis only from the top `beams` ranks (so one beam is exactly greedy); a
    row stops once its best live beam, normalised at the current length, can't beat its
    worst finished one."""
    B, K, T = src_BS.shape[0], beams, max_new + 1
    neg = jnp.float32(-jnp.inf)
    enc = jnp.repeat(_encode(model, params, src_BS, valid_BS), K, axis=0)
    valid_K = jnp.repeat(valid_BS, K, axis=0)
    cache = init_cache(model.cfg, B * K, T, cross=True)
    logits, cache = _decode_step(model, params, jnp.full((B * K,), start_id, jnp.int32), enc,
                                 valid_K, cache)
    seqs = jnp.full((B, K, T), start_id, jnp.int32)
    scores = jnp.where(jnp.arange(K) == 0, 0.0, neg)[None].repeat(B, axis=0)
    take = lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=1)

    def cond(c):
        return (c[0] < max_new) & ~jnp.all(c[-1])

    def body(c):
        i, logits, cache, seqs, scores, fin_seqs, fin_scores, done = c
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        V = logp.shape[-1]
        cand = (scores[..., None] + logp.reshape(B, K, V)).reshape(B, K * V)
        top_s, top_i = jax.lax.top_k(cand, 2 * K)
        tok = (top_i % V).astype(jnp.int32)
        new_seqs = take(seqs, top_i // V)
        new_seqs = jax.lax.dynamic_update_index_in_dim(
            new_seqs.transpose(2, 0, 1), tok, i + 1, axis=0).transpose(1, 2, 0)
        is_eos = tok == eos_id
        norm = (i + 1).astype(jnp.float32) ** length_penalty
        finishing = jnp.where(is_eos & (jnp.arange(2 * K) < K), top_s / norm, neg)
        f_s, f_i = jax.lax.top_k(jnp.concatenate([fin_scores, finishing], 1), K)
        f_seqs = take(jnp.concatenate([fin_seqs, new_seqs], 1), f_i)
        a_s, a_i = jax.lax.top_k(jnp.where(is_eos, neg, top_s), K)
        a_seqs = take(new_seqs, a_i)
        # The surviving beams' caches come from their parent beams; then feed their tokens.
        parent_BK = jnp.take_along_axis(top_i // V, a_i, axis=1)
        rows = (jnp.arange(B)[:, None] * K + parent_BK).reshape(B * K)
        a_tok = jnp.take_along_axis(tok, a_i, axis=1).reshape(B * K)
        logits, cache = _decode_step(model, params, a_tok, None, valid_K,
                                     _reorder_beams(cache, rows))
        keep = done[:, None]
        new_done = done | (f_s[:, -1] >= a_s[:, 0] / norm)
        return (i + 1, logits, cache, jnp.where(keep[..., None], seqs, a_seqs),
                jnp.where(keep, scores, a_s), jnp.where(keep[..., None], fin_seqs, f_seqs),
                jnp.where(keep, fin_scores, f_s), new_done)

    init = (jnp.int32(0), logits, cache, seqs, scores, seqs, jnp.full((B, K), neg),
            jnp.zeros((B,), bool))
    i, _, _, seqs, scores, fin_seqs, fin_scores, done = jax.lax.while_loop(cond, body, init)
    # Rows that ran out of steps: their live beams compete with the finished ones.
    live = jnp.where(done[:, None], neg, scores / jnp.maximum(i, 1).astype(jnp.float32)
                     ** length_penalty)
    all_s = jnp.concatenate([fin_scores, live], 1)
    best = jnp.argmax(all_s, axis=1)
    all_seqs = jnp.concatenate([fin_seqs, seqs], 1)
    return take(all_seqs, best[:, None])[:, 0, 1:]


def generate_seq2seq_ids(model: nn.Module, params: Any, sources: Sequence[Sequence[int]], *,
                         max_new_tokens: int, start_id: int, eos_id: int | None,
                         pad_id: int = 0, beams: int = 1, length_penalty: float = 1.0,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Target ids for each source (EOS not returned): beam search when beams > 1, else
    greedy/sampled decoding. The target is at most model.cfg.max_seq_len - 1 tokens.
    `use_cache=False` reruns the decoder over the whole target each step (the slow
    reference; not for beams)."""
    if not sources or min(len(s) for s in sources) == 0:
        raise ValueError("empty source")
    model, params = unrolled_for_decoding(model, params)
    max_new = max(1, min(max_new_tokens, model.cfg.max_seq_len - 1))
    src, valid = _right_pad([list(s)[: model.cfg.max_seq_len] for s in sources], pad_id)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    if beams > 1:
        out = _beam_search(model, params, jnp.asarray(src), jnp.asarray(valid),
                           jnp.int32(start_id), eos, beams=int(beams), max_new=max_new,
                           length_penalty=float(length_penalty))
    else:
        decode = _seq2seq_sample if use_cache else _seq2seq_full
        out = decode(model, params, jnp.asarray(src), jnp.asarray(valid),
                     jax.random.PRNGKey(seed), jnp.int32(start_id), eos, max_new=max_new,
                     temperature=float(temperature), top_k=int(top_k or 0), top_p=float(top_p))
    result = []
    for ids in np.asarray(out).tolist():
        if eos_id is not None and eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        result.append(ids)
    return result
