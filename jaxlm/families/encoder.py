"""Encoder-only models (BERT/RoBERTa): masked LM with BERT's 80/10/10 corruption."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from jaxlm import objectives, perf
from jaxlm.data.batch import LMBatch, MLMBatch
from jaxlm.families import schema
from jaxlm.families.spec import (
    FamilySpec,
    attention_width,
    cross_entropy_options,
    kernel_flops,
    synthetic_vocab,
)


class EncoderSpec(FamilySpec):
    name = "encoder"
    objective = "masked LM (15%, 80/10/10, re-masked every step)"
    own_fields = schema.OWN_FIELDS["encoder"]
    hf_model_types = {"bert": "bert", "roberta": "bert"}
    needs_mask_token = True
    continues_prompt = False

    def build_model(self, model_cfg) -> nn.Module:
        from jaxlm.models.encoder import EncoderMLM

        return EncoderMLM(model_cfg)

    def loss_fn(self, cfg, *, mask_id=None):
        if mask_id is None:  # synthetic data (bench, compile): the id random tokens never use
            mask_id = synthetic_vocab(cfg)
        return functools.partial(objectives.masked_lm_loss, mask_id=mask_id,
                                 vocab_size=cfg.model.vocab_size, rate=cfg.train.mlm_rate,
                                 **cross_entropy_options(cfg))

    def from_windows(self, windows: LMBatch, start_id: int) -> MLMBatch:
        return MLMBatch(inputs=windows.inputs, loss_mask=windows.loss_mask)

    def flops_per_example(self, cfg, params: Any, causal_halved: bool) -> float:
        m, T = cfg.model, cfg.train.seq_len
        return (kernel_flops(params, lambda _: T, m.tie_embeddings)
                + perf.attention_flops(attention_width(m), T, m.num_layers * T))
