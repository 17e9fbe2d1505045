"""Chat SFT end to end on the user's path: a base run, `jaxlm prepare chat-tasks`, an SFT run
from the base (`model.init_from`, data.format=chat) whose first loss is the base model's
cross entropy over the replies' tokens only; `jaxlm eval --task chat`; `jaxlm chat` in a
subprocess with piped stdin, equal to the same replies made in-process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_SHAPE, corpus

import jaxlm
from jaxlm.cli import main
from jaxlm.data import chat
from jaxlm.data import setup as data_setup
from jaxlm.train import rundir

QUIET = ["run.quiet=true", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1"]
SHAPE = [s for s in TINY_SHAPE if not s.startswith(("model.max_seq_len", "train.seq_len"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base run, SFT run, data folder): a byte-level model trained 2 steps on text, then 3
    SFT steps on a few synthetic conversations."""
    tmp = tmp_path_factory.mktemp("chat")
    base = tmp / "base"
    assert main(["train", f"data.files={corpus(tmp)}", f"run.dir={base}", *SHAPE,
                 "model.vocab_size=260", "model.max_seq_len=128", "train.seq_len=128",
                 "train.steps=2", "checkpoint.every=2", *QUIET]) == 0
    made = tmp / "made"
    assert main(["prepare", "chat-tasks", "--out", str(made), "--seed", "1"]) == 0
    data = tmp / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 64), ("heldout.jsonl", 12)):
        lines = (made / name).read_text().splitlines()[:n]
        (data / name).write_text("\n".join(lines) + "\n")
    sft = tmp / "sft"
    assert main(["train", f"model.init_from={base}", "data.format=chat",
                 f"data.files={data / 'train.jsonl'}", f"data.valid_files={data / 'heldout.jsonl'}",
                 f"run.dir={sft}", "train.steps=3", "train.batch_size=8", "checkpoint.every=3",
                 "optim.warmup_steps=1", *QUIET]) == 0
    return base, sft, data


def test_sft_loss_is_the_cross_entropy_of_the_replies_only(runs):
    base, sft, data = runs
    cfg = rundir.load_config(sft)
    assert cfg.data.format == "chat" and cfg.model.init_from == str(base)
    batch = data_setup.build(cfg, sft, progress=False).train.batch(0)
    mask = np.asarray(batch.loss_mask) > 0
    targets, seg = np.asarray(batch.targets), np.asarray(batch.segment_ids)
    replies = {m["content"] for c in chat.read_chats([str(data / "train.jsonl")]) for m in c
               if m["role"] == "assistant"}
    eos = 258
    for r in range(len(mask)):  # each run of covered targets: one reply and its EOS
        edges = np.flatnonzero(np.diff(np.r_[0, mask[r].astype(int), 0]))
        for a, b in zip(edges[::2], edges[1::2]):
            run = targets[r, a:b].tolist()
            assert run[-1] == eos and bytes(run[:-1]).decode() in replies, run
            assert len(set(seg[r, a:b])) == 1
    lm = jaxlm.load(base)
    logits = np.asarray(lm(batch.inputs, positions_BT=np.asarray(batch.positions),
                           segment_ids_BT=seg), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    replies_only, every_token = nll[mask].mean(), nll[seg > 0].mean()
    first = next(r for r in rundir.read_metrics(sft) if "loss" in r)
    assert first["step"] == 1
    tol = 1e-4 * replies_only
    assert abs(first["loss"] - replies_only) <= tol, (first, replies_only)
    assert abs(first["loss"] - every_token) > 20 * tol, (first, every_token)  # not unmasked


def test_eval_task_chat_scores_heldout_conversations(runs, capsys):
    base, sft, _ = runs
    assert main(["eval", "--run", str(base), "--task", "chat"]) == 2  # a text run
    assert "evaluates chat runs" in capsys.readouterr().err
    assert main(["eval", "--run", str(sft), "--task", "chat", "--max-examples", "6",
                 "--max-new-tokens", "8"]) == 0
    assert "exact_match" in capsys.readouterr().out
    saved = json.loads((sft / "eval_chat.json").read_text())
    assert saved["examples"] == 6 and 0 <= saved["exact_match"] <= 100
    assert len(saved["samples"]) == 5 and saved["samples"][0]["target"]


def test_chat_command_streams_replies_with_reset(runs):
    _, sft, _ = runs
    turns = ["Reverse: abc", "Add: 1+2", "/reset", "Sort: cba"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "chat", "--run", str(sft),
                          "--temperature", "0", "--max-new-tokens", "12"],
                         input="\n".join(turns) + "\n", capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(conversation cleared)" in out.stderr and "Traceback" not in out.stderr
    # The same session in-process: the second turn sees the first, the third starts anew.
    from jaxlm.dialogue import session

    pieces = []
    n = session(jaxlm.load(sft), [t + "\n" for t in turns], pieces.append,
                max_new_tokens=12, temperature=0.0)
    assert n == 3 and out.stdout == "".join(pieces)
    assert out.stdout.count("\n") >= 3
