"""Synthetic chat tasks with checkable answers, made offline and deterministic from a seed:
reverse a word of 3-4 letters, sort its letters, upper-case it, add two numbers below 50. Some
conversations ask two tasks in two turns, some one-turn ones open with a system prompt.

`jaxlm prepare chat-tasks` writes train.jsonl and heldout.jsonl (chat JSON lines; each line
also names its `task` and `answer`, the last assistant turn); `data.name=chat-tasks` trains
on them (made on first use under $JAXLM_CACHE/synthetic). No held-out prompt occurs in
training, so held-out exact match measures the skill, not memory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxlm.data.errors import DataError

NAME = "chat-tasks"
VERSION = 2  # of the generator: part of the cached files' folder name
TRAIN_SIZE = 20000
HELDOUT_SIZE = 200
SYSTEM_PROMPT = "Answer with the result only."
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class ChatTaskFiles(NamedTuple):
    train: Path
    heldout: Path


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(LETTERS), int(rng.integers(3, 5))))


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng)
    return f"Reverse: {w}", w[::-1]


def _sort(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng)
    return f"Sort: {w}", "".join(sorted(w))


def _upper(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng)
    return f"Uppercase: {w}", w.upper()


def _add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    return f"Add: {a}+{b}", str(a + b)


# task -> (rng -> (prompt, answer))
TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "reverse": _reverse, "sort": _sort, "upper": _upper, "add": _add}


def examples(seed: int, n: int, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """`n` conversations ({"messages", "task", "answer"}), none asking a prompt in
    `exclude` or asking the same prompt twice; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    seen = set(exclude)
    names = sorted(TASKS)
    out = []
    while len(out) < n:
        two, system = rng.random() < 0.3, rng.random() < 0.3
        # A system prompt opens one-turn conversations only: the longest stays within 128
        # bytes under the default template.
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system and not two else []
        turns = []
        for _ in range(2 if two else 1):
            task = names[int(rng.integers(len(names)))]
            turns.append((task, *TASKS[task](rng)))
        if any(prompt in seen for _, prompt, _ in turns):
            continue
        for _, prompt, answer in turns:
            seen.add(prompt)
            messages += [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]
        out.append({"messages": messages, "task": turns[-1][0], "answer": turns[-1][2]})
    return out


def user_prompts(conversations: Iterable[dict[str, Any]]) -> set[str]:
    """Every user turn's text of the conversations (as `examples` makes them)."""
    return {m["content"] for ex in conversations for m in ex["messages"] if m["role"] == "user"}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # whole or absent


def files_in(out_dir: str | Path) -> ChatTaskFiles:
    out = Path(out_dir)
    return ChatTaskFiles(out / "train.jsonl", out / "heldout.jsonl")


def write_files(out_dir: str | Path, name: str, train: list[dict[str, Any]],
                heldout: list[dict[str, Any]]) -> ChatTaskFiles:
    """Writes the rows of a synthetic set `name` as train.jsonl and heldout.jsonl."""
    files = files_in(out_dir)
    try:
        files.train.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(files.heldout, heldout)
        _write_jsonl(files.train, train)
    except OSError as e:
        raise DataError(f"cannot write the {name} files to '{out_dir}' ({e.strerror or e})"
                        ) from None
    return files


def write(out_dir: str | Path, seed: int = 0, train_size: int = TRAIN_SIZE,
          heldout_size: int = HELDOUT_SIZE) -> ChatTaskFiles:
    """Writes heldout.jsonl and train.jsonl (whose prompts avoid the held-out ones)."""
    heldout = examples(seed, heldout_size)
    train = examples(seed + 1, train_size, exclude=user_prompts(heldout))
    return write_files(out_dir, NAME, train, heldout)


def default_dir(seed: int = 0, name: str = NAME) -> Path:
    """Where data.name=`name` keeps the files of `seed`; VERSION in the name, so that files
    of another generator are never reused."""
    from jaxlm.data.prepare import cache_dir

    return cache_dir() / "synthetic" / f"{name}-v{VERSION}-seed{seed}"


def ensure_files(out_dir: Path, write_to: Callable[[Path], ChatTaskFiles]) -> ChatTaskFiles:
    """The files in `out_dir`, written by `write_to(out_dir)` if missing."""
    files = files_in(out_dir)
    if files.train.is_file() and files.heldout.is_file():
        return files
    return write_to(out_dir)


def ensure(seed: int = 0) -> ChatTaskFiles:
    """The default files of `seed` (under $JAXLM_CACHE/synthetic), written if missing."""
    return ensure_files(default_dir(seed), lambda d: write(d, seed))
