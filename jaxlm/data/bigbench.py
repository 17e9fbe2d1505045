"""Summarization and QA pairs from BIG-bench tasks (`jaxlm prepare xsum`, `prepare disfl-qa`).

The bigbench 1.0.0 source archive (358 MB, so these corpora are opt-in) ships each task as
`bigbench/benchmark_tasks/<task>/task.json` with `examples: [{input, target}]`. We keep the
pairs as JSON lines {source, target} and hold out by a hash, so a split is fixed and needs no
shuffling state:
  xsum      1,001 BBC articles -> one-sentence summaries; an article's split by its hash
  disfl-qa  8,000 disfluent questions on SQuAD paragraphs -> answer spans, as
            "context: ...\nquestion: ..." -> span; split by the paragraph, so no held-out
            question shares its context with a training one
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from jaxlm.data.archive import Archive, PrepareError, Splits
from jaxlm.data.parallel import pairs_jsonl

TASK_DIR = "bigbench/benchmark_tasks"
HELD_OUT_OF = 20  # of every 20 hash buckets: one -> test, one -> valid (about 5% each)


def _examples(ar: Archive, task: str) -> list[dict]:
    data = json.loads(ar.read(ar.find(f"{TASK_DIR}/{task}/task.json")).decode("utf-8"))
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise PrepareError(f"{task}/task.json has no examples")
    return examples


def _bucket(key: str) -> str:
    b = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % HELD_OUT_OF
    return "test" if b == 0 else "valid" if b == 1 else "train"


def _target(example: dict) -> str:
    target = example["target"]
    if isinstance(target, list):  # several references: train on the first
        target = target[0] if target else ""
    return " ".join(str(target).split())


def split_disfl_qa_input(text: str) -> tuple[str, str]:
    """(question, context) of a disfl_qa input, "QUESTION \\ncontext: CONTEXT"."""
    question, sep, context = text.partition("\ncontext:")
    if not sep:
        raise PrepareError(f"disfl_qa input without a context: {text[:80]!r}")
    return " ".join(question.split()), " ".join(context.split())


def _pairs_to_splits(rows: list[tuple[str, str, str]], **info) -> Splits:
    """rows: (hash key, source, target)."""
    split: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for key, source, target in rows:
        if source and target:
            split[_bucket(key)].append((source, target))
    return Splits(train=pairs_jsonl(split["train"]), valid=pairs_jsonl(split["valid"]),
                  test=pairs_jsonl(split["test"]),
                  info={"pairs": {k: len(v) for k, v in split.items()}, **info})


def xsum(ar: Archive) -> Splits:
    rows = []
    for ex in _examples(ar, "gem/xsum"):
        article = "\n".join(line.strip() for line in str(ex["input"]).strip().splitlines())
        rows.append((article, article, _target(ex)))
    return _pairs_to_splits(rows, task="gem/xsum")


def disfl_qa(ar: Archive) -> Splits:
    rows = []
    for ex in _examples(ar, "disfl_qa"):
        question, context = split_disfl_qa_input(str(ex["input"]))
        # The question last: next to the answer, and kept when a long context is cut.
        rows.append((context, f"context: {context}\nquestion: {question}", _target(ex)))
    return _pairs_to_splits(rows, task="disfl_qa")


EXTRACTORS: dict[str, Callable[[Archive], Splits]] = {"xsum": xsum, "disfl-qa": disfl_qa}
