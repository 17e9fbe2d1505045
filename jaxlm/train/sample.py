"""The short sample the end-of-training summary shows: the trained parameters continuing a
fixed prompt, seeded, with the readable-text settings of `jaxlm generate` (jaxlm.sampling)."""

from __future__ import annotations

from typing import Any

import jax

from jaxlm import sampling
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.setup import StepSetup


def can_sample(setup: StepSetup, prompt: str | None) -> bool:
    """A prompt was asked for, the family continues prompts, and one process holds the
    parameters (a multi-process run's are spread over hosts that decode apart)."""
    return bool(prompt) and setup.family.continues_prompt and jax.process_count() == 1


def summary_sample(setup: StepSetup, params: Any, tokenizer: Tokenizer, prompt: str) -> str:
    """`prompt` and its continuation by sampling.SUMMARY_TOKENS tokens."""
    with jax.set_mesh(setup.mesh):
        (ids,) = setup.family.generate_ids(
            setup.model, params, tokenizer, setup.cfg.model, [prompt],
            max_new_tokens=sampling.SUMMARY_TOKENS, temperature=sampling.TEMPERATURE,
            top_k=sampling.TOP_K, top_p=sampling.TOP_P, seed=sampling.SUMMARY_SEED)
    return prompt + tokenizer.decode(ids)
