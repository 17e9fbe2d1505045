"""Decoder-only language models (GPT-2/GPT-3/GPT-Neo/Llama/Qwen/Gemma): causal LM on next
tokens."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from jaxlm import objectives, perf
from jaxlm.data.batch import LMBatch
from jaxlm.families import schema
from jaxlm.families.spec import (
    FamilySpec,
    attention_width,
    cross_entropy_options,
    kernel_flops,
)


class DecoderSpec(FamilySpec):
    name = "decoder"
    objective = "causal LM"
    own_fields = schema.OWN_FIELDS["decoder"]
    hf_model_types = {"gpt2": "gpt2", "gpt_neo": "gpt_neo", "llama": "llama",
                      "mistral": "mistral", "qwen2": "qwen", "qwen3": "qwen",
                      "gemma2": "gemma", "gemma3_text": "gemma", "mixtral": "mixtral"}
    packs_documents = True

    def build_model(self, model_cfg) -> nn.Module:
        from jaxlm.models.transformer import DecoderLM

        return DecoderLM(model_cfg)

    def loss_fn(self, cfg, *, mask_id=None):
        m, extra = cfg.model, None
        if m.num_experts:  # MoE: the router losses the layers sow join the objective
            from jaxlm.models import moe

            extra = functools.partial(moe.router_losses, num_experts=m.num_experts,
                                      aux_weight=m.router_aux_loss, z_weight=m.router_z_loss)
        # Context parallelism balances the causal work of its shards by a zig-zag order.
        zigzag = cfg.mesh.context if cfg.mesh.context > 1 and cfg.mesh.context_zigzag else 0
        return functools.partial(objectives.causal_lm_loss, **cross_entropy_options(cfg),
                                 extra_loss=extra, chunk=cfg.train.loss_chunk,
                                 logit_softcap=m.final_logit_softcap, zigzag=zigzag)

    def from_windows(self, windows: LMBatch, start_id: int) -> LMBatch:
        return windows

    def generate_ids(self, model, params, tokenizer, model_cfg, texts, *, beams=1,
                     length_penalty=1.0, **sampling) -> list[list[int]]:
        """Continuations of the prompts, encoded as HF's tokenizer(text) would (e.g. Llama's
        BOS; BOS alone for an empty prompt)."""
        from jaxlm.config import ConfigError
        from jaxlm.generate import generate_ids

        if beams > 1:
            raise ConfigError("beam search (beams > 1) is for encoder-decoder models; this "
                              f"is a {self.name} model")
        prompts = [tokenizer.encode_input(t) for t in texts]
        return generate_ids(model, params, prompts, max_len=model_cfg.max_seq_len,
                            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0, **sampling)

    def flops_per_example(self, cfg, params: Any, causal_halved: bool) -> float:
        from jaxlm.models.attention import local_layers

        m, T = cfg.model, cfg.train.seq_len
        local = sum(local_layers(m))
        keys = (m.num_layers - local) * perf.causal_keys(T, T, causal_halved)
        keys += local * perf.causal_keys(T, m.local_window, causal_halved)
        # MoE: an expert's kernels see the tokens routed to it, k/E of them on average.
        routed = T * m.experts_per_token / max(m.num_experts, 1)
        tokens_of = lambda path: routed if "experts" in path else T
        return (kernel_flops(params, tokens_of, m.tie_embeddings)
                + perf.attention_flops(attention_width(m), T, keys))
