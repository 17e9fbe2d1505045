"""LoRA: the adapter model equals HF PEFT with the same adapter weights on a converted Llama;
adapters shard like their kernels and train on every family over an fsdp × tensor mesh while
the base stays bit-identical; the optimizer state holds the adapters alone; fresh adapters
start at the base model (B zero, A PEFT-random) and lora.dropout=0 is off; lora.train_also
=[embed] trains the embeddings too, and a CLI run's merged load holds them; a checkpointed
run resumes bit-exactly; a CLI run from an HF directory lowers the loss, and its merged
exports (jaxlm and HF) and its PEFT export give the adapter model's logits; bad lora keys
exit 2 with one line."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import TINY_MODEL, TINY_SHAPE, corpus, tiny_hf_llama

import jaxlm
from jaxlm import config as config_lib
from jaxlm import lora, setup, sharding, weights
from jaxlm.checkpoint import Checkpointer
from jaxlm.cli import main
from jaxlm.config import LoraConfig
from jaxlm.convert.hf import load_hf
from jaxlm.families.registry import build_model
from jaxlm.train import rundir
from jaxlm.train.report import state_bytes

V, R, ALPHA = 260, 4, 8.0  # the byte tokenizer's vocabulary: HF dirs train without tokenizer
ALL = ["query", "key", "value", "out", "mlp_in", "mlp_out"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random tiny HF Llama directory (grouped-query attention, untied embeddings)."""
    hf = tmp_path_factory.mktemp("lora") / "hf"
    return hf, tiny_hf_llama(hf, V)


def _tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (2, 11))


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.numpy()


def _adapters_from_peft(state: dict, cfg) -> dict:
    """jaxlm adapter params (unrolled layers) of PEFT's lora_A [r, in] / lora_B [out, r], by a
    mapping written here from PEFT's definition, not from jaxlm.convert.peft."""
    N, K, H, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, R

    def pair(module):
        a = state[f"base_model.model.{module}.lora_A.default.weight"].numpy().T  # [in, r]
        b = state[f"base_model.model.{module}.lora_B.default.weight"].numpy().T  # [r, out]
        return a, b

    layers = {}
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        attn, mlp = {}, {}
        for ours, theirs, heads in (("query", "q_proj", N), ("key", "k_proj", K),
                                    ("value", "v_proj", K)):
            a, b = pair(f"{pre}.self_attn.{theirs}")
            attn[ours] = {"lora_a": a, "lora_b": b.reshape(r, heads, H)}
        a, b = pair(f"{pre}.self_attn.o_proj")
        attn["out"] = {"lora_a": a.reshape(N, H, r), "lora_b": b}
        for ours, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"),
                             ("wo", "down_proj")):
            a, b = pair(f"{pre}.mlp.{theirs}")
            mlp[ours] = {"lora_a": a, "lora_b": b}
        layers[f"layers_{i}"] = {"attn": attn, "mlp": mlp}
    return {"decoder": layers}


