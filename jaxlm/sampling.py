"""Sampling settings for text a person reads: the defaults of `jaxlm generate` and of the
sample at the end of training. A leaf module (no JAX), so the CLI's parser can read them.

Top-p 0.9 drops the low-probability tail (Holtzman et al., 2019), which in a small byte-level
model is where misspelt words and stray bytes come from, and temperature 0.7 sharpens what is
left: on the default Shakespeare model this raises the share of sampled words that are words
of the corpus well above temperature 0.8 alone, while the text keeps varying (lower
temperatures start to loop, as greedy decoding does). Top-k 40 bounds the tail of large
vocabularies (as in GPT-2's samples); a byte model's 0.9 nucleus is smaller anyway. The
measurements: benchmarks/sampling_defaults.py, its table in benchmarks/README.md.
"""

from __future__ import annotations

TEMPERATURE = 0.7
TOP_K = 40
TOP_P = 0.9

# The end-of-training sample: a few dozen tokens from a fixed seed, so it is the same text for
# the same parameters.
SUMMARY_TOKENS = 64
SUMMARY_SEED = 0
