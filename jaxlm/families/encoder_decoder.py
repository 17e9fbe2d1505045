"""Encoder-decoder models (Transformer, T5, BART, Marian): seq2seq teacher forcing on
(source, target) pairs, or continuation of plain text (the encoder reads the first half of a
window, the decoder writes the second)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import numpy as np

from jaxlm import objectives, perf
from jaxlm.data.batch import LMBatch, Seq2SeqBatch, seq2seq_batch
from jaxlm.families import schema
from jaxlm.families.spec import (
    FamilySpec,
    attention_width,
    cross_entropy_options,
    kernel_flops,
    synthetic_vocab,
)


class EncoderDecoderSpec(FamilySpec):
    name = "encoder_decoder"
    objective = "seq2seq teacher forcing"
    own_fields = schema.OWN_FIELDS["encoder_decoder"]
    hf_model_types = {"t5": "t5", "bart": "bart", "marian": "marian"}
    continues_prompt = False

    def build_model(self, model_cfg) -> nn.Module:
        from jaxlm.models.seq2seq import EncoderDecoder

        return EncoderDecoder(model_cfg)

    def init_inputs(self, batch_size: int = 1, seq_len: int = 8) -> tuple[Any, ...]:
        tokens = np.zeros((batch_size, seq_len), np.int32)
        return tokens, tokens

    def loss_fn(self, cfg, *, mask_id=None):
        return functools.partial(objectives.seq2seq_loss, **cross_entropy_options(cfg))

    def from_windows(self, windows: LMBatch, start_id: int) -> Seq2SeqBatch:
        """Continuation: the encoder reads the first half of each window (plus its next
        token), the decoder is teacher-forced on the rest."""
        T = windows.inputs.shape[1]
        half = T // 2
        full = np.concatenate([windows.inputs, windows.targets[:, -1:]], axis=1)
        src, tgt = full[:, :half], full[:, half:T]
        return seq2seq_batch(src, tgt, np.ones_like(src, np.float32),
                             np.ones_like(tgt, np.float32), start_id)

    def synthetic_batch(self, cfg, rng: np.random.Generator) -> Seq2SeqBatch:
        """Pairs fill train.seq_len on both sides; plain text is split (from_windows)."""
        if cfg.data.format != "pairs":
            return super().synthetic_batch(cfg, rng)
        B, T = cfg.train.batch_size, cfg.train.seq_len
        src, tgt = (rng.integers(0, synthetic_vocab(cfg), size=(B, T), dtype=np.int32)
                    for _ in range(2))
        ones = np.ones((B, T), np.float32)
        return seq2seq_batch(src, tgt, ones, ones, start_id=0)

    def generate_ids(self, model, params, tokenizer, model_cfg, texts, **options
                     ) -> list[list[int]]:
        """Each text's output (translation, summary), by beam search when beams > 1. Sources
        are encoded as the pair batches and HF's tokenizer(text) do (BART: <s> text </s>);
        the decoder starts at the model config's start token."""
        from jaxlm.data.tokenizers import decoder_start_id
        from jaxlm.generate import generate_seq2seq_ids

        sources = [tokenizer.encode_input(t, whole=True) for t in texts]
        return generate_seq2seq_ids(model, params, sources,
                                    start_id=decoder_start_id(model_cfg, tokenizer),
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0,
                                    **options)

    def tokens_per_example(self, cfg) -> dict[str, int]:
        """Pairs are padded to train.seq_len on both sides; plain text splits one window."""
        T = cfg.train.seq_len
        if cfg.data.format == "pairs":
            return {"source": T, "target": T}
        return {"source": T // 2, "target": T - T // 2}

    def flops_per_example(self, cfg, params: Any, causal_halved: bool) -> float:
        m = cfg.model
        lengths = self.tokens_per_example(cfg)
        S, T = lengths["source"], lengths["target"]

        def tokens_of(keys: tuple[str, ...]) -> int:
            # Encoder weights see the source; cross-attention keys/values project the
            # encoder output (source positions); everything else works on target positions.
            if keys[0] == "encoder" or ("cross_attn" in keys and keys[-2] in ("key", "value")):
                return S
            return T

        dec_layers = m.num_decoder_layers or m.num_layers
        keys = (m.num_layers * S * S  # encoder self-attention
                + dec_layers * T * perf.causal_keys(T, T, causal_halved)  # decoder self
                + dec_layers * T * S)  # cross-attention
        return (kernel_flops(params, tokens_of, m.tie_embeddings)
                + perf.attention_flops(attention_width(m), 1, keys))
