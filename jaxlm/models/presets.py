"""Named architectures: the `model.*` fields each preset sets before YAML and overrides apply."""

from __future__ import annotations

from typing import Any

_GPT2 = dict(family="decoder", norm="layernorm", norm_position="pre", norm_eps=1e-5,
             activation="gelu_tanh", gated_mlp=False, position="learned", use_bias=True,
             tie_embeddings=True)
_LLAMA = dict(family="decoder", norm="rmsnorm", norm_position="pre", norm_eps=1e-5,
              activation="silu", gated_mlp=True, position="rope", use_bias=False,
              tie_embeddings=False, rope_theta=10000.0)
# Llama 3.1 / 3.2 (published config.json): 128K vocabulary and context, RoPE base 500000
# with "llama3" scaling (low/high frequency factors 1 and 4, original context 8192).
_LLAMA3 = dict(_LLAMA, vocab_size=128256, max_seq_len=131072, rope_theta=500000.0,
               rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_len=8192)
# Qwen2.5 (published config.json): RMSNorm eps 1e-6, RoPE base 1e6, biases on q/k/v only.
_QWEN2 = dict(_LLAMA, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True)
# Qwen3 (published config.json): per-head q/k RMSNorm instead of the biases, heads of 128,
# 151936-token vocabulary, 40960 positions.
_QWEN3 = dict(_LLAMA, norm_eps=1e-6, rope_theta=1e6, qk_norm=True, head_dim=128,
              vocab_size=151936, max_seq_len=40960)
# Gemma 2/3 (published config.json): RMSNorm (1 + w) before and after each sublayer,
# GeGLU, embeddings times sqrt(d_model), tied output, heads of 256 scaled by
# query_pre_attn_scalar**-0.5 = 256**-0.5 (the default 1/sqrt(head_dim)).
_GEMMA = dict(family="decoder", norm="rmsnorm_plus1", norm_position="pre", norm_eps=1e-6,
              activation="gelu_tanh", gated_mlp=True, position="rope", use_bias=False,
              tie_embeddings=True, embed_scale=True, sandwich_norm=True, head_dim=256)
# Gemma 2: soft-caps 50 (attention) and 30 (output), even layers sliding over 4096 keys.
_GEMMA2 = dict(_GEMMA, rope_theta=10000.0, attention_softcap=50.0, final_logit_softcap=30.0,
               local_window=4096, local_pattern="LG", vocab_size=256000, max_seq_len=8192)
# Gemma 3: q/k norms, five sliding layers (RoPE base 10000) per global one (base 1e6).
_GEMMA3 = dict(_GEMMA, qk_norm=True, rope_theta=1e6, rope_local_theta=10000.0,
               local_pattern="LLLLLG")
_BERT = dict(family="encoder", norm="layernorm", norm_position="post", norm_eps=1e-12,
             activation="gelu", gated_mlp=False, position="learned", use_bias=True,
             tie_embeddings=True, num_layers=12, d_model=768, num_heads=12, d_ff=3072,
             max_seq_len=512)
