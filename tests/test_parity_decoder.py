"""Decoder family against HF transformers: GPT-2, Llama (GQA) and GPT-Neo (GPT-3-style local
layers) built from tiny configs with random weights, converted both ways, compared logit by
logit on padded batches; `jaxlm convert` round trips; conversion errors; presets' sizes."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jaxlm
from jaxlm.cli import main
from jaxlm.config import ModelConfig, preset_fields
from jaxlm.convert import ConversionError
from jaxlm.convert.hf import load_hf, save_hf
from jaxlm.data.tokenizers import load_tokenizer, train_bpe
from jaxlm.families.registry import build_model
from jaxlm.train import rundir

V, B, T = 96, 3, 12
TOL = 1e-4
VALID = np.array([T, 7, 10])  # valid length of each row: the rest is right padding

SMALL = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def gpt2_config(**kw):
    return transformers.GPT2Config(**{**SMALL, **dict(n_positions=32, n_embd=32, n_layer=2,
                                                      n_head=4, n_inner=64), **kw})


def llama_config(**kw):
    return transformers.LlamaConfig(**{**SMALL, **dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=False), **kw})


def gpt_neo_config(**kw):
    return transformers.GPTNeoConfig(**{**SMALL, **dict(
        max_position_embeddings=32, hidden_size=32, num_layers=2, num_heads=4,
        intermediate_size=64, attention_types=[[["global", "local"], 1]], window_size=4), **kw})


CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
           "gpt_neo": transformers.GPTNeoForCausalLM}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales around 1, biases nonzero), so that a transposed,
    swapped or dropped tensor cannot hide behind HF's ones/zeros initialisation."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # LayerNorm / RMSNorm scale
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def make_hf(kind: str, path, config):
    model = randomise(CLASSES[kind](config))
    model.save_pretrained(path)
    return model


def inputs(seed: int = 0, vocab: int = V):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T))
    mask = np.arange(T)[None, :] < VALID[:, None]
    return tokens, mask


def hf_logits(model, tokens, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(
            np.int64)))
    return out.logits.numpy()


def max_diff(a, b, mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask].max())


def jaxlm_logits(cfg: ModelConfig, params, tokens, mask) -> np.ndarray:
    apply = jax.jit(lambda p, t, m: build_model(cfg).apply({"params": p}, t, padding_mask_BT=m))
    return np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask)))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same tensors; `b` may add zero biases (jaxlm's one use_bias switch covers attention
    and MLP, so an attention-bias-only Llama comes back with zero MLP biases)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) <= set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k in set(sb) - set(sa):
        assert k.endswith(".bias") and not sb[k].any(), k


CASES = {
    "gpt2-tied-unrolled": ("gpt2", gpt2_config(), False),
    "gpt2-untied-relu-scan": ("gpt2", gpt2_config(tie_word_embeddings=False,
                                                  activation_function="relu"), True),
    "llama-gqa-scan": ("llama", llama_config(), True),
    "llama-tied-bias-unrolled": ("llama", llama_config(tie_word_embeddings=True,
                                                       attention_bias=True), False),
    "gpt_neo-local": ("gpt_neo", gpt_neo_config(), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_jaxlm_to_hf_parity(case, tmp_path, record_property):
    kind, hf_cfg, scan = CASES[case]
    hf = make_hf(kind, tmp_path / "hf", hf_cfg)
    tokens, mask = inputs()
    ref = hf_logits(hf, tokens, mask)

    cfg, params = load_hf(tmp_path / "hf", scan_layers=scan)
    leaf = "layers" if scan else "layers_0"
    assert leaf in params["decoder"]
    ours = jaxlm_logits(cfg, params, tokens, mask)
    diff = max_diff(ours, ref, mask)
    record_property("max_abs_diff", diff)
    print(f"{case}: max |logits(jaxlm) - logits(HF)| = {diff:.2e}")
    assert diff <= TOL, diff

    # Back to HF: the very same tensors, hence the same logits.
    save_hf(cfg, params, tmp_path / "back")
    again = CLASSES[kind].from_pretrained(tmp_path / "back").eval()
    assert_same_weights(hf, again)
    np.testing.assert_array_equal(hf_logits(again, tokens, mask)[mask], ref[mask])


def test_jaxlm_load_of_an_hf_dir_takes_padding(tmp_path):
    hf = make_hf("llama", tmp_path, llama_config())
    tokens, mask = inputs(1)
    lm = jaxlm.load(tmp_path)
    assert lm.tokenizer is None and lm.config.model.num_kv_heads == 2
    assert lm.config.model.rope_theta == 500.0
    ours = lm(tokens, padding_mask_BT=jnp.asarray(mask))
    assert max_diff(ours, hf_logits(hf, tokens, mask), mask) <= TOL
    # Unpadded rows also match through the jitted path.
    np.testing.assert_allclose(np.asarray(lm(tokens[:1])), hf_logits(hf, tokens[:1],
                               mask[:1]), atol=TOL)


def test_gpt_neo_local_layers_matter(tmp_path):
    """The GPT-Neo parity above would be vacuous if the window never bit: without it the
    logits differ, and the imported config is GPT-3's every-second-layer pattern."""
    hf = make_hf("gpt_neo", tmp_path, gpt_neo_config())
    cfg, params = load_hf(tmp_path)
    assert (cfg.local_window, cfg.local_every, cfg.attention_scale) == (4, 2, 1.0)
    tokens, mask = inputs(2)
    dense = dataclasses.replace(cfg, local_window=0)
    ref = hf_logits(hf, tokens, mask)
    assert max_diff(jaxlm_logits(dense, params, tokens, mask), ref, mask) > 100 * TOL


