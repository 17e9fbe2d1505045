"""Mistral: sliding-window attention on every layer and the rolling KV cache bounded by the
window. Against HF MistralForCausalLM (tiny random configs with a window shorter than the
sequence): logits, conversion both ways, greedy generation past the window through
`jaxlm.load(dir).generate(text)`. The ring cache's attention against a float64 numpy
reference of the windowed mask, step by step and in chunks, with padding."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import jaxlm
from jaxlm.config import ModelConfig, preset_fields
from jaxlm.convert import ConversionError
from jaxlm.convert.hf import load_hf, save_hf
from jaxlm.families.registry import build_model
from jaxlm.generate import _decode_cached
from jaxlm.models import attention as attn
from jaxlm.models import ring_cache
from jaxlm.models.kernels.chunked import chunked_attention
from jaxlm.models.transformer import init_cache

W = 4  # the sliding window of the parity models: a third of the sequence
V, B, T = 96, 3, 12
VALID = np.array([T, 7, 10])  # right padding


def mistral_config(**kw) -> transformers.MistralConfig:
    return transformers.MistralConfig(**{**dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-5, sliding_window=W, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}), **kw})


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random and large enough that greedy choices are not near-ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else noise * p.shape[-1] ** -0.5)
    return model.eval()


def hf_logits(model, tokens, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def jaxlm_logits(cfg: ModelConfig, params, tokens, mask) -> np.ndarray:
    apply = jax.jit(lambda p, t, m: build_model(cfg).apply({"params": p}, t, padding_mask_BT=m))
    return np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask)))


def init_params(model: nn.Module) -> dict:
    init = jax.jit(model.init)
    return nn.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]


def batch(seed: int = 0):
    tokens = np.random.default_rng(seed).integers(0, V, (B, T))
    return tokens, np.arange(T)[None, :] < VALID[:, None]


@pytest.mark.parametrize("scan", [True, False])
def test_logits_and_conversion_both_ways(tmp_path, scan):
    hf = randomise(transformers.MistralForCausalLM(mistral_config()))
    hf.save_pretrained(tmp_path / "hf")
    tokens, mask = batch()
    ref = hf_logits(hf, tokens, mask)

    cfg, params = load_hf(tmp_path / "hf", scan_layers=scan)
    assert (cfg.local_window, cfg.local_every, cfg.preset) == (W, 1, "mistral-7b")
    ours = jaxlm_logits(cfg, params, tokens, mask)
    assert np.abs(ours - ref)[mask].max() <= 1e-4
    # The window matters here: without it the logits are another model's.
    full = jaxlm_logits(dataclasses.replace(cfg, local_window=0), params, tokens, mask)
    assert np.abs(full - ref)[mask].max() > 1e-2

    save_hf(cfg, params, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is transformers.MistralForCausalLM
    assert again.config.sliding_window == W
    for k, v in hf.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    np.testing.assert_array_equal(hf_logits(again, tokens, mask)[mask], ref[mask])


def test_jaxlm_model_exports_to_hf_mistral(tmp_path):
    """jaxlm -> HF from a jaxlm preset (mistral-tiny, window 16 < 24 tokens); a Mistral
    without a window (sliding_window null, v0.2 on) round trips as full attention."""
    cfg = ModelConfig(**{**preset_fields("mistral-tiny"), "dtype": "float32"})
    model = build_model(cfg)
    params = init_params(model)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
    mask = np.ones_like(tokens, bool)
    save_hf(cfg, params, tmp_path / "hf")
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.sliding_window == cfg.local_window == 16
    ours = jaxlm_logits(cfg, params, tokens, mask)
    assert np.abs(hf_logits(hf, tokens, mask) - ours).max() <= 1e-4

    dense = dataclasses.replace(cfg, local_window=0)
    save_hf(dense, params, tmp_path / "dense")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "dense").sliding_window is None
    assert load_hf(tmp_path / "dense")[0].local_window == 0


def test_export_refuses_what_mistral_cannot_hold(tmp_path):
    cfg = ModelConfig(**preset_fields("mistral-tiny"))
    params = init_params(build_model(cfg))
    for bad, word in ((dict(local_every=2), "local_every"), (dict(use_bias=True), "bias"),
                      (dict(qkv_bias=True), "qkv_bias")):
        with pytest.raises(ConversionError, match=word):
            save_hf(dataclasses.replace(cfg, **bad), params, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written, not even the folder


def test_preset_size():
    """mistral-7b has the parameter count of the published Mistral-7B-v0.1 checkpoint."""
    cfg = ModelConfig(**preset_fields("mistral-7b"))
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 8), jnp.int32)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 7_241_732_096


# ----------------------------------------------------------------------- the ring cache
def _reference_f64(q, k, v, valid, window):
    """float64 attention of every query over all earlier keys j with i - window < j <= i."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    L, H = q.shape[1], q.shape[-1]
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    allowed = (j <= i) & (j > i - window) & valid[:, None, :]  # [B, L, L]
    s = np.einsum("bind,bjnd->bnij", q, k) / np.sqrt(H)
    s = np.where(allowed[:, None], s, -1e300)  # finite: padding queries stay NaN-free
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnij,bjnd->bind", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("chunks", [(9, 1, 1, 3), (3, 5, 6)])
def test_ring_attention_equals_windowed_attention(chunks):
    """Feeding a sequence through the ring in chunks (one token, several, more than the
    ring holds) attends exactly as the whole sequence with the window mask, with left
    padding; the ring stays at W slots; chunked's tile skipping honours the keys' offset."""
    L, S, N, H = sum(chunks), 5, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, L, N, H)).astype(np.float32) for _ in range(3))
    valid = np.ones((2, L), bool)
    valid[1, :3] = False  # a left-padded row
    want = _reference_f64(q, k, v, valid, S)

    @jax.jit
    def chunk(cache, q, k, v, index):
        keys, values, cache = ring_cache.attend_and_update(cache, k, v, index)
        mask = ring_cache.ring_mask(index, S, q.shape[1], S, jnp.asarray(valid))
        outs = [attn.attention(q, keys, values, mask, impl="reference")]
        if q.shape[1] > 1:
            outs.append(chunked_attention(q, keys, values, mask, scale=H ** -0.5, q_block=2,
                                          kv_block=2))
        return outs, cache

    cache = {"k": jnp.zeros((2, S, N, H)), "v": jnp.zeros((2, S, N, H))}
    start = 0
    for n in chunks:
        sl = slice(start, start + n)
        outs, cache = chunk(cache, q[:, sl], k[:, sl], v[:, sl], jnp.int32(start))
        assert cache["k"].shape == (2, S, N, H)
        rows = valid[:, sl]
        for got in outs:
            np.testing.assert_allclose(np.asarray(got)[rows], want[:, sl][rows], atol=2e-6)
        start += n


