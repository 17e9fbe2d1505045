"""What a model family is: one record that ties its modules to its objective, batch layout,
FLOPs and decoding. `jaxlm.families.registry` holds one instance per family; the rest of the
code asks the spec of a config (`families.of(cfg.model)`) instead of testing a family name.

A new decoder variant (MoE, another attention pattern) is a change to the decoder spec and its
modules; a new family is a new subclass registered in registry.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import numpy as np

from jaxlm import objectives, perf
from jaxlm.data.batch import Batch, LMBatch

if TYPE_CHECKING:
    from jaxlm.config import Config, ModelConfig



class FamilySpec:
    """Base of the family specs; every method is a pure function of its arguments."""

    name: ClassVar[str]
    objective: ClassVar[str]  # in words, for summaries and help
    # ModelConfig fields read only by this family's modules; setting one on another family's
    # model is refused by config validation.
    own_fields: ClassVar[frozenset[str]] = frozenset()
    # HF `model_type` -> module in jaxlm.convert that converts it (both ways).
    hf_model_types: ClassVar[Mapping[str, str]] = {}
    # Whether the objective needs the tokenizer's mask token (masked LM).
    needs_mask_token: ClassVar[bool] = False
    # Whether generated text continues the prompt (decoder) or stands alone (seq2seq).
    continues_prompt: ClassVar[bool] = True
    # Whether whole documents can be packed into rows with segment ids (data.pack).
    packs_documents: ClassVar[bool] = False

    # ------------------------------------------------------------------ model
    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def init_inputs(self, batch_size: int = 1, seq_len: int = 8) -> tuple[Any, ...]:
        """Positional inputs that trace every parameter at init."""
        tokens = np.zeros((batch_size, seq_len), np.int32)
        return (tokens,)

    # ------------------------------------------------------------------ objective
    def loss_fn(self, cfg: Config, *, mask_id: int | None = None) -> objectives.LossFn:
        """loss(apply_fn, params, batch, *, rng, deterministic) -> (loss, aux sums)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ batches
    def from_windows(self, windows: LMBatch, start_id: int) -> Batch:
        """The family's batch for fixed-length windows of plain text."""
        raise NotImplementedError

    def synthetic_batch(self, cfg: Config, rng: np.random.Generator) -> Batch:
        """One global batch of random tokens in the family's layout (bench, profile, AOT
        compile and init need no data)."""
        B, T = cfg.train.batch_size, cfg.train.seq_len
        tokens = rng.integers(0, synthetic_vocab(cfg), size=(B, T + 1), dtype=np.int32)
        ones = np.ones((B, T), np.float32)
        return self.from_windows(LMBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                                         loss_mask=ones), start_id=0)

    # ------------------------------------------------------------------ decoding
    def generate_ids(self, model: nn.Module, params: Any, tokenizer: Any, model_cfg: Any,
                     texts: list[str], **options: Any) -> list[list[int]]:
        """New token ids for each text (options: max_new_tokens, temperature, top_k, top_p,
        seed, beams, length_penalty), encoded by the tokenizer's own rules."""
        from jaxlm.config import ConfigError

        raise ConfigError(f"a {self.objective} model ({self.name}) does not generate text; "
                          "call it on token ids for logits")

    # ------------------------------------------------------------------ FLOPs
    def flops_per_example(self, cfg: Config, params: Any, causal_halved: bool) -> float:
        raise NotImplementedError

    def flops_per_token(self, cfg: Config, params: Any, *, causal_halved: bool = True) -> float:
        """Training FLOPs per counted token (train.seq_len per example): 6 × weights × the
        positions they apply to, plus 12·H·Q per query-key pair of attention. With
        `causal_halved=False`, every causal or banded layer is counted dense, as a dense
        kernel executes it: the figure equal to the traced step's matmul FLOPs."""
        return self.flops_per_example(cfg, params, causal_halved) / cfg.train.seq_len


def cross_entropy_options(cfg: Config) -> dict[str, float]:
    """The train.* settings every objective's cross entropy takes."""
    return {"label_smoothing": cfg.train.label_smoothing, "z_loss": cfg.train.z_loss}


def synthetic_vocab(cfg: Config) -> int:
    """Random tokens are drawn below this id; the last id stands in for a mask token."""
    return max(1, cfg.model.vocab_size - 1)


def attention_width(model_cfg: ModelConfig) -> int:
    """H·Q: heads times head width."""
    return model_cfg.num_heads * (model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads)


def kernel_flops(params: Any, tokens_of: Callable[[tuple[str, ...]], int],
                 tie_embeddings: bool) -> float:
    """6 × Σ (kernel size × positions it is applied to), over the matmul weights."""
    total = 0.0
    for keys, size in perf.matmul_weights(params, tie_embeddings):
        total += 6.0 * size * tokens_of(keys)
    return total
