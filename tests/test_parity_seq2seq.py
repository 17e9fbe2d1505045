"""Encoder-decoder family against reference implementations: HF T5 (v1.0 and v1.1 layouts),
BART and Marian built from tiny configs with random weights, loaded through `jaxlm.load`,
compared logit by logit on batches padded in source and target, and written back with
`save_hf`; torch.nn.Transformer weights in the `transformer` preset."""

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file

import jaxlm
from jaxlm.config import ModelConfig, preset_fields
from jaxlm.convert import ConversionError
from jaxlm.convert.hf import load_hf, save_hf
from jaxlm.convert.torch_transformer import load_torch_transformer
from jaxlm.families.registry import build_model
from jaxlm.models import attention as attn

V, B, S, T = 96, 3, 11, 8
TOL = 1e-4
SRC_LEN = np.array([S, 6, 9])  # valid length of each source row; the rest is padding
TGT_LEN = np.array([T, T, 5])
PAD = 0

SIDES = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
             max_position_embeddings=32, vocab_size=V, dropout=0.0)
CONFIGS = {
    # Few buckets and a short max distance so that the logarithmic buckets are exercised.
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        dropout_rate=0.0)),
    "t5-v1.1": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)),
    "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        **SIDES, activation_function="gelu", pad_token_id=1, decoder_start_token_id=2)),
    "marian": lambda: transformers.MarianMTModel(transformers.MarianConfig(
        **SIDES, activation_function="swish", scale_embedding=True, pad_token_id=V - 1,
        decoder_start_token_id=V - 1, eos_token_id=0, tie_word_embeddings=False)),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (norm scales around 1, biases and final_logits_bias nonzero), so a
    transposed, swapped or dropped tensor cannot hide behind ones/zeros initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1 or name == "final_logits_bias":
                p.copy_(0.2 * noise)
            elif any(k in name for k in ("shared", "lm_head", "embed_tokens")):
                p.copy_(noise)
            elif not isinstance(model, transformers.MarianMTModel) or "positions" not in name:
                p.copy_(noise * p.shape[-1] ** -0.5)
        if isinstance(model, transformers.MarianMTModel):  # untied: one table read per stack,
            for side in (model.model.encoder, model.model.decoder):  # equal as in checkpoints
                side.embed_tokens.weight.copy_(model.model.shared.weight)
    return model.eval()


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    src_mask = np.arange(S)[None] < SRC_LEN[:, None]
    tgt_mask = np.arange(T)[None] < TGT_LEN[:, None]
    src = np.where(src_mask, rng.integers(3, V - 1, (B, S)), PAD)
    tgt = np.where(tgt_mask, rng.integers(3, V - 1, (B, T)), PAD)
    return src, tgt, src_mask, tgt_mask


def hf_logits(model, src, tgt, src_mask, tgt_mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(src), attention_mask=torch.tensor(src_mask).long(),
                    decoder_input_ids=torch.tensor(tgt),
                    decoder_attention_mask=torch.tensor(tgt_mask).long())
    return out.logits.numpy()


def max_diff(a, b, tgt_mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[tgt_mask].max())


def save(model, path) -> None:
    model.save_pretrained(path, safe_serialization=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_seq2seq_parity_both_ways(name, tmp_path):
    model = randomise(CONFIGS[name]())
    if name == "t5-v1.1":  # untie as real v1.1 checkpoints are: own lm_head, no rescale
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 0.2)
    save(model, tmp_path / "hf")
    if name == "t5-v1.1":  # ... and with their config.json (pre-transformers-5 style)
        cfg_path = tmp_path / "hf" / "config.json"
        hf_cfg = json.loads(cfg_path.read_text())
        hf_cfg.pop("scale_decoder_outputs")
        cfg_path.write_text(json.dumps(dict(hf_cfg, tie_word_embeddings=False)))
        model = type(model).from_pretrained(tmp_path / "hf").eval()
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    src, tgt, src_mask, tgt_mask = batch()
    ref = hf_logits(model, src, tgt, src_mask, tgt_mask)

    lm = jaxlm.load(tmp_path / "hf")
    assert lm.config.model.family == "encoder_decoder"
    got = lm(src, tgt, src_padding_mask_BS=src_mask, tgt_padding_mask_BT=tgt_mask)
    assert got.shape == (B, T, V)
    diff = max_diff(got, ref, tgt_mask)
    print(f"{name}: HF -> jaxlm max |dlogit| = {diff:.2e}")
    assert diff <= TOL, diff

    save_hf(lm.config.model, lm.params, tmp_path / "back")
    back = type(model).from_pretrained(tmp_path / "back").eval()
    diff = max_diff(hf_logits(back, src, tgt, src_mask, tgt_mask), ref, tgt_mask)
    print(f"{name}: jaxlm -> HF max |dlogit| = {diff:.2e}")
    assert diff <= TOL, diff


