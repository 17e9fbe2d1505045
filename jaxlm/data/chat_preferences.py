"""Synthetic preference pairs for DPO from the checkable chat tasks (jaxlm.data.chat_tasks):
the conversation before its last answer is the prompt, the right answer is chosen, a wrong
one of the kind a small model makes is rejected: a sum off by 1 to 3, a reversed or sorted
word with letters out of place, an upper-cased word with a letter left lower case.

`data.name=chat-preferences` (train.objective=dpo) makes train.jsonl and heldout.jsonl under
$JAXLM_CACHE/synthetic on first use, offline and deterministic (`jaxlm prepare
chat-preferences [--out DIR --seed S]` writes them where you can read them). The held-out
prompts are chat-tasks' held-out ones: neither the SFT run of chat-tasks nor DPO trains on
them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.data import chat_tasks

NAME = "chat-preferences"
TRAIN_SIZE = 4000


def wrong_answer(task: str, answer: str, rng: np.random.Generator) -> str:
    """A wrong answer to a chat task, close to the right one."""
    if task == "add":
        n = int(answer)
        return str(rng.choice([n + d for d in (-3, -2, -1, 1, 2, 3) if n + d >= 0]))
    if task == "upper":
        i = int(rng.integers(len(answer)))
        return answer[:i] + answer[i].lower() + answer[i + 1:]
    letters = list(answer)
    for _ in range(20):  # a permutation that differs (a word of one repeated letter has none)
        rng.shuffle(letters)
        if "".join(letters) != answer:
            return "".join(letters)
    i = int(rng.integers(len(answer)))
    return answer[:i] + ("a" if answer[i] != "a" else "b") + answer[i + 1:]


def pairs(examples: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Preference records ({"prompt": messages, "chosen", "rejected", "task"}) of chat-task
    conversations."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for ex in examples:
        answer = ex["answer"]
        out.append({"prompt": ex["messages"][:-1], "chosen": answer,
                    "rejected": wrong_answer(ex["task"], answer, rng), "task": ex["task"]})
    return out


def write(out_dir: str | Path, seed: int = 0, train_size: int = TRAIN_SIZE,
          heldout_size: int = chat_tasks.HELDOUT_SIZE) -> chat_tasks.ChatTaskFiles:
    """Writes heldout.jsonl (chat-tasks' held-out prompts) and train.jsonl (other prompts)."""
    heldout = chat_tasks.examples(seed, heldout_size)
    train = chat_tasks.examples(seed + 2, train_size, exclude=chat_tasks.user_prompts(heldout))
    return chat_tasks.write_files(out_dir, NAME, pairs(train, seed), pairs(heldout, seed))


def default_dir(seed: int = 0) -> Path:
    return chat_tasks.default_dir(seed, NAME)


def ensure(seed: int = 0) -> chat_tasks.ChatTaskFiles:
    """The default files of `seed` (under $JAXLM_CACHE/synthetic), written if missing."""
    return chat_tasks.ensure_files(default_dir(seed), lambda d: write(d, seed))
