"""Today's dense decoders against HF transformers: Llama 3.x (RoPE scaling llama3 / linear /
dynamic, tied and untied), Qwen2 (q/k/v biases, a sliding layer), Qwen3 (q/k norms), Gemma 2
(soft-caps, sandwich norms, (1 + w) RMSNorm, scaled embeddings, sliding even layers) and
Gemma 3 (q/k norms, per-layer-type RoPE). Tiny random float32 HF models converted both ways
and compared logit by logit on padded batches; greedy generation through
`jaxlm.load(dir).generate(text)` against HF `generate`; the presets' sizes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from test_hf_generate import gpt2_tokenizer, jaxlm_generate, llama_tokenizer
from test_hf_generate import randomise as randomise_for_generation
from test_parity_decoder import (
    SMALL,
    TOL,
    assert_same_weights,
    hf_logits,
    inputs,
    jaxlm_logits,
    max_diff,
    randomise,
)

import jaxlm
from jaxlm.cli import main
from jaxlm.config import ModelConfig, preset_fields
from jaxlm.convert.hf import load_hf, save_hf
from jaxlm.families.registry import build_model

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def llama3_config(rope=None, **kw):
    rope = rope or {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32}
    return transformers.LlamaConfig(**{**SMALL, **SHAPE, "rope_parameters": rope,
                                       "tie_word_embeddings": False, **kw})


def qwen2_config(**kw):
    return transformers.Qwen2Config(**{**SMALL, **SHAPE, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1000.0}, "tie_word_embeddings": False, **kw})


def qwen3_config(**kw):
    return transformers.Qwen3Config(**{**SMALL, **SHAPE, "head_dim": 16, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1000.0}, "tie_word_embeddings": True, **kw})


def gemma2_config(**kw):
    # Small caps and window, a query_pre_attn_scalar unlike head_dim: each part acts.
    return transformers.Gemma2Config(**{**SMALL, **SHAPE, "num_hidden_layers": 3,
                                        "head_dim": 8, "query_pre_attn_scalar": 12,
                                        "sliding_window": 4, "attn_logit_softcapping": 2.0,
                                        "final_logit_softcapping": 3.0, **kw})


def gemma3_config(**kw):
    return transformers.Gemma3TextConfig(**{
        **SMALL, **SHAPE, "num_hidden_layers": 3, "head_dim": 16, "query_pre_attn_scalar": 8,
        "sliding_window": 4, "final_logit_softcapping": 5.0,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}, **kw})


CLASSES = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
           "gemma3_text": transformers.Gemma3ForCausalLM}

# case: (HF model_type, HF config, scan_layers, the jaxlm fields the import must set)
CASES = {
    "llama3-untied-scan": ("llama", llama3_config(), True,
                           dict(rope_scaling="llama3", rope_factor=8.0, rope_high_freq_factor=4.0,
                                rope_original_max_len=32, tie_embeddings=False)),
    "llama3.2-tied": ("llama", llama3_config(tie_word_embeddings=True), False,
                      dict(rope_scaling="llama3", tie_embeddings=True)),
    "llama-linear": ("llama", llama3_config({"rope_type": "linear", "rope_theta": 500.0,
                                             "factor": 4.0}), True,
                     dict(rope_scaling="linear", rope_factor=4.0)),
    # Rows of 12 positions past max_position_embeddings = 8: the NTK base grows.
    "llama-dynamic": ("llama", llama3_config({"rope_type": "dynamic", "rope_theta": 500.0,
                                              "factor": 3.0}, max_position_embeddings=8),
                      False, dict(rope_scaling="dynamic", rope_factor=3.0, max_seq_len=8)),
    "qwen2": ("qwen2", qwen2_config(), True, dict(qkv_bias=True, use_bias=False)),
    "qwen2-sliding-tied": ("qwen2", qwen2_config(use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=1, tie_word_embeddings=True),
                           False, dict(local_window=4, local_pattern="GL")),
    "qwen3-tied": ("qwen3", qwen3_config(), True, dict(qk_norm=True, tie_embeddings=True)),
    "qwen3-untied": ("qwen3", qwen3_config(tie_word_embeddings=False), False,
                     dict(qk_norm=True, tie_embeddings=False)),
    "gemma2": ("gemma2", gemma2_config(), True,
               dict(norm="rmsnorm_plus1", sandwich_norm=True, embed_scale=True,
                    attention_softcap=2.0, final_logit_softcap=3.0, local_window=4,
                    local_pattern="LG", attention_scale=12 ** -0.5)),
    "gemma3-unrolled": ("gemma3_text", gemma3_config(), False,
                        dict(qk_norm=True, local_pattern="LLG", rope_theta=1000.0,
                             rope_scaling="linear", rope_factor=4.0, rope_local_theta=50.0,
                             attention_softcap=0.0, final_logit_softcap=5.0)),
    "gemma3-scan": ("gemma3_text", gemma3_config(), True, dict(qk_norm=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_jaxlm_to_hf_parity(case, tmp_path, record_property):
    kind, hf_cfg, scan, fields = CASES[case]
    hf = randomise(CLASSES[kind](hf_cfg))
    hf.save_pretrained(tmp_path / "hf")
    tokens, mask = inputs()
    ref = hf_logits(hf, tokens, mask)

    cfg, params = load_hf(tmp_path / "hf", scan_layers=scan)
    assert {k: getattr(cfg, k) for k in fields} == fields
    diff = max_diff(jaxlm_logits(cfg, params, tokens, mask), ref, mask)
    record_property("max_abs_diff", diff)
    assert diff <= TOL, diff

    # Back to HF (params_to_hf + hf_config_from): the same tensors, the same logits.
    save_hf(cfg, params, tmp_path / "back")
    again = CLASSES[kind].from_pretrained(tmp_path / "back").eval()
    assert type(again.config) is type(hf.config)
    assert_same_weights(hf, again)
    np.testing.assert_allclose(hf_logits(again, tokens, mask)[mask], ref[mask], atol=1e-6)


@pytest.mark.parametrize("case, offs", [
    ("llama3-untied-scan", [dict(rope_scaling="none")]),
    ("llama-dynamic", [dict(rope_scaling="none")]),
    ("qwen2-sliding-tied", [dict(local_window=0)]),
    ("gemma2", [dict(attention_softcap=0.0), dict(final_logit_softcap=0.0),
                dict(local_pattern="GL"), dict(embed_scale=False)]),
    ("gemma3-unrolled", [dict(rope_local_theta=0.0), dict(attention_scale=0.0)]),
])
def test_each_part_acts(case, offs, tmp_path):
    """The parity above would be vacuous for a part that never changed the logits: turning
    each off moves them well past the tolerance."""
    kind, hf_cfg, scan, _ = CASES[case]
    randomise(CLASSES[kind](hf_cfg)).save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path, scan_layers=scan)
    tokens, mask = inputs(1)
    base = jaxlm_logits(cfg, params, tokens, mask)
    for off in offs:
        changed = jaxlm_logits(dataclasses.replace(cfg, **off), params, tokens, mask)
        assert max_diff(base, changed, mask) > 100 * TOL, off


def test_cli_round_trip_gemma3(tmp_path):
    """`jaxlm convert hf2jaxlm` -> run -> `jaxlm convert jaxlm2hf` -> HF, same logits."""
    hf = randomise(CLASSES["gemma3_text"](gemma3_config()))
    hf.save_pretrained(tmp_path / "hf")
    tokens, mask = inputs(2)
    ref = hf_logits(hf, tokens, mask)
    run = tmp_path / "run"
    assert main(["convert", "hf2jaxlm", "--hf", str(tmp_path / "hf"), "--out", str(run),
                 "model.scan_layers=true"]) == 0
    lm = jaxlm.load(run)
    assert lm.config.model.preset == "gemma3" and lm.config.model.qk_norm
    assert max_diff(lm(tokens, padding_mask_BT=jnp.asarray(mask)), ref, mask) <= TOL
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(tmp_path / "out")]) == 0
    again = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_diff(hf_logits(again, tokens, mask), ref, mask) <= TOL


# ---------------------------------------------------------------- generation

TEXTS = ["the cat sat on", "a red dog ran far and"]
NEW = 8

# family: (tokenizer, HF class, config keywords); windows of 3 keys, shorter than prompt +
# new tokens, so sliding layers act while decoding.
GENERATION = {
    "llama3": (llama_tokenizer, "llama", lambda: llama3_config(tie_word_embeddings=True)),
    "qwen2": (gpt2_tokenizer, "qwen2", lambda: qwen2_config(
        use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3": (gpt2_tokenizer, "qwen3", qwen3_config),
    "gemma2": (llama_tokenizer, "gemma2", lambda: gemma2_config(sliding_window=3)),
    "gemma3": (llama_tokenizer, "gemma3_text", lambda: gemma3_config(sliding_window=3)),
}


def _hf_greedy(model, tok, text: str) -> list[int]:
    enc = tok(text, return_tensors="pt")
    gen = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False,
                                        eos_token_id=model.config.eos_token_id,
                                        pad_token_id=model.config.pad_token_id)
    out = model.generate(**enc, generation_config=gen)[0].tolist()[enc["input_ids"].shape[1]:]
    eos = model.config.eos_token_id
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("family", list(GENERATION))
def test_generate_matches_hf_greedy(family, tmp_path):
    make_tok, kind, make_cfg = GENERATION[family]
    tok = make_tok()
    ids = {f"{n}_token_id": tok.convert_tokens_to_ids(getattr(tok, f"{n}_token"))
           for n in ("bos", "eos") if getattr(tok, f"{n}_token") is not None}
    cfg = make_cfg()
    for key, value in dict(vocab_size=len(tok), pad_token_id=None, **ids).items():
        setattr(cfg, key, value)
    model = randomise_for_generation(CLASSES[kind](cfg))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = [_hf_greedy(model, tok, t) for t in TEXTS]
    assert any(want), "HF generated nothing: the comparison would be empty"
    out, got = jaxlm_generate(jaxlm.load(tmp_path), TEXTS, beams=1)
    assert got == want
    assert out == [tok.decode(w, skip_special_tokens=True) for w in want]


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("name, published", [
    # Parameter counts of the published checkpoints (model cards / safetensors totals).
    ("llama3.1-8b", 8.03e9), ("llama3.2-1b", 1.24e9), ("llama3.2-3b", 3.21e9),
    ("qwen2.5-0.5b", 0.49e9), ("qwen2.5-7b", 7.61e9), ("qwen3-0.6b", 0.6e9),
    ("qwen3-8b", 8.2e9), ("gemma2-2b", 2.61e9), ("gemma2-9b", 9.24e9),
    ("gemma3-1b", 1.0e9),
    ("gemma3-4b", 3.88e9),  # the language model of the 4.3B checkpoint (no vision tower)
])
def test_modern_preset_sizes(name, published):
    cfg = ModelConfig(**preset_fields(name))
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 8), jnp.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert abs(n - published) <= 0.02 * published, n


@pytest.mark.parametrize("name", ["llama3-tiny", "qwen2-tiny", "qwen3-tiny", "gemma2-tiny",
                                  "gemma3-tiny"])
def test_tiny_presets_export_to_hf(name, tmp_path):
    """Each tiny preset is a model of its HF class: exported, HF gives jaxlm's logits."""
    cfg = ModelConfig(**{**preset_fields(name), "max_seq_len": 64})
    tokens, mask = inputs(3, vocab=cfg.vocab_size)
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), tokens)["params"]
    rng = np.random.default_rng(0)  # random everywhere, norm scales included
    params = jax.tree.map(lambda x: rng.normal(0.0, 0.3, x.shape).astype(np.float32),
                          nn.unbox(shapes))
    save_hf(cfg, params, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(jaxlm_logits(cfg, params, tokens, mask), hf_logits(hf, tokens, mask),
                    mask) <= TOL