def test_cached_decoding_is_bounded_by_the_window_and_exact():
    """DecoderLM fed one token at a time (after an 11-token prefill) for 3 windows keeps
    W slots per layer and gives the logits of the whole sequence at once."""
    cfg = ModelConfig(**{**preset_fields("mistral-tiny"), "local_window": W, "dtype": "float32",
                         "scan_layers": False})
    model = build_model(cfg)
    params = init_params(model)
    L, prefill = 11 + 3 * W, 11
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, L)))
    want = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
    cache = init_cache(cfg, 2, L)
    step = jax.jit(lambda params, t, p, c: model.apply({"params": params}, t, positions_BT=p,
                                                       cache=c))
    pos = jnp.broadcast_to(jnp.arange(L), (2, L))
    got, cache = step(params, tokens[:, :prefill], pos[:, :prefill], cache)
    outs = [np.asarray(got)]
    for i in range(prefill, L):
        got, cache = step(params, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        assert {x.shape[1] for x in jax.tree.leaves(cache["layers"])} == {W}
        outs.append(np.asarray(got))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), want, atol=1e-5)


def test_decoding_loop_memory_does_not_grow_with_length():
    """generate's compiled decoding loop: 16x the new tokens costs a few bytes per token
    (ids, the padding mask), far below one cache slot per token as a full cache would."""
    cfg = ModelConfig(**{**preset_fields("mistral-tiny"), "local_window": 8,
                         "scan_layers": False})
    model = build_model(cfg)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     jnp.zeros((1, 8), jnp.int32)))["params"]

    def temp_bytes(new: int) -> int:
        args = (jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool), jax.random.PRNGKey(0),
                jnp.int32(-1))
        compiled = _decode_cached.lower(model, params, *args, max_new=new, temperature=0.0,
                                        top_k=0, top_p=1.0).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    slot = 2 * cfg.num_layers * 2 * cfg.num_kv_heads * 16 * 4  # k and v, 2 rows, float32
    grown = temp_bytes(1024) - temp_bytes(64)
    assert grown < 0.1 * slot * (1024 - 64), grown


# ------------------------------------------------------------ generation against HF
CORPUS = ["the cat sat on the mat", "a dog ran far and then slept on the red mat",
          "the red cat and the dog sat", "then the cat ran far", "a mat was on the dog"] * 4
TEXT = "a red dog slept on the cat then ran far"  # 11 tokens: longer than the window
NEW = 3 * 8


def llama_tokenizer():
    """A small BPE with Llama's tokenizer class (Mistral ships the same: `<s> $A`)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(tok.to_str())["model"]
    return transformers.LlamaTokenizer(vocab=model["vocab"], merges=[
        tuple(m) for m in model["merges"]], add_bos_token=True)


def test_generation_past_the_window_equals_hf(tmp_path):
    """Greedy decoding of 3 windows (8) of new tokens after a prompt longer than the
    window: `jaxlm.load(dir).generate(text)` emits HF generate's tokens."""
    tok = llama_tokenizer()
    hf = randomise(transformers.MistralForCausalLM(mistral_config(
        vocab_size=len(tok), sliding_window=8, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)), seed=1)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = tok(TEXT, return_tensors="pt")
    assert enc["input_ids"].shape[1] > 8

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(**enc, max_new_tokens=NEW, do_sample=False, min_length=0)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        return new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new

    want = hf_generate()
    assert len(want) == NEW, "HF stopped early: the comparison would end inside the window"
    lm = jaxlm.load(tmp_path)
    assert lm.config.model.local_window == 8
    seen = []
    decode = lm.tokenizer.decode
    lm.tokenizer.decode = lambda ids: seen.append([int(i) for i in ids]) or decode(ids)
    got = lm.generate(TEXT, max_new_tokens=NEW, temperature=0.0)
    assert seen == [want] and got == tok.decode(want, skip_special_tokens=True)
    hf.config.sliding_window = None  # the window changes what is generated here
    assert hf_generate() != want
