"""Tests for jaxlm.metrics against sacrebleu / rouge_score and independent hand computations."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
import pytest
import sacrebleu
from hypothesis import assume, given
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from jaxlm import metrics as M

# ------------------------------------------------------------------------------ LM metrics


def test_uniform_over_bytes() -> None:
    n = 1000
    total = n * math.log(256.0)  # uniform over 256 byte values, in nats
    assert M.perplexity(total, n) == pytest.approx(256.0, rel=1e-12)
    assert M.bits_per_byte(total, n) == pytest.approx(8.0, rel=1e-12)


def test_perplexity_and_bpb_hand_numbers() -> None:
    assert M.perplexity(0.0, 7) == 1.0
    assert M.perplexity(2 * math.log(2.0) * 5, 5) == pytest.approx(4.0)  # 2 bits/token
    assert M.perplexity(1e6, 1) == math.inf
    # 3 tokens covering 12 bytes, 6 nats total -> 6 / (12 ln 2) bits per byte
    assert M.bits_per_byte(6.0, 12) == pytest.approx(0.5 / math.log(2.0))
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)
    with pytest.raises(ValueError):
        M.bits_per_byte(1.0, 0)


def test_accuracy() -> None:
    preds = np.array([[1, 2, 3], [4, 5, 6]])
    labels = np.array([[1, 0, 3], [4, 5, 0]])
    assert M.accuracy(preds, labels) == pytest.approx(4 / 6)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert M.accuracy(preds, labels, mask) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.accuracy(preds, labels[:, :2])
    with pytest.raises(ValueError):
        M.accuracy(preds, labels, np.zeros_like(mask))


# ------------------------------------------------------------------------------ BLEU / chrF

BLEU_CASES = [
    (["the cat sat on the mat", "hello world"], ["the cat sat on the mat", "hello world"]),
    (["aaa bbb ccc ddd"], ["www xxx yyy zzz"]),
    (
        ["the cat is on the mat", "there is a dog here today"],
        [["the cat sat on the mat", "a cat is on the mat"], ["a dog is here", "there is a dog"]],
    ),
    (
        ["it is a guide to action", "he read the book"],  # variable number of references
        [["it is a guide to action that ensures"], ["he read a book", "he was reading the book"]],
    ),
]


def _streams(refs: list) -> list[list[str | None]]:
    per = [[r] if isinstance(r, str) else r for r in refs]
    n = max(map(len, per))
    return [[r[i] if i < len(r) else None for r in per] for i in range(n)]


@pytest.mark.parametrize(("hyps", "refs"), BLEU_CASES)
def test_bleu_chrf_match_sacrebleu(hyps: list[str], refs: list) -> None:
    ref_bleu = sacrebleu.corpus_bleu(hyps, _streams(refs))
    out = M.bleu(hyps, refs)
    assert out["bleu"] == pytest.approx(ref_bleu.score)
    assert out["precisions"] == pytest.approx(ref_bleu.precisions)
    assert out["bp"] == pytest.approx(ref_bleu.bp)
    assert (out["sys_len"], out["ref_len"]) == (ref_bleu.sys_len, ref_bleu.ref_len)
    assert M.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, _streams(refs)).score)


def test_bleu_chrf_extremes() -> None:
    assert M.bleu(*BLEU_CASES[0])["bleu"] == pytest.approx(100.0)
    assert M.chrf(*BLEU_CASES[0]) == pytest.approx(100.0)
    assert M.bleu(*BLEU_CASES[1])["bleu"] == 0.0
    assert M.chrf(*BLEU_CASES[1]) == 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


@pytest.mark.parametrize(
    ("hyps", "refs", "matches", "totals", "sys_len", "ref_len"),
    [
        # hyp n-grams vs "the cat sat on a mat today": clipped "the"=1 -> 5/6, 3/5, 2/4, 1/3
        (
            ["the cat sat on the mat"],
            ["the cat sat on a mat today"],
            [5, 3, 2, 1],
            [6, 5, 4, 3],
            6,
            7,
        ),
        # corpus level: counts are summed over sentences, not averaged
        (
            ["the cat sat on the mat", "a dog ran"],
            ["the cat sat on a mat today", "a dog ran"],
            [8, 5, 3, 1],
            [9, 7, 5, 3],
            9,
            10,
        ),
    ],
)
def test_bleu_by_hand(
    hyps: list[str],
    refs: list[str],
    matches: list[int],
    totals: list[int],
    sys_len: int,
    ref_len: int,
) -> None:
    for n in range(1, 5):  # re-derive the hand counts: clipped n-gram matches / hyp n-grams
        grams = [_ngrams(h.split(), n) for h in hyps]
        ref_grams = [_ngrams(r.split(), n) for r in refs]
        clipped = sum(sum((g & r).values()) for g, r in zip(grams, ref_grams, strict=True))
        assert (clipped, sum(sum(g.values()) for g in grams)) == (matches[n - 1], totals[n - 1])
    p = np.array(matches, dtype=np.float64) / np.array(totals, dtype=np.float64)
    bp = math.exp(1.0 - ref_len / sys_len) if sys_len < ref_len else 1.0
    expected = 100.0 * bp * math.exp(np.log(p).mean())
    out = M.bleu(hyps, refs)
    assert out["precisions"] == pytest.approx(list(100.0 * p))
    assert out["bp"] == pytest.approx(bp)
    assert (out["sys_len"], out["ref_len"]) == (sys_len, ref_len)
    assert out["bleu"] == pytest.approx(expected)


def test_length_mismatch_and_empty_errors() -> None:
    with pytest.raises(ValueError, match=r"2 .*3 "):
        M.bleu(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"1 .*2 "):
        M.chrf(["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"2 .*1 "):
        M.rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"1 .*0 "):
        M.squad_scores(["a"], [])
    with pytest.raises(ValueError):
        M.bleu(["a"], [[]])


# ------------------------------------------------------------------------------------ ROUGE

ROUGE_PREDS = ["the cat was under the bed", "the bed was under the cat"]
ROUGE_REFS = ["the cat was found under the big bed", "the cat was under the bed"]


def _lcs(a: list[str], b: list[str]) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    return 0.0 if overlap == 0 else 2 * overlap / (n_pred + n_ref)  # == 2PR / (P + R)


def test_rouge_by_hand() -> None:
    r1, rl = [], []
    for pred, ref in zip(ROUGE_PREDS, ROUGE_REFS, strict=True):
        p, r = pred.split(), ref.split()  # words chosen so stemming/tokenizing is a no-op
        r1.append(_f(sum((Counter(p) & Counter(r)).values()), len(p), len(r)))
        rl.append(_f(_lcs(p, r), len(p), len(r)))
    assert r1 == pytest.approx([6 / 7, 1.0]) and rl == pytest.approx([6 / 7, 4 / 6])
    out = M.rouge(ROUGE_PREDS, ROUGE_REFS)
    assert out["rouge1"] == pytest.approx(100 * np.mean(r1))
    assert out["rougeL"] == pytest.approx(100 * np.mean(rl))


def test_rouge_matches_rouge_score() -> None:
    preds = ROUGE_PREDS + ["Running dogs were barking loudly.\nThey ran."]
    refs = ROUGE_REFS + ["The dog runs and barks loudly.\nIt runs away."]
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    out = M.rouge(preds, refs)
    assert set(out) == set(types)
    for t in types:
        assert out[t] == pytest.approx(100 * np.mean([s[t].fmeasure for s in scores]))
    assert M.rouge(["a b c"], ["a b c"]) == pytest.approx(dict.fromkeys(types, 100.0))


# ------------------------------------------------------------------------------------ SQuAD


def _official_normalize(s: str) -> str:
    """Copy of normalize_answer from the official SQuAD v1.1 evaluate script."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(pred: str, truth: str) -> float:
    p, t = _official_normalize(pred).split(), _official_normalize(truth).split()
    if not p or not t:  # SQuAD v2 convention
        return float(p == t)
    common = Counter(p) & Counter(t)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(p), num_same / len(t)
    return (2 * precision * recall) / (precision + recall)


