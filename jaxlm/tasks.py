"""Task evaluations of a trained run (`jaxlm eval --run DIR --task ...`).

  translate  generate on held-out (source, target) pairs: BLEU and chrF (sacrebleu), next to
             the copy-the-source baseline (the source itself scored as the translation)
  summarize  generate on held-out pairs: ROUGE-1/2/L/Lsum (rouge-score)
  qa         generate answers to held-out (question, answer) pairs: SQuAD exact match and F1
  chat       greedy replies (through the chat template) to held-out conversations without
             their last assistant turn: exact match with that turn (data.format=chat runs)
  lm         held-out loss, perplexity and bits per byte (jaxlm.evaluate)

Held-out pairs: the prepared corpus's test split when it has one (else valid), or
data.valid_files, or the held-out tail of data.files (as training split them).
Results are appended to metrics.jsonl (kind "eval_TASK") and written to eval_TASK.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxlm import metrics
from jaxlm.config import Config, ConfigError
from jaxlm.data import pipeline
from jaxlm.data.paths import as_path
from jaxlm.data.pipeline import DataError

TASKS = ("translate", "summarize", "qa", "chat", "lm")
# Answers are short spans; other tasks may write up to the training target length.
DEFAULT_NEW_TOKENS = {"qa": 32, "chat": 32}


def heldout_pairs(cfg: Config, split: str = "test") -> list[tuple[str, str]]:
    """(source, target) pairs the run did not train on; `split` test falls back to valid."""
    from jaxlm.data import setup

    fields = (cfg.data.source_field, cfg.data.target_field)
    if not cfg.data.files:
        if not setup._is_pair_corpus(cfg.data.name):
            raise DataError(f"data.name={cfg.data.name} is not a (source, target) corpus; "
                            "task evaluation needs pairs (e.g. bible-mt-en-fr)")
        from jaxlm.data.prepare import prepare

        corpus = prepare(cfg.data.name, progress=False)
        path = corpus.test if split == "test" and corpus.test is not None else corpus.valid
        return pipeline.read_pairs([str(path)], *fields)
    if not all(f.endswith((".jsonl", ".json")) for f in cfg.data.files):
        raise DataError("task evaluation needs (source, target) JSON lines in data.files")
    train_files, valid_files = setup.pair_files(cfg)
    if valid_files:
        return pipeline.read_pairs(valid_files, *fields)
    pairs = pipeline.read_pairs(train_files, *fields)
    return setup.hold_out_last(pairs, cfg.data.valid_fraction, "pair")[1]  # as training did


def predict(lm: Any, sources: list[str], *, beams: int = 1, length_penalty: float = 1.0,
            max_new_tokens: int = 0, batch_size: int = 32) -> list[str]:
    """Greedy (or beam) outputs for each source. A decoder-only model continues
    answer_prompt(source), as it trained on pairs, and its answer ends at the first newline."""
    cfg = lm.config
    seq2seq = not lm.family.continues_prompt  # outputs stand alone (a translation)
    max_new = max_new_tokens or min(cfg.train.seq_len, cfg.model.max_seq_len - 1)
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        batch = sources[i:i + batch_size]
        if not seq2seq:
            batch = [pipeline.answer_prompt(s) for s in batch]
        kw = dict(beams=beams, length_penalty=length_penalty) if seq2seq else {}
        texts = lm.generate(batch, max_new_tokens=max_new, temperature=0.0, **kw)
        out += [t if seq2seq else t.split("\n")[0] for t in texts]
    return [t.strip() for t in out]


def score(task: str, sources: list[str], predictions: list[str],
          targets: list[str]) -> dict[str, float]:
    """The task's metrics (0..100) for predictions against single references."""
    if task == "translate":
        out = {"bleu": metrics.bleu(predictions, targets)["bleu"],
               "chrf": metrics.chrf(predictions, targets),
               "copy_bleu": metrics.bleu(sources, targets)["bleu"],
               "copy_chrf": metrics.chrf(sources, targets)}
        return out
    if task == "summarize":
        return metrics.rouge(predictions, targets)
    if task == "qa":
        return metrics.squad_scores(predictions, [[t] for t in targets])
    raise ConfigError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")


def evaluate_task(run_dir: str | Path, task: str, *, max_examples: int = 0, beams: int = 1,
                  length_penalty: float = 1.0, max_new_tokens: int = 0, split: str = "test",
                  batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """Runs `task` on a run's newest checkpoint; appends the result to metrics.jsonl and
    writes eval_TASK.json (with a few sample outputs)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if task == "lm":
        from jaxlm.evaluate import evaluate_run

        return evaluate_run(run_dir, max_batches=max_examples, progress=progress)
    from jaxlm.api import load

    run_dir = as_path(run_dir)
    lm = load(run_dir)
    if task == "chat":
        return _record(run_dir, task, *_chat_exact_match(
            lm, max_examples, max_new_tokens or DEFAULT_NEW_TOKENS[task], batch_size))
    pairs = heldout_pairs(lm.config, split)
    if max_examples:
        pairs = pairs[:max_examples]
    sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
    preds = predict(lm, sources, beams=beams, length_penalty=length_penalty,
                    max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS.get(task, 0),
                    batch_size=batch_size)
    results = {"task": task, "examples": len(pairs), "beams": beams,
               **score(task, sources, preds, targets)}
    samples = [{"source": s, "target": t, "output": p}
               for s, t, p in list(zip(sources, targets, preds, strict=True))[:5]]
    return _record(run_dir, task, results, samples)


def _chat_exact_match(lm: Any, max_examples: int, max_new_tokens: int, batch_size: int
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Exact match on the run's held-out conversations (as training split them)."""
    from jaxlm.data.setup import chat_splits, uses_chat
    from jaxlm.dialogue import exact_match

    if not uses_chat(lm.config):
        raise DataError(f"--task chat evaluates chat runs (data.format=chat); this run's "
                        f"data.format is {lm.config.data.format}")
    chats = chat_splits(lm.config)[1]
    chats = chats[:max_examples] if max_examples else chats
    results, replies = exact_match(lm, chats, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
    samples = [{"prompt": c[-2]["content"] if len(c) > 1 else "",
                "target": c[-1]["content"], "output": r}
               for c, r in list(zip(chats, replies, strict=True))[:5]]
    return {"task": "chat", **results}, samples


def _record(run_dir: Path, task: str, results: dict[str, Any],
            samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Appends the results to metrics.jsonl and writes eval_TASK.json (with samples)."""
    from jaxlm.train import rundir

    ckpts = run_dir / rundir.CHECKPOINT_DIR
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    results = {"step": max(steps, default=0), **results}
    rundir.MetricsWriter(run_dir).write({**results, "kind": f"eval_{task}"})
    (run_dir / f"eval_{task}.json").write_text(
        json.dumps({**results, "samples": samples}, indent=2, ensure_ascii=False) + "\n")
    return results