def test_adapter_model_equals_hf_peft(hf_llama):
    hf, model = hf_llama
    lcfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=HF_TARGETS, lora_dropout=0.0)
    peft_model = peft.get_peft_model(copy.deepcopy(model), lcfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero: give both matrices real values
                p.normal_(0.0, 0.2)
    tokens = _tokens()
    want = _hf_logits(peft_model, tokens)

    cfg, base = load_hf(hf)
    adapted = build_model(lora.adapted(cfg, LoraConfig(rank=R, alpha=ALPHA, targets=ALL)))
    params = lora.join(_adapters_from_peft(peft_model.state_dict(), cfg), base)
    got = np.asarray(adapted.apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(want - _hf_logits(model, tokens)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # Folded into the kernels, the adapters give the same model without them.
    merged = lora.merge(params, ALPHA / R)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(np.asarray(build_model(cfg).apply({"params": merged}, tokens)),
                               want, atol=1e-4, rtol=0)
    # DPO's reference: B zeroed gives the base model bit for bit, from the same tree.
    ref = adapted.apply({"params": lora.without_adapters(params)}, tokens)
    np.testing.assert_array_equal(np.asarray(ref),
                                  np.asarray(build_model(cfg).apply({"params": base}, tokens)))


def _cfg(preset: str, targets: list[str], *extra: str):
    over = [*TINY_MODEL, f"model.preset={preset}", f"lora.rank={R}", f"lora.alpha={ALPHA}",
            f"lora.targets=[{','.join(targets)}]", "lora.dropout=0.1", "optim.lr=1e-2",
            "optim.warmup_steps=0", *MESH, *extra]
    return config_lib.load(None, over)


def _spec(sh, ndim: int) -> tuple:
    spec = tuple(sh.spec)
    return spec + (None,) * (ndim - len(spec))


def _check_adapter_shardings(abstract_params) -> int:
    """Every A has its kernel's input axes' sharding and an unsharded rank; B likewise with
    the output axes. Returns how many adapters were checked."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    by_key = {tuple(str(k.key) for k in path): leaf for path, leaf in flat}
    n = 0
    for key, a in by_key.items():
        if key[-1] != "lora_a":
            continue
        w, b = by_key[(*key[:-1], "kernel")], by_key[(*key[:-1], "lora_b")]
        lead = a.ndim + b.ndim - 2 - w.ndim
        ins = a.ndim - 1 - lead
        ws = _spec(w.sharding, w.ndim)
        assert _spec(a.sharding, a.ndim) == (*ws[:lead + ins], None), key
        assert _spec(b.sharding, b.ndim) == (*ws[:lead], None, *ws[lead + ins:]), key
        n += 1
    return n


# (preset, targets): decoders (Llama: GQA, gated MLP; Mixtral: attention, the experts take
# none), the BERT encoder (biases) and T5 (self- and cross-attention).
FAMILIES = [("llama", ALL), ("mixtral-tiny", ["query", "key", "value", "out"]),
            ("bert", ["query", "mlp_in", "mlp_out"]), ("t5", ["query", "value", "out", "mlp_in"])]


@pytest.mark.slow
@pytest.mark.parametrize("preset, targets", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_adapters_train_on_every_family_and_mesh(preset, targets):
    s = setup.build(_cfg(preset, targets))
    assert s.mesh.shape["fsdp"] == 2 and s.mesh.shape["tensor"] == 2
    assert _check_adapter_shardings(s.abstract_state.params) > 0
    state = s.init_state()
    before = jax.device_get(state.params)
    batch = sharding.host_batch_to_global(s.synthetic_batch(np.random.default_rng(0)),
                                                s.mesh)
    with jax.set_mesh(s.mesh):
        for _ in range(2):
            state, metrics = s.train_step(state, batch)
    after = jax.device_get(state.params)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["bad_step"]) == 0
    new_adapters, new_base = lora.split(after)
    old_adapters, old_base = lora.split(before)
    jax.tree.map(np.testing.assert_array_equal, new_base, old_base)  # frozen, bit for bit
    moved = jax.tree.map(lambda x, y: bool(np.any(x != y)), new_adapters, old_adapters)
    assert all(jax.tree.leaves(moved))  # every A and B trained (B started at zero)


def test_optimizer_state_holds_the_adapters_alone():
    s = setup.build(_cfg("llama", ALL))
    full = setup.build(config_lib.load(None, [*TINY_MODEL, "model.preset=llama", *MESH]))
    adapters, base = lora.split(s.abstract_state.params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]:
        if leaf.ndim:  # Adam's moments mirror parameters; counts are scalars
            assert str(path[-1].key) in ("lora_a", "lora_b"), path
    # Two Adam moments per trained parameter, plus scalar counts: with LoRA, nothing of the
    # base; in full training, the whole model.
    lora_opt, full_opt = (state_bytes(x.abstract_state.opt_state) for x in (s, full))
    assert 0 <= lora_opt - 2 * state_bytes(adapters) < 64
    assert 0 <= full_opt - 2 * state_bytes(full.abstract_state.params) < 64
    assert state_bytes(base) == state_bytes(full.abstract_state.params)


def test_fresh_adapters_start_at_the_base_and_zero_dropout_is_off():
    """A run's fresh adapters (GPT-2, every target): B is zero, so the adapted model is its
    base; A is PEFT's Kaiming-uniform U(±1/sqrt(fan_in)), every entry random. lora.dropout=0
    makes the training forward the eval one; a positive rate does not."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 11)))  # TINY_MODEL ids
    outputs = {}
    for rate in (0.0, 0.5):
        cfg = config_lib.load(None, [*TINY_MODEL, "model.preset=gpt2", f"lora.rank={R}",
                                     f"lora.targets=[{','.join(ALL)}]", f"lora.dropout={rate}"])
        s = setup.build(cfg)
        params = jax.device_get(s.init_state().params)
        adapters, base = lora.split(params)
        flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
        assert len(flat) == 2 * len(ALL) * (1 if cfg.model.scan_layers else cfg.model.num_layers)
        for path, leaf in flat:
            if str(path[-1].key) == "lora_b":
                assert not np.any(leaf), path
                continue
            fan_in = cfg.model.d_ff if "wo" in str(path) else cfg.model.d_model
            bound = 1 / np.sqrt(fan_in)
            assert np.all(leaf != 0) and np.abs(leaf).max() <= bound, path
            assert 0.8 < leaf.std() / (bound / np.sqrt(3)) < 1.2, path
        plain = build_model(cfg.model).apply({"params": base}, tokens)
        np.testing.assert_allclose(np.asarray(s.model.apply({"params": params}, tokens)),
                                   np.asarray(plain), atol=1e-6, rtol=0)
        # Trained B (random here): dropout on the adapters' input acts only while training.
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: np.random.default_rng(0).normal(0, 0.5, x.shape).astype(x.dtype)
            if str(p[-1].key) == "lora_b" else x, params)
        evaluated = s.model.apply({"params": params}, tokens, deterministic=True)
        trained = s.model.apply({"params": params}, tokens, deterministic=False,
                                rngs={"dropout": jax.random.PRNGKey(0)})
        outputs[rate] = np.abs(np.asarray(trained) - np.asarray(evaluated)).max()
        assert np.abs(np.asarray(evaluated) - np.asarray(plain)).max() > 1e-2  # B matters
    assert outputs[0.0] == 0 and outputs[0.5] > 1e-2, outputs


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def test_train_also_embed_trains_the_embeddings_beside_the_adapters():
    """lora.train_also=[embed]: the adapters and the token and position tables train (and
    alone have Adam moments); every other parameter stays bit-identical."""
    s = setup.build(_cfg("gpt2", ALL, "lora.train_also=[embed]"))
    trains = lambda names: names[-1] in ("lora_a", "lora_b", "embedding", "pos_embed")
    state = s.init_state()
    before = jax.device_get(state.params)
    batch = sharding.host_batch_to_global(s.synthetic_batch(np.random.default_rng(0)),
                                          s.mesh)
    with jax.set_mesh(s.mesh):
        for _ in range(2):  # A moves from the second step on (B starts at zero)
            state, metrics = s.train_step(state, batch)
    assert int(metrics["bad_step"]) == 0
    after = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    old = jax.tree.leaves(before)
    layers = 1 if s.cfg.model.scan_layers else s.cfg.model.num_layers  # stacked or not
    assert sum(trains(_names(p)) for p, _ in after) == 2 * len(ALL) * layers + 2
    for (path, new), prev in zip(after, old, strict=True):
        assert bool(np.any(new != prev)) == trains(_names(path)), _names(path)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        if leaf.ndim:
            assert trains(_names(path)), path


@pytest.mark.slow
def test_cli_run_with_trained_embeddings_loads_them_merged(tmp_path):
    """The user's path: `jaxlm train` with lora.train_also=[embed], then jaxlm.load: the
    merged model equals the adapter model and holds the trained embeddings, while a frozen
    parameter is still the run's initial one."""
    run = tmp_path / "run"
    assert main(["train", *TINY_SHAPE, "model.preset=gpt2", f"data.files={corpus(tmp_path)}",
                 f"run.dir={run}", f"lora.rank={R}", "lora.targets=[query,value]",
                 "lora.train_also=[embed]", "train.steps=4", "train.eval_every=0",
                 "checkpoint.every=4", "optim.lr=1e-2", "optim.warmup_steps=0",
                 "run.quiet=true"]) == 0
    tokens = _tokens(3)  # byte ids
    loaded = jaxlm.load(run)
    np.testing.assert_allclose(np.asarray(loaded(tokens)), _adapter_logits(run, tokens),
                               atol=1e-5, rtol=0)
    init = jax.device_get(setup.build(rundir.load_config(run)).init_state().params)
    got = jax.device_get(loaded.params)
    assert np.abs(got["embed"]["embedding"] - init["embed"]["embedding"]).max() > 1e-3
    np.testing.assert_array_equal(got["ln_final"]["scale"], init["ln_final"]["scale"])


@pytest.mark.slow
def test_checkpointed_lora_run_resumes_bit_exactly(tmp_path):
    s = setup.build(_cfg("llama", ALL))  # the family test's step: compiled once (cache)
    batches = [sharding.host_batch_to_global(
        s.synthetic_batch(np.random.default_rng(i)), s.mesh) for i in range(4)]
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    with jax.set_mesh(s.mesh):
        state = s.init_state()
        for b in batches[:2]:
            state, _ = s.train_step(state, b)
        ckpt.save(2, state, {"position": 2}, force=True)
        for b in batches[2:]:
            state, _ = s.train_step(state, b)
        straight = jax.device_get(state)
        _, state, _ = ckpt.restore(s.abstract_state)
        for b in batches[2:]:
            state, _ = s.train_step(state, b)
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), straight)


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def lora_run(hf_llama, tmp_path_factory):
    hf, _ = hf_llama
    tmp = tmp_path_factory.mktemp("lora_run")
    run = tmp / "run"
    assert main(["train", f"model.init_from={hf}", f"data.files={corpus(tmp)}", f"run.dir={run}",
                 f"lora.rank={R}", f"lora.alpha={ALPHA}", "lora.targets=[query,value,out,mlp_in]",
                 "train.steps=30", "train.batch_size=8", "train.seq_len=32",
                 "train.log_every=5", "train.eval_every=0", "train.eval_batches=1",
                 "checkpoint.every=30", "optim.lr=1e-2", "optim.warmup_steps=2",
                 "run.quiet=true", *MESH]) == 0
    return run, tmp