SQUAD_VECTORS = [  # (prediction, ground truths, EM, F1)
    ("The cat", ["cat"], 1.0, 1.0),
    ("an apple!", ["Apple"], 1.0, 1.0),
    ("  New   York,  City ", ["new york city"], 1.0, 1.0),
    ("theater", ["the ater"], 0.0, 0.0),  # articles only removed as whole words
    ("", ["Paris"], 0.0, 0.0),
    ("Paris", [""], 0.0, 0.0),
    ("", [""], 1.0, 1.0),
    ("the", ["a"], 1.0, 1.0),  # both normalize to empty
    ("Paris", [], 0.0, 0.0),  # no answers == unanswerable
    ("in Paris France", ["London", "Paris", "Paris, France"], 0.0, 0.8),
    ("London", ["London", "Paris"], 1.0, 1.0),
    ("the the cat cat cat", ["cat dog"], 0.0, 0.4),  # Counter intersection: 1 common
    ("cat cat", ["cat cat dog"], 0.0, 0.8),
    ("Café Müller", ["café müller."], 1.0, 1.0),
    ("¿Qué pasa?", ["qué pasa"], 0.0, 0.5),  # non-ASCII punctuation is kept
    ("Straße", ["STRASSE"], 0.0, 0.0),
]


@pytest.mark.parametrize(("pred", "truths", "em", "f1"), SQUAD_VECTORS)
def test_squad_vectors(pred: str, truths: list[str], em: float, f1: float) -> None:
    assert M.exact_match(pred, truths) == em
    assert M.token_f1(pred, truths) == pytest.approx(f1)
    golds = truths or [""]
    assert M.normalize_answer(pred) == _official_normalize(pred)
    assert M.exact_match(pred, truths) == max(
        float(_official_normalize(pred) == _official_normalize(g)) for g in golds
    )
    assert M.token_f1(pred, truths) == pytest.approx(max(_official_f1(pred, g) for g in golds))


def test_single_string_ground_truth_and_squad_scores() -> None:
    assert M.exact_match("The Cat.", "cat") == 1.0
    assert M.token_f1("black cat", "the cat") == pytest.approx(2 / 3)
    preds = [v[0] for v in SQUAD_VECTORS]
    answers = [v[1] for v in SQUAD_VECTORS]
    out = M.squad_scores(preds, answers)
    assert out["exact_match"] == pytest.approx(100 * np.mean([v[2] for v in SQUAD_VECTORS]))
    assert out["f1"] == pytest.approx(100 * np.mean([v[3] for v in SQUAD_VECTORS]))


CHARS = st.sampled_from(list("abc the,.!  ÉéßΩ\t\n")) | st.characters()
TEXT = st.text(alphabet=CHARS, max_size=30)


@given(TEXT, st.lists(TEXT, min_size=1, max_size=4))
def test_squad_properties(pred: str, truths: list[str]) -> None:
    f1, em = M.token_f1(pred, truths), M.exact_match(pred, truths)
    assert 0.0 <= f1 <= 1.0
    assert em in (0.0, 1.0) and em <= f1
    assert f1 == pytest.approx(max(_official_f1(pred, g) for g in truths))


@given(TEXT)
def test_f1_self_is_one(x: str) -> None:
    assert M.exact_match(x, [x]) == 1.0
    assume(M.normalize_answer(x))
    assert M.token_f1(x, [x]) == 1.0