def test_scanned_layers_and_encode_then_decode(tmp_path):
    model = randomise(CONFIGS["t5"]())
    save(model, tmp_path)
    src, tgt, src_mask, tgt_mask = batch(1)
    ref = hf_logits(model, src, tgt, src_mask, tgt_mask)
    cfg, params = load_hf(tmp_path, scan_layers=True)
    assert "layers" in params["decoder"]["stack"]  # stacked on a leading layer axis
    lm_model, variables = build_model(cfg), {"params": params}
    got = jax.jit(lm_model.apply)(variables, src, tgt, src_padding_mask_BS=src_mask,
                                  tgt_padding_mask_BT=tgt_mask)
    assert max_diff(got, ref, tgt_mask) <= TOL
    enc = jax.jit(partial(lm_model.apply, method="encode"))(variables, src,
                                                            src_padding_mask_BS=src_mask)
    got = jax.jit(partial(lm_model.apply, method="decode"))(
        variables, tgt, enc, src_padding_mask_BS=src_mask, tgt_padding_mask_BT=tgt_mask)
    assert max_diff(got, ref, tgt_mask) <= TOL


def test_missing_t5_tensor_is_named(tmp_path):
    save(CONFIGS["t5"](), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    del tensors[name]
    save_np(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        jaxlm.load(tmp_path)


def test_relative_position_buckets_match_hf():
    rel = torch.arange(-40, 41)[None]
    for bidirectional in (True, False):
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=20)
        got = attn.relative_position_buckets(jnp.asarray(rel.numpy()), bidirectional, 32, 20)
        np.testing.assert_array_equal(np.asarray(got), ref.numpy())


def test_marian_split_sinusoids_match_hf():
    emb = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(50, 32)
    np.testing.assert_allclose(attn.sinusoidal_positions(50, 32, "split"),
                               emb.create_weight().numpy(), atol=2e-5)


def _aiayn_positions(num: int, dim: int) -> np.ndarray:
    """The paper's table, written independently: PE(pos, 2i) = sin, PE(pos, 2i+1) = cos."""
    pos = np.arange(num)[:, None]
    angle = pos / np.power(10000.0, np.arange(0, dim, 2) / dim)
    table = np.zeros((num, dim))
    table[:, 0::2], table[:, 1::2] = np.sin(angle), np.cos(angle)
    return table.astype(np.float32)


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_nn_transformer_parity(norm_first, tmp_path):
    D, N, F, L = 32, 4, 64, 2
    torch.manual_seed(0)
    net = torch.nn.Transformer(d_model=D, nhead=N, num_encoder_layers=L, num_decoder_layers=L,
                               dim_feedforward=F, dropout=0.0, batch_first=True,
                               norm_first=norm_first)
    randomise(net, seed=1)
    embed = torch.randn(V, D) * D ** -0.5
    save_file(net.state_dict(), str(tmp_path / "transformer.safetensors"))

    src, tgt, src_mask, tgt_mask = batch(2)
    pe = torch.tensor(_aiayn_positions(64, D))

    def embed_ids(ids):  # shared embedding times sqrt(d_model), plus sinusoids
        return embed[torch.tensor(ids)] * D ** 0.5 + pe[: ids.shape[1]]

    with torch.no_grad():
        hidden = net(embed_ids(src), embed_ids(tgt),
                     tgt_mask=torch.triu(torch.ones(T, T, dtype=torch.bool), 1),
                     src_key_padding_mask=torch.tensor(~src_mask),
                     tgt_key_padding_mask=torch.tensor(~tgt_mask),
                     memory_key_padding_mask=torch.tensor(~src_mask), tgt_is_causal=True)
        enc_ref = net.encoder(embed_ids(src), src_key_padding_mask=torch.tensor(~src_mask))
    ref = (hidden @ embed.T).numpy()

    cfg = ModelConfig(**dict(preset_fields("transformer"), num_layers=L, d_model=D,
                             num_heads=N, d_ff=F, vocab_size=V, max_seq_len=64,
                             norm_position="pre" if norm_first else "post"))
    params = load_torch_transformer(tmp_path / "transformer.safetensors", cfg, embed.numpy())
    model = build_model(cfg)
    got = jax.jit(model.apply)({"params": params}, src, tgt, src_padding_mask_BS=src_mask,
                               tgt_padding_mask_BT=tgt_mask)
    diff = max_diff(got, ref, tgt_mask)
    print(f"nn.Transformer (norm_first={norm_first}): max |dlogit| = {diff:.2e}")
    assert diff <= TOL, diff
    enc = jax.jit(partial(model.apply, method="encode"))({"params": params}, src,
                                                         src_padding_mask_BS=src_mask)
    assert max_diff(enc, enc_ref.numpy(), src_mask) <= TOL


def test_presets_have_their_published_shapes():
    sizes = {"transformer": (60e6, 66e6), "t5": (59e6, 62e6), "bart": (138e6, 142e6),
             "marian": (72e6, 76e6)}
    for preset, (lo, hi) in sizes.items():
        cfg = ModelConfig(**preset_fields(preset))
        model = build_model(cfg)
        shapes = jax.eval_shape(lambda m=model: m.init(
            jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32)))
        n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
        assert lo <= n <= hi, (preset, n)


