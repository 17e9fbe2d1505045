"""Loading at scale: lazy recipes equal the numpy they stand for; HF checkpoints in shards
with an index load tensor by tensor (a block of rows at a time) straight into their
shardings, in the dtype asked; shards are written at most a given size; runs and exports
load params-only onto any mesh."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import jaxlm
from jaxlm import weights
from jaxlm.config import MeshConfig
from jaxlm.convert import ConversionError, lazy, safetensors_files
from jaxlm.convert.lazy import source
from jaxlm.convert.safetensors_files import SafetensorsCheckpoint, parse_size, write_shards


def _src(a: np.ndarray, reads: list | None = None) -> lazy.Lazy:
    def rows(i, j):
        if reads is not None:
            reads.append(j - i)
        return a[i:j].copy()
    return source(a.shape, a.dtype, "a", rows)


def test_recipes_equal_numpy(monkeypatch):
    monkeypatch.setattr(lazy, "BLOCK_BYTES", 40)  # several blocks per tensor
    a = np.arange(48, dtype=np.float32).reshape(4, 12)
    reads: list[int] = []
    x = _src(a, reads)
    cases = {
        "T.reshape": (x.T.reshape(3, 4, 4), a.T.reshape(3, 4, 4)),
        "slice.reshape": (x[:, 4:8].reshape(4, 2, 2), a[:, 4:8].reshape(4, 2, 2)),
        "arith": (x * 2 + 1, a * 2 + 1),
        "stack": (np.stack([x.T, x.T + 1, np.zeros((12, 4))]),
                  np.stack([a.T, a.T + 1, np.zeros((12, 4))])),
        "stack axis 1": (np.stack([x, x], axis=1), np.stack([a, a], axis=1)),
        "concat": (np.concatenate([x, x.T.reshape(4, 12)], 1),
                   np.concatenate([a, a.T.reshape(4, 12)], 1)),
        "index": (x.T.reshape(2, 6, 4)[1], a.T.reshape(2, 6, 4)[1]),
    }
    for name, (recipe, want) in cases.items():
        assert recipe.shape == want.shape, name
        np.testing.assert_array_equal(recipe.materialize(np.float32), want, err_msg=name)
        np.testing.assert_array_equal(np.asarray(recipe), want, err_msg=name)  # eager path
    assert reads and max(reads) <= 1  # 40 bytes: one 48-byte row per read
    half = x.T.materialize(ml_dtypes.bfloat16)
    assert half.dtype == ml_dtypes.bfloat16 and np.array_equal(half.astype(np.float32), a.T)
    assert np.allclose(x, a) and x.copy() is x  # numpy without a lazy form reads it


def test_shards_are_written_under_the_limit_with_an_index(tmp_path):
    tensors = {f"t{i}": np.full((10, 10), i, np.float32) for i in range(5)}
    files = write_shards(tensors, tmp_path, dtype=ml_dtypes.bfloat16, max_shard_bytes=450)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 200
    assert index["weight_map"] == {"t0": files[0].name, "t1": files[0].name,
                                   "t2": files[1].name, "t3": files[1].name,
                                   "t4": files[2].name}
    back = SafetensorsCheckpoint(tmp_path)
    assert set(back) == set(tensors) and back.nbytes() == 1000
    for k, v in tensors.items():
        got = back[k].materialize()
        assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.astype(np.float32), v)
    one = write_shards(tensors, tmp_path / "one", max_shard_bytes=10**6)
    assert [f.name for f in one] == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("40KB") == 40_000 and parse_size("123") == 123
    for bad in ("5 parsecs", "0", "-1MB", ""):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_index_naming_a_missing_shard_is_named(tmp_path):
    write_shards({"a": np.ones((10,)), "b": np.ones((10,))}, tmp_path, max_shard_bytes=40)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        SafetensorsCheckpoint(tmp_path)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """A random HF Llama saved in shards with model.safetensors.index.json."""
    path = tmp_path_factory.mktemp("sharded")
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    tokens = np.arange(12)[None] % 96
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    return path, tokens, ref


def test_sharded_hf_checkpoint_loads_onto_a_mesh_in_bfloat16(sharded_llama, monkeypatch):
    path, tokens, ref = sharded_llama
    reads: list[tuple[str, int]] = []
    real = safetensors_files._read_rows
    monkeypatch.setattr(safetensors_files, "_read_rows",
                        lambda f, name, a, b: reads.append((name, b - a)) or real(f, name, a, b))
    monkeypatch.setattr(lazy, "BLOCK_BYTES", 1024)
    mesh = MeshConfig(data=-1, fsdp=2, tensor=2)
    lm = jaxlm.load(path, dtype="bfloat16", mesh=mesh)
    leaves = jax.tree.leaves(lm.params)
    assert {x.dtype for x in leaves} == {np.dtype(ml_dtypes.bfloat16)}
    emb = lm.params["embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(emb.sharding.device_set) == 8
    # Read a block of rows at a time: never a whole 96x32 embedding (6 KiB) in one read.
    assert max(n for name, n in reads if name == "model.embed_tokens.weight") * 32 * 4 <= 1024
    np.testing.assert_allclose(np.asarray(lm(tokens), np.float32), ref, atol=0.1)
    exact = jaxlm.load(path, mesh=mesh)
    np.testing.assert_allclose(np.asarray(exact(tokens)), ref, atol=1e-4)


def test_run_and_export_load_params_only_onto_a_mesh(sharded_llama, tmp_path):
    from jaxlm.api import export
    from jaxlm.convert.run import hf_to_run

    path, tokens, ref = sharded_llama
    run = hf_to_run(path, tmp_path / "run", ["model.scan_layers=true"])
    out = export(run, tmp_path / "export", dtype="bfloat16")
    mesh = MeshConfig(data=-1, fsdp=2)
    for source_dir, atol in ((run, 1e-4), (out, 0.1)):
        assert weights.kind_of(source_dir) in ("run", "export")
        lm = jaxlm.load(source_dir, mesh=mesh)
        assert lm.config.model.scan_layers and "layers" in lm.params["decoder"]
        np.testing.assert_allclose(np.asarray(lm(tokens), np.float32), ref, atol=atol)
    assert jaxlm.load(out).params["embed"]["embedding"].dtype == ml_dtypes.bfloat16
