"""Which sampling settings give readable text: samples of a trained run under each setting,
scored by the share of their words that occur in the training corpus and by their variety.

    python benchmarks/sampling_defaults.py [--run runs/tiny] [--samples 16] [--tokens 200]

For each (temperature, top-k, top-p) it draws `--samples` continuations of a few speaker
prompts and prints a markdown table: `known words` (the share of sampled words, letters and
apostrophes, that occur in the corpus the run trained on: the share a reader takes for
English), `distinct bigrams` (unique word pairs over all pairs: low when the text loops, as
greedy decoding does) and one sample. `jaxlm generate`'s defaults (jaxlm.sampling) are the
setting chosen from this table.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import jaxlm
from jaxlm import sampling
from jaxlm.data.prepare import prepare

PROMPTS = ["ROMEO:\n", "First Citizen:\n", "KING HENRY:\n", "LADY MACBETH:\n"]
# (temperature, top_k, top_p): the raw model, the old default, and narrower ones.
SETTINGS = [(1.0, 0, 1.0), (0.8, 0, 1.0), (0.7, 0, 1.0), (0.5, 0, 1.0), (0.8, 40, 1.0),
            (0.8, 0, 0.9), (0.8, 40, 0.9), (0.7, 40, 0.9), (0.6, 20, 0.9), (0.0, 0, 1.0)]
WORD = re.compile(r"[A-Za-z']+")


def corpus_words(run: Path) -> set[str]:
    """The lower-cased words of the run's training text (a prepared corpus or data.files)."""
    cfg = jaxlm.load(run).config
    paths = [Path(f) for f in cfg.data.files] or [prepare(cfg.data.name, progress=False).train]
    return {w.lower() for p in paths for w in WORD.findall(p.read_text(errors="replace"))}


def score(texts: list[str], known: set[str]) -> tuple[float, float]:
    """(share of words in `known`, distinct word bigrams over all bigrams)."""
    words = [w.lower() for t in texts for w in WORD.findall(t)]
    bigrams = [(a, b) for t in texts for a, b in zip(WORD.findall(t), WORD.findall(t)[1:])]
    share = sum(w in known for w in words) / max(len(words), 1)
    return share, len(set(bigrams)) / max(len(bigrams), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/tiny", help="a trained run directory")
    ap.add_argument("--samples", type=int, default=16, help="continuations per setting")
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per continuation")
    args = ap.parse_args()
    lm, known = jaxlm.load(args.run), corpus_words(Path(args.run))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.samples)]
    print("| temperature | top-k | top-p | known words | distinct bigrams | a sample |")
    print("|---:|---:|---:|---:|---:|---|")
    for temperature, top_k, top_p in SETTINGS:
        texts = lm.generate(prompts, max_new_tokens=args.tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=0)
        share, distinct = score(texts, known)
        shown = (prompts[0] + texts[0])[:70].replace("\n", " / ").replace("|", "\\|")
        default = (temperature, top_k, top_p) == (sampling.TEMPERATURE, sampling.TOP_K,
                                                  sampling.TOP_P)
        print(f"| {temperature:g} | {top_k} | {top_p:g} | {100 * share:.1f}% | "
              f"{100 * distinct:.1f}% | {shown}{' (default)' if default else ''} |")


if __name__ == "__main__":
    main()
