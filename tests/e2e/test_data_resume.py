"""SIGKILL and resume through the CLI stays bit-identical with the data loaders: the token
store through grain and a streamed HF dataset (local parquet files), on one process and on
two (`--coordinator` on 127.0.0.1). A stream's checkpoint holds each process's cursor: the
one that process's own share of the rows (`split_dataset_by_node`) reaches at the position."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_SHAPE

from jaxlm.train import rundir

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60  # far more than the kill waits for, so that it lands mid-run
COMMON = [*TINY_SHAPE, f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
          "train.eval_batches=1", "optim.warmup_steps=5", "run.quiet=true"]


def _env(tmp: Path, devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "JAXLM_", "XLA_FLAGS"))
           or k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAXLM_CACHE"))}
    return {**env, "JAX_PLATFORMS": "cpu", "HF_HOME": str(tmp / "hf"),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run: Path, nproc: int, env: dict[str, str], data: list[str], *extra: str
           ) -> list[subprocess.Popen]:
    port = _free_port()
    joined = (lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                         str(nproc), "--process-id", str(i)]) if nproc > 1 else (lambda i: [])
    return [subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train", *joined(i),
                              f"run.dir={run}", *data, *COMMON, *extra],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
            for i in range(nproc)]


def _finish(procs: list[subprocess.Popen]) -> str:
    errs = [p.communicate(timeout=400)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), errs
    return errs[0]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rundir.read_metrics(run) if "loss" in r}


def _data_item(run: Path, step: int) -> dict:
    manager = ocp.CheckpointManager(run / "checkpoints",
                                    item_handlers={"data": ocp.JsonCheckpointHandler()})
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(
            data=ocp.args.JsonRestore()))["data"])
    finally:
        manager.close()


def _parquet_folder(tmp: Path) -> Path:
    """Four parquet files (two per process) of numbered documents."""
    import datasets

    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    docs = [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(4, 30)))
            for i in range(800)]
    folder = tmp / "pq"
    folder.mkdir()
    for k in range(4):
        datasets.Dataset.from_dict({"text": docs[k::4]}).to_parquet(
            str(folder / f"part-{k}.parquet"))
    return folder


def _corpus(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    path = tmp / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(2000)))
    return path


def _check_cursors(run: Path, item: dict, nproc: int) -> None:
    """Each process's saved cursor is the one its own share of the rows reaches, and the
    shares hold different documents."""
    from jaxlm.data import stream
    from jaxlm.data.tokenizers import ByteTokenizer

    cfg = rundir.load_config(run)
    assert len(item["cursors"]) == nproc
    seen = []
    for i, cursor in enumerate(item["cursors"]):
        train = stream.streams(cfg, ByteTokenizer(), i, nproc).train
        ids = np.concatenate([train.batch(p).inputs.ravel() for p in range(item["position"])])
        assert train.state(item["position"]) == cursor
        text = bytes(ids[ids < 256].astype(np.uint8)).decode(errors="replace")
        seen.append(set(re.findall(r"doc (\d+):", text)))
    assert all(seen)  # each process read documents
    assert nproc == 1 or not set.intersection(*seen)  # and no two the same


@pytest.mark.slow
@pytest.mark.parametrize("kind,nproc", [("store", 2), ("stream", 1), ("stream", 2)])
def test_sigkill_and_resume_is_bit_identical(tmp_path, kind, nproc):
    """(The store on one process: tests/e2e/test_preemption.py.)"""
    env = _env(tmp_path, 2 // nproc)
    data = ([f"data.hf_path={_parquet_folder(tmp_path)}", "data.streaming=true"]
            if kind == "stream" else [f"data.files={_corpus(tmp_path)}"])
    straight = tmp_path / "straight"
    _finish(_start(straight, nproc, env, data, "checkpoint.every=1000"))
    reference = _losses(straight)
    assert sorted(reference) == list(range(1, STEPS + 1))

    run = tmp_path / "run"
    procs = _start(run, nproc, env, data, "checkpoint.every=4")
    deadline = time.time() + 300
    while time.time() < deadline and len(_losses(run)) < 14 and procs[0].poll() is None:
        time.sleep(0.05)
    for p in procs:  # the whole job dies at once, mid-run
        p.send_signal(signal.SIGKILL)
        p.wait()
    killed_at = max(_losses(run))
    assert 4 <= killed_at < STEPS, killed_at

    err = _finish(_start(run, nproc, env, data, "checkpoint.every=4"))
    resumed_from = int(err.split("resumed ")[1].split("from step ")[1].split()[0])
    assert 4 <= resumed_from <= killed_at
    resumed = _losses(run)
    for step in range(resumed_from + 1, STEPS + 1):
        assert resumed[step] == reference[step], step  # bit-identical
    item = _data_item(run, STEPS)
    assert item["position"] == STEPS
    if kind == "stream":
        _check_cursors(run, item, nproc)
    else:
        assert "cursors" not in item  # the position alone says where grain is
