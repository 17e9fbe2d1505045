"""Test setup: 8 simulated CPU devices, no hub access, and one persistent compilation cache
for the session (subprocesses inherit it), so identical train steps compile once."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# CPU only, also where the [tpu] extra installed libtpu (`jaxlm compile` describes TPU
# topologies through it without initialising a TPU backend).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# jaxlm's own cache (jaxlm.compile_cache) keeps a directory JAX already has: tests never write
# to ~/.cache/jaxlm/xla.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxlm-test-jit-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def _session_cache() -> str:
    """A fresh JAXLM_CACHE for the session, so token stores built by tests never land in the
    user's cache; it links the user's downloaded corpora and test files (nothing is fetched
    twice)."""
    real = Path(os.environ.get("JAXLM_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlm").expanduser()
    tmp = Path(tempfile.mkdtemp(prefix="jaxlm-test-cache-"))
    for shared in ("corpora", "testdata"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (tmp / shared).symlink_to(real / shared)
    atexit.register(shutil.rmtree, tmp, True)
    return str(tmp)


os.environ["JAXLM_CACHE"] = _session_cache()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# The tiny model most tests train (as `key=value` overrides): 2 layers of width 32, 4 heads,
# 32-token rows, batch 8 (one row per simulated device), train.steps as given rather than
# planned by the default's time budget, and a cosine schedule (the default config's
# warmup-stable-decay has tests of its own). Tests add what they vary.
TINY_SHAPE = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
              "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
              "train.time_budget=0", "optim.schedule=cosine"]
# The same with a 64-id vocabulary, for tests that feed token ids by hand.
TINY_MODEL = [*TINY_SHAPE, "model.vocab_size=64"]


def corpus(tmp: Path) -> Path:
    """A small speaker-tagged text file (400 short lines of ten words) to train on."""
    lines = []
    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    for i in range(400):
        lines.append(f"SPEAKER{i % 3}:\n" + " ".join(rng.choice(words, 8)) + ".\n")
    path = tmp / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def tiny_hf_llama(directory: Path, vocab_size: int):
    """A random tiny HF Llama (2 layers of width 32, grouped-query attention, untied
    embeddings; weights N(0, 0.1), norms near 1) saved to `directory`; returns the model."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
    model.eval().save_pretrained(directory)
    return model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/e2e/ drive the CLI, whole runs or several processes: marked `e2e`
    (`pytest -m "not e2e"` runs the unit tests alone)."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.e2e)
