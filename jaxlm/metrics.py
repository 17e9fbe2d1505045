"""Text and language-model metrics used by ``jaxlm eval`` (pure Python / numpy).

BLEU and chrF wrap ``sacrebleu`` (corpus level), ROUGE wraps ``rouge_score``, and the
SQuAD metrics re-implement the official v1.1 evaluation script (with the v2 convention for
empty answers).

Reference conventions: ``references[i]`` holds the reference(s) for ``hypotheses[i]`` and may
be a single string or a list of strings (the number may vary per example). This is the
per-example layout, *not* sacrebleu's "one stream per reference" layout.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = [
    "accuracy",
    "bits_per_byte",
    "bleu",
    "chrf",
    "exact_match",
    "normalize_answer",
    "perplexity",
    "rouge",
    "squad_scores",
    "token_f1",
]

RefsT = Sequence[str] | Sequence[Sequence[str]]


def _check_lengths(a: Sequence, b: Sequence, a_name: str, b_name: str) -> None:
    """Raise ValueError unless ``a`` and ``b`` are non-empty and of equal length."""
    if isinstance(a, str) or isinstance(b, str):
        raise TypeError(f"{a_name} and {b_name} must be sequences of strings, not a str")
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} {a_name} vs {len(b)} {b_name}")
    if len(a) == 0:
        raise ValueError(f"no {a_name} to score")


def _as_list(refs: str | Sequence[str]) -> list[str]:
    """A single reference string or a sequence of them, as a list."""
    return [refs] if isinstance(refs, str) else list(refs)


def _ref_streams(hypotheses: Sequence[str], references: RefsT) -> list[list[str | None]]:
    """Per-example references -> sacrebleu reference streams (``None`` pads missing refs)."""
    _check_lengths(hypotheses, references, "hypotheses", "references")
    per_example = [_as_list(r) for r in references]
    if any(len(r) == 0 for r in per_example):
        raise ValueError("every hypothesis needs at least one reference")
    n_refs = max(len(r) for r in per_example)
    return [[r[i] if i < len(r) else None for r in per_example] for i in range(n_refs)]


# --------------------------------------------------------------------------- LM metrics
def perplexity(total_nll_nats: float, num_tokens: int) -> float:
    """``exp(total_nll / num_tokens)``; ``inf`` on overflow."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    try:
        return math.exp(total_nll_nats / num_tokens)
    except OverflowError:
        return math.inf


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Total NLL in nats converted to bits, per UTF-8 byte of the evaluated text."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return total_nll_nats / (num_bytes * math.log(2))


def accuracy(predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of positions where ``predictions == labels``, weighted by ``mask`` if given."""
    preds, labels = np.asarray(predictions), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"shape mismatch: predictions {preds.shape} vs labels {labels.shape}")
    correct = (preds == labels).astype(np.float64)
    weights = np.ones_like(correct) if mask is None else np.asarray(mask, dtype=np.float64)
    if weights.shape != correct.shape:
        raise ValueError(f"shape mismatch: mask {weights.shape} vs labels {labels.shape}")
    total = weights.sum()
    if total <= 0:
        raise ValueError("accuracy over zero (unmasked) elements is undefined")
    return float((correct * weights).sum() / total)


# ------------------------------------------------------------------- generation metrics
def bleu(hypotheses: Sequence[str], references: RefsT, *, tokenize: str = "13a") -> dict:
    """Corpus BLEU via ``sacrebleu.metrics.BLEU``; score in 0..100."""
    from sacrebleu.metrics import BLEU

    score = BLEU(tokenize=tokenize).corpus_score(
        list(hypotheses), _ref_streams(hypotheses, references)
    )
    return {
        "bleu": float(score.score),
        "precisions": [float(p) for p in score.precisions],
        "bp": float(score.bp),
        "sys_len": int(score.sys_len),
        "ref_len": int(score.ref_len),
    }


def chrf(hypotheses: Sequence[str], references: RefsT) -> float:
    """Corpus chrF via ``sacrebleu.metrics.CHRF`` (default settings); score in 0..100."""
    from sacrebleu.metrics import CHRF

    streams = _ref_streams(hypotheses, references)
    return float(CHRF().corpus_score(list(hypotheses), streams).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x100 (``rouge_score``, Porter stemmer).

    ``rougeLsum`` treats ``"\\n"`` as the sentence separator. A list of references per
    prediction is also accepted (best F-measure per type, as ``score_multi``).
    """
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references, "predictions", "references")
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, refs in zip(predictions, references, strict=True):
        if not _as_list(refs):
            raise ValueError("every prediction needs at least one reference")
        result = scorer.score_multi(_as_list(refs), pred)
        for t in types:
            totals[t] += result[t].fmeasure
    return {t: 100.0 * v / len(predictions) for t, v in totals.items()}


# ---------------------------------------------------------------------- SQuAD metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower-case, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _ground_truths(ground_truths: str | Sequence[str]) -> list[str]:
    """A single answer or list of answers; an empty list means unanswerable (``[""]``)."""
    return _as_list(ground_truths) or [""]


def exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized ground truth, else 0.0."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(g)) for g in _ground_truths(ground_truths))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:  # SQuAD v2 convention
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """SQuAD bag-of-tokens F1, max over ground truths (both empty -> 1.0, one empty -> 0.0)."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(g).split()) for g in _ground_truths(ground_truths))


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """Mean exact match and F1 over examples, both in 0..100."""
    _check_lengths(predictions, answers, "predictions", "answers")
    pairs = list(zip(predictions, answers, strict=True))
    em = sum(exact_match(p, a) for p, a in pairs)
    f1 = sum(token_f1(p, a) for p, a in pairs)
    return {"exact_match": 100.0 * em / len(pairs), "f1": 100.0 * f1 / len(pairs)}
