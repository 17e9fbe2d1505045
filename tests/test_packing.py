"""Packing: every next-token pair once, no attention across documents, positions restart."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm import config as config_lib
from jaxlm.data.pipeline import pack_documents
from jaxlm.families.registry import build_model
from jaxlm.models.attention import MaskSpec

docs_st = st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=30), min_size=1,
                   max_size=12)


@settings(max_examples=60, deadline=None)
@given(docs=docs_st, seq_len=st.integers(1, 16))
def test_packing_counts_every_pair_once_and_never_attends_across_documents(docs, seq_len):
    if all(len(d) < 2 for d in docs):
        return
    b = pack_documents([np.asarray(d) for d in docs], seq_len)
    want = sorted((i, x, y) for i, d in enumerate(docs, 1) for x, y in zip(d[:-1], d[1:]))
    m = b["loss_mask"].astype(bool)
    got = sorted(zip(b["segment_ids"][m].tolist(), b["inputs"][m].tolist(),
                     b["targets"][m].tolist()))
    assert got == want
    # Only the last row has padding, and padding is segment 0 at a row's end.
    assert m[:-1].all() and (b["segment_ids"][~m] == 0).all()
    allowed = np.asarray(MaskSpec(q_segment_BT=jnp.asarray(b["segment_ids"]),
                                  kv_segment_BS=jnp.asarray(b["segment_ids"]),
                                  causal=True).dense(seq_len, seq_len))
    seg = b["segment_ids"]
    assert (seg[:, :, None] == seg[:, None, :])[allowed].all()
    # Positions restart at 0 at each segment's first token and count up by one.
    pos = b["positions"]
    first = np.ones_like(seg, bool)
    first[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert (pos[first] == 0).all() and (pos[:, 1:][~first[:, 1:]] ==
                                         pos[:, :-1][~first[:, 1:]] + 1).all()


def test_packed_logits_equal_each_document_alone():
    cfg = config_lib.load("tiny", ["model.num_layers=2", "model.d_model=32", "model.num_heads=4",
                                   "model.d_ff=64", "model.vocab_size=64",
                                   "model.max_seq_len=16", "train.seq_len=16"])
    model = build_model(cfg.model)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))["params"]
    docs = [np.arange(1, 6), np.arange(10, 19), np.arange(30, 34)]
    b = pack_documents(docs, 16)
    packed = model.apply({"params": params}, jnp.asarray(b["inputs"]),
                         positions_BT=jnp.asarray(b["positions"]),
                         segment_ids_BT=jnp.asarray(b["segment_ids"]))
    for i, d in enumerate(docs, 1):
        alone = model.apply({"params": params}, jnp.asarray(d[None, :-1]))
        where = b["segment_ids"][0] == i
        np.testing.assert_allclose(np.asarray(packed[0][where]), np.asarray(alone[0]),
                                   rtol=1e-5, atol=1e-5)


def test_packed_training_through_the_cli(tmp_path):
    """data.pack=true: documents packed into rows with segment ids; the run trains and its
    batches never let a document see another."""
    import json

    from jaxlm.cli import main
    from jaxlm.config import load
    from jaxlm.data import setup as data_setup
    from jaxlm.train import rundir

    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], rng.integers(2, 12)))
            for _ in range(400)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    over = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
            "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8", "data.pack=true",
            f"data.files={data}", "train.steps=30", "train.log_every=5", "optim.lr=3e-3",
            "optim.warmup_steps=3", "run.quiet=true"]
    cfg = load(None, over)
    batch = data_setup.build(cfg, tmp_path / "unused").train.batch(0)
    seg, pos = batch.segment_ids, batch.positions
    assert (seg[:, 1:] != seg[:, :-1]).any()  # several documents per row
    assert ((pos == 0) == np.concatenate([np.ones((8, 1), bool),
                                          seg[:, 1:] != seg[:, :-1]], 1)).all()
    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", *over]) == 0
    losses = [r["loss"] for r in rundir.read_metrics(run) if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