def test_convert_refuses_a_model_hf_cannot_hold(tmp_path):
    save(CONFIGS["bart"](), tmp_path / "hf")
    lm = jaxlm.load(tmp_path / "hf")
    bad = dataclasses.replace(lm.config.model, embed_norm=False)
    with pytest.raises(ConversionError, match="model.embed_norm"):
        save_hf(bad, lm.params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["t5-v1.1", "bart"])
def test_greedy_and_beam_search_match_hf_generate(name, tmp_path):
    """KV-cache greedy decoding and beam search (with length penalties) emit HF generate()'s
    tokens: same EOS handling, candidate count and stopping rule."""
    from jaxlm.generate import generate_seq2seq_ids

    model = randomise(CONFIGS[name]())
    save(model, tmp_path)
    lm = jaxlm.load(tmp_path)
    start, pad = lm.config.model.decoder_start_id, lm.config.model.pad_token_id
    rng = np.random.default_rng(0)
    sources = [rng.integers(3, V - 1, n).tolist() for n in (7, 4, 9, 11, 5, 8)]
    greedy = generate_seq2seq_ids(lm.model, lm.params, sources, max_new_tokens=10,
                                  start_id=start, eos_id=None)
    # EOS: a token the model emits mid-sequence, so hypotheses end at different lengths.
    counts = np.bincount([t for row in greedy for t in row[2:6]], minlength=V)
    eos = int(np.argsort(counts)[-3])
    width = max(map(len, sources))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sources])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])
    for beams, alpha in ((1, 1.0), (3, 0.0), (3, 1.0), (4, 2.0)):
        gen = transformers.GenerationConfig(
            max_new_tokens=10, num_beams=beams, length_penalty=alpha, early_stopping=False,
            do_sample=False, decoder_start_token_id=start, eos_token_id=eos, pad_token_id=pad)
        model.generation_config = gen  # no forced BOS/EOS or other model defaults
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attention,
                                 generation_config=gen).tolist()
        want = [o[1:][:o[1:].index(eos)] if eos in o[1:] else o[1:] for o in out]
        got = generate_seq2seq_ids(lm.model, lm.params, sources, max_new_tokens=10,
                                   start_id=start, eos_id=eos, beams=beams,
                                   length_penalty=alpha)
        assert got == want, (beams, alpha)