def test_local_window_hides_tokens_outside_it():
    """All-local single layer: token 0 reaches positions < window only."""
    cfg = ModelConfig(**{**preset_fields("gpt2"), "num_layers": 1, "d_model": 32,
                         "num_heads": 4, "d_ff": 64, "vocab_size": V, "max_seq_len": 32,
                         "local_window": 3, "local_every": 1})
    model = build_model(cfg)
    tokens = jnp.asarray(inputs(3)[0][:1])
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    a, b = apply(tokens), apply(tokens.at[0, 0].set((tokens[0, 0] + 1) % V))
    changed = np.abs(np.asarray(a - b)).max(-1)[0] > 1e-6
    assert changed.tolist() == [True, True, True] + [False] * (T - 3)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    make_hf("gpt2", tmp_path / "hf", gpt2_config())
    cfg, params = load_hf(tmp_path / "hf")
    with pytest.raises(ConversionError, match="local_window"):
        save_hf(dataclasses.replace(cfg, preset="gpt3", local_window=4), params, tmp_path / "o")
    with pytest.raises(ConversionError, match="gated"):
        save_hf(dataclasses.replace(cfg, gated_mlp=True), params, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- `jaxlm convert`

CORPUS_WORDS = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]


def corpus(path):
    rng = np.random.default_rng(0)
    lines = [f"SPEAKER{i % 3}:\n" + " ".join(rng.choice(CORPUS_WORDS, 8)) + ".\n"
             for i in range(300)]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A real HF tokenizer directory (PreTrainedTokenizerFast.save_pretrained), 300 ids."""
    tmp = tmp_path_factory.mktemp("tok")
    bpe = train_bpe(corpus(tmp / "c.txt").read_text().splitlines(), 300)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(tmp / "tok")
    return tmp / "tok"


def with_tokenizer(hf_dir, tok_dir):
    for f in tok_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)


def test_cli_round_trip_gpt2(tmp_path, hf_tokenizer, capsys):
    hf = make_hf("gpt2", tmp_path / "hf", gpt2_config(vocab_size=300))
    with_tokenizer(tmp_path / "hf", hf_tokenizer)
    tokens, mask = inputs(4, vocab=300)
    ref = hf_logits(hf, tokens, mask)

    run = tmp_path / "run"
    assert main(["convert", "hf2jaxlm", "--hf", str(tmp_path / "hf"), "--out", str(run),
                 "model.scan_layers=true"]) == 0
    assert (run / "config.yaml").exists() and (run / "tokenizer").is_dir()
    lm = jaxlm.load(run)
    assert lm.config.model.scan_layers and "layers" in lm.params["decoder"]
    assert max_diff(lm(tokens, padding_mask_BT=jnp.asarray(mask)), ref, mask) <= TOL
    text = "thou art my lord"
    assert lm.tokenizer.encode(text) == load_tokenizer(tmp_path / "hf").encode(text)

    out = tmp_path / "back"
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(out)]) == 0
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert_same_weights(hf, again)
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 1
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast(text)["input_ids"] == lm.tokenizer.encode(text)
    assert fast.eos_token == "</s>"
    # A second export into the same place is refused and leaves it as it was.
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def test_converted_llama_fine_tunes_and_exports(tmp_path, hf_tokenizer):
    """HF Llama -> run -> `jaxlm train` (resumes the converted step-0 checkpoint) -> HF."""
    make_hf("llama", tmp_path / "hf", llama_config(vocab_size=300))
    with_tokenizer(tmp_path / "hf", hf_tokenizer)
    run = tmp_path / "run"
    assert main(["convert", "hf2jaxlm", "--hf", str(tmp_path / "hf"), "--out", str(run),
                 "train.seq_len=32", "train.batch_size=8", "optim.warmup_steps=1",
                 "optim.lr=1e-2"]) == 0
    before = jaxlm.load(run).params
    assert main(["train", f"run.dir={run}", f"data.files={corpus(tmp_path / 'c.txt')}",
                 "train.steps=3", "train.eval_every=0", "train.log_every=1",
                 "checkpoint.every=3", "run.quiet=true"]) == 0
    rows = [r for r in rundir.read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    lm = jaxlm.load(run)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before),
                                                       jax.tree.leaves(lm.params))]
    assert min(moved) > 0

    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(tmp_path / "out")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, mask = inputs(5, vocab=300)
    ours = lm(tokens, padding_mask_BT=jnp.asarray(mask))
    assert max_diff(ours, hf_logits(hf, tokens, mask), mask) <= TOL


# ---------------------------------------------------------------- errors

def test_unsupported_architecture(tmp_path, capsys):
    hf = tmp_path / "mamba"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    save_file({"backbone.embeddings.weight": np.zeros((10, 4), np.float32)},
              str(hf / "model.safetensors"))
    with pytest.raises(ConversionError, match="'mamba' is not supported"):
        jaxlm.load(hf)
    code = main(["convert", "hf2jaxlm", "--hf", str(hf), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "mamba" in err and "llama" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_missing_tensor_is_named(tmp_path, capsys):
    make_hf("gpt2", tmp_path / "hf", gpt2_config())
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(path))
    with pytest.raises(ConversionError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_hf(tmp_path / "hf")
    code = main(["convert", "hf2jaxlm", "--hf", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "transformer.h.1.mlp.c_fc.bias" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.partial*"))


def test_architecture_overrides_are_refused(tmp_path, capsys):
    make_hf("gpt2", tmp_path / "hf", gpt2_config())
    code = main(["convert", "hf2jaxlm", "--hf", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "run"), "model.num_layers=1"])
    err = capsys.readouterr().err
    assert code == 2 and "model.num_layers comes from the HF config" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("name, expected, rel", [
    ("gpt3-350m", 350e6, 0.03), ("gpt3-1.3b", 1.3e9, 0.03), ("gpt3-13b", 13e9, 0.03),
    ("gpt3-175b", 175e9, 0.03),
    # Exact counts of the HF checkpoints of these shapes (GPT-Neo plus the zero q/k/v biases
    # jaxlm keeps).
    ("gpt-neo", 125_198_592 + 12 * 3 * 768, 0), ("llama2-7b", 6_738_415_616, 0),
    ("llama3-8b", 8_030_261_248, 0),
])
def test_preset_sizes(name, expected, rel):
    cfg = ModelConfig(**preset_fields(name))
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 8), jnp.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert abs(n - expected) <= rel * expected, n