@pytest.mark.slow
def test_cli_lora_run_lowers_the_loss_and_keeps_the_base(hf_llama, lora_run):
    hf, _ = hf_llama
    run, _ = lora_run
    rows = [r for r in rundir.read_metrics(run) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, (rows[0]["loss"], rows[-1]["loss"])
    summary = rundir.read_summary(run)
    assert 0 < summary["trainable_params"] < summary["params"] / 10
    assert 0 < summary["optimizer_state_bytes"] < 3 * 4 * summary["trainable_params"]
    cfg = rundir.load_config(run)
    assert cfg.lora.rank == R and cfg.model.scan_layers
    target = weights.target_params(lora.adapted(cfg.model, cfg.lora), _one_device())
    adapters, base = lora.split(jax.device_get(weights.read_params(run, cfg.model, target)))
    _, hf_params = load_hf(hf, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, base, hf_params)  # bit-identical base
    bs = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]
          if str(path[-1].key) == "lora_b"]
    assert len(bs) == 5 and all(np.any(b != 0) for b in bs)  # trained


def _one_device():
    return sharding.make_mesh(config_lib.MeshConfig(data=1), jax.devices()[:1])


def _adapter_logits(run, tokens) -> np.ndarray:
    """The run's adapter model (unmerged) on `tokens`."""
    cfg = rundir.load_config(run)
    model_cfg = lora.adapted(cfg.model, cfg.lora)
    params = weights.read_params(run, cfg.model, weights.target_params(model_cfg,
                                                                        _one_device()))
    assert lora.has_adapters(params)
    return np.asarray(build_model(model_cfg).apply({"params": params}, tokens))