_SEQ2SEQ = dict(family="encoder_decoder", gated_mlp=False, tie_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (124M).
    "gpt2": dict(_GPT2, num_layers=12, d_model=768, num_heads=12, d_ff=3072,
                 vocab_size=50257, max_seq_len=1024),
    # GPT-3 125M ("Small" in the GPT-3 paper's table 2.1), GPT-2 blocks.
    "gpt3": dict(_GPT2, num_layers=12, d_model=768, num_heads=12, d_ff=3072,
                 vocab_size=50257, max_seq_len=2048),
    # A ~1B Llama (TinyLlama-like shape, GQA 32/4).
    "llama": dict(_LLAMA, num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
                  d_ff=5632, vocab_size=32000, max_seq_len=2048),
    # More GPT-3 paper sizes (table 2.1; d_ff = 4 d_model). The table's 1.3B row (24 heads of
    # 128 ≠ 2048) and 13B row (d_model 5140) are inconsistent with its parameter counts; we
    # use 16 heads and 5120 as Megatron-LM does. GPT-3's alternating dense / banded layers
    # are off by default: set model.local_window (the paper gives no width; GPT-Neo uses 256).
    "gpt3-350m": dict(_GPT2, num_layers=24, d_model=1024, num_heads=16, d_ff=4096,
                      vocab_size=50257, max_seq_len=2048),
    "gpt3-760m": dict(_GPT2, num_layers=24, d_model=1536, num_heads=16, d_ff=6144,
                      vocab_size=50257, max_seq_len=2048),
    "gpt3-1.3b": dict(_GPT2, num_layers=24, d_model=2048, num_heads=16, d_ff=8192,
                      vocab_size=50257, max_seq_len=2048),
    "gpt3-2.7b": dict(_GPT2, num_layers=32, d_model=2560, num_heads=32, d_ff=10240,
                      vocab_size=50257, max_seq_len=2048),
    "gpt3-6.7b": dict(_GPT2, num_layers=32, d_model=4096, num_heads=32, d_ff=16384,
                      vocab_size=50257, max_seq_len=2048),
    "gpt3-13b": dict(_GPT2, num_layers=40, d_model=5120, num_heads=40, d_ff=20480,
                     vocab_size=50257, max_seq_len=2048),
    "gpt3-175b": dict(_GPT2, num_layers=96, d_model=12288, num_heads=96, d_ff=49152,
                      vocab_size=50257, max_seq_len=2048),
    # GPT-Neo 125M: GPT-3-style alternating global/local (window 256), unscaled logits.
    "gpt-neo": dict(_GPT2, num_layers=12, d_model=768, num_heads=12, d_ff=3072,
                    vocab_size=50257, max_seq_len=2048, local_window=256, local_every=2,
                    attention_scale=1.0),
    # Llama 2 7B (MHA) and Llama 3 8B (GQA 32/8, 128K vocabulary, RoPE base 500000).
    "llama2-7b": dict(_LLAMA, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32,
                      d_ff=11008, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": dict(_LLAMA, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
                      d_ff=14336, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    # Llama 3.1 8B (rope factor 8) and Llama 3.2 1B / 3B (factor 32, tied embeddings).
    "llama3.1-8b": dict(_LLAMA3, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
                        d_ff=14336, rope_factor=8.0),
    "llama3.2-1b": dict(_LLAMA3, num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8,
                        head_dim=64, d_ff=8192, rope_factor=32.0, tie_embeddings=True),
    "llama3.2-3b": dict(_LLAMA3, num_layers=28, d_model=3072, num_heads=24, num_kv_heads=8,
                        head_dim=128, d_ff=8192, rope_factor=32.0, tie_embeddings=True),
    # Qwen2.5 0.5B (tied) and 7B (the base model's 131072 positions).
    "qwen2.5-0.5b": dict(_QWEN2, num_layers=24, d_model=896, num_heads=14, num_kv_heads=2,
                         d_ff=4864, vocab_size=151936, max_seq_len=32768, tie_embeddings=True),
    "qwen2.5-7b": dict(_QWEN2, num_layers=28, d_model=3584, num_heads=28, num_kv_heads=4,
                       d_ff=18944, vocab_size=152064, max_seq_len=131072),
    # Qwen3 0.6B (tied) and 8B.
    "qwen3-0.6b": dict(_QWEN3, num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8,
                       d_ff=3072, tie_embeddings=True),
    "qwen3-8b": dict(_QWEN3, num_layers=36, d_model=4096, num_heads=32, num_kv_heads=8,
                     d_ff=12288),
    # Gemma 2 2B and 9B.
    "gemma2-2b": dict(_GEMMA2, num_layers=26, d_model=2304, num_heads=8, num_kv_heads=4,
                      d_ff=9216),
    "gemma2-9b": dict(_GEMMA2, num_layers=42, d_model=3584, num_heads=16, num_kv_heads=8,
                      d_ff=14336),
    # Gemma 3 1B (window 512, no RoPE scaling) and the 4B's language model (window 1024,
    # linear RoPE scaling by 8 on the global layers; without the vision tower).
    "gemma3-1b": dict(_GEMMA3, num_layers=26, d_model=1152, num_heads=4, num_kv_heads=1,
                      d_ff=6912, vocab_size=262144, max_seq_len=32768, local_window=512),
    "gemma3-4b": dict(_GEMMA3, num_layers=34, d_model=2560, num_heads=8, num_kv_heads=4,
                      d_ff=10240, vocab_size=262208, max_seq_len=131072, local_window=1024,
                      rope_scaling="linear", rope_factor=8.0),
    # Tiny ones of each for tests and CPU runs (vocabularies cover the byte tokenizer; short
    # windows and a short original context so the local layers and the scaling act).
    "llama3-tiny": dict(_LLAMA3, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                        d_ff=128, vocab_size=512, max_seq_len=256, rope_factor=8.0,
                        rope_original_max_len=64, tie_embeddings=True),
    "qwen2-tiny": dict(_QWEN2, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                       d_ff=128, vocab_size=512, max_seq_len=256, tie_embeddings=True),
    "qwen3-tiny": dict(_QWEN3, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                       head_dim=16, d_ff=128, vocab_size=512, max_seq_len=256),
    "gemma2-tiny": dict(_GEMMA2, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                        head_dim=16, d_ff=128, vocab_size=512, max_seq_len=256, local_window=16),
    "gemma3-tiny": dict(_GEMMA3, num_layers=6, d_model=64, num_heads=4, num_kv_heads=2,
                        head_dim=16, d_ff=128, vocab_size=512, max_seq_len=256, local_window=16,
                        rope_scaling="linear", rope_factor=8.0),
    # A few-hundred-thousand-parameter Llama (GQA 4/2) for tests and CPU smoke runs; its
    # vocabulary covers the byte tokenizer.
    "llama-tiny": dict(_LLAMA, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                       d_ff=128, vocab_size=512, max_seq_len=256),
    # Mistral 7B v0.1: Llama's blocks (GQA 32/8) with every layer attending within a sliding
    # window of 4096 keys, so decoding keeps a cache of 4096 positions (a ring) at most.
    "mistral-7b": dict(_LLAMA, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
                       d_ff=14336, vocab_size=32000, max_seq_len=32768, local_window=4096,
                       local_every=1),
    # A tiny Mistral for tests and CPU runs: a window of 16 keys, shorter than its context.
    "mistral-tiny": dict(_LLAMA, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                         d_ff=128, vocab_size=512, max_seq_len=256, local_window=16,
                         local_every=1),
    # Mixtral 8x7B (46.7B parameters, 12.9B active): Llama's blocks (GQA 32/8) whose MLP is 8
    # SwiGLU experts, 2 per token; RoPE base 1e6, no sliding window; the hub config's router
    # aux-loss weight 0.02.
    "mixtral-8x7b": dict(_LLAMA, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
                         d_ff=14336, vocab_size=32000, max_seq_len=32768, rope_theta=1e6,
                         num_experts=8, experts_per_token=2, router_aux_loss=0.02),
    # A tiny Mixtral (4 experts, top-2) for tests and CPU runs.
    "mixtral-tiny": dict(_LLAMA, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                         d_ff=128, vocab_size=512, max_seq_len=256, num_experts=4,
                         experts_per_token=2, router_aux_loss=0.02),
    # BERT-base (110M), uncased WordPiece vocabulary.
    "bert": dict(_BERT, vocab_size=30522, type_vocab_size=2, pad_token_id=0, position_offset=0),
    # RoBERTa-base (125M): byte-level BPE, positions counted from pad_token_id + 1.
    "roberta": dict(_BERT, norm_eps=1e-5, vocab_size=50265, type_vocab_size=1, pad_token_id=1,
                    position_offset=2),
    # "Attention Is All You Need" base: post-LN, sinusoidal positions, shared embeddings scaled
    # by sqrt(d_model) (37K shared BPE vocabulary). Each stack ends in a LayerNorm, as in
    # torch.nn.Transformer, whose weights load into it (jaxlm.convert.torch_transformer).
    "transformer": dict(_SEQ2SEQ, norm="layernorm", norm_position="post", norm_eps=1e-5,
                        activation="relu", position="sinusoidal", use_bias=True,
                        embed_scale=True, num_layers=6, d_model=512, num_heads=8, d_ff=2048,
                        vocab_size=37000, max_seq_len=1024),
    # T5 v1.0 small (60M): pre-RMSNorm, no biases, unscaled attention with a relative position
    # bias, output rescaled by d_model**-0.5. v1.1: activation=gelu_tanh, gated_mlp=true,
    # tie_embeddings=false, scale_decoder_output=false.
    "t5": dict(_SEQ2SEQ, norm="rmsnorm", norm_position="pre", norm_eps=1e-6, activation="relu",
               position="none", use_bias=False, attention_scale=1.0, relative_buckets=32,
               relative_max_distance=128, scale_decoder_output=True, num_layers=6, d_model=512,
               num_heads=8, head_dim=64, d_ff=2048, vocab_size=32128, max_seq_len=512,
               pad_token_id=0),
    # BART-base (140M): post-LN, learned positions offset by 2, LayerNorm on the embeddings.
    "bart": dict(_SEQ2SEQ, norm="layernorm", norm_position="post", norm_eps=1e-5,
                 activation="gelu", position="learned", position_offset=2, use_bias=True,
                 embed_norm=True, final_norm=False, final_logits_bias=True, num_layers=6,
                 d_model=768, num_heads=12, d_ff=3072, vocab_size=50265, max_seq_len=1024,
                 pad_token_id=1),
    # Marian / opus-mt (74M): post-LN, swish, sinusoidal positions in Marian's split layout.
    "marian": dict(_SEQ2SEQ, norm="layernorm", norm_position="post", norm_eps=1e-5,
                   activation="silu", position="sinusoidal", sinusoidal_layout="split",
                   use_bias=True, embed_scale=True, final_norm=False, final_logits_bias=True,
                   num_layers=6, d_model=512, num_heads=8, d_ff=2048, vocab_size=58101,
                   max_seq_len=512, pad_token_id=58100),
}