@pytest.mark.slow
def test_merged_exports_equal_the_adapter_model(lora_run, tmp_path):
    run, _ = lora_run
    tokens = _tokens(1)
    want = _adapter_logits(run, tokens)
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(_hf_logits(hf_model, tokens), want, atol=1e-4, rtol=0)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    exported = jaxlm.load(tmp_path / "export")
    assert exported.config.lora.rank == 0
    np.testing.assert_allclose(np.asarray(exported(tokens)), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(jaxlm.load(run)(tokens)), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_peft_export_loads_in_peft(hf_llama, lora_run, tmp_path):
    hf, _ = hf_llama
    run, _ = lora_run
    tokens = _tokens(2)
    out = tmp_path / "adapters"
    assert main(["export", "--run", str(run), "--out", str(out), "--adapters-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in keys
    base = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    np.testing.assert_allclose(_hf_logits(loaded, tokens), _adapter_logits(run, tokens),
                               atol=1e-4, rtol=0)
    # The same through `jaxlm convert jaxlm2hf --adapters-only`.
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(tmp_path / "c"),
                 "--adapters-only"]) == 0
    assert (tmp_path / "c" / "adapter_config.json").read_text() == (
        out / "adapter_config.json").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["lora.rank=-1"], "lora.rank"),
    (["lora.rank=4", "lora.targets=[query,q_proj]"], "lora.targets"),
    (["lora.rank=4", "lora.targets=[]"], "lora.targets"),
    (["lora.rank=4", "lora.alpha=0"], "lora.alpha"),
    (["lora.rank=4", "lora.dropout=1.5"], "lora.dropout"),
    (["lora.rnak=4"], "lora.rank"),
    (["lora.rank=4", "lora.targets=[mlp_in]", "model.preset=mixtral-tiny"], "expert"),
    (["lora.rank=4", "lora.train_also=[norms]"], "lora.train_also"),
    (["lora.rank=4", "lora.train_also=[embed]", "train.objective=dpo",
      "data.name=chat-preferences"], "lora.train_also with train.objective=dpo"),
])
def test_bad_lora_keys_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    run = tmp_path / "run"
    code = main(["train", f"run.dir={run}", *TINY_MODEL, *argv])
    out, err = capsys.readouterr()
    assert code == 2 and needle in err, err
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


@pytest.mark.parametrize("over, needle", [
    ([], "lora.rank=0"),  # no adapters
    (["lora.rank=4", "lora.train_also=[embed]"], "lora.train_also"),  # not adapters alone
])
def test_adapters_only_refuses_a_run_without_adapters(tmp_path, capsys, over, needle):
    (tmp_path / "run").mkdir()
    cfg = config_lib.load(None, [*TINY_MODEL, *over])
    rundir.write_config(tmp_path / "run", cfg)
    code = main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
                 "--adapters-only"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
