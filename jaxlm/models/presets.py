"""Named architectures: the `model.*` fields each preset sets before YAML and overrides apply."""

from __future__ import annotations

from typing import Any

_GPT2 = dict(family="decoder", norm="layernorm", norm_position="pre", norm_eps=1e-5,
             activation="gelu_tanh", gated_mlp=False, position="learned", use_bias=True,
             tie_embeddings=True)
_LLAMA = dict(family="decoder", norm="rmsnorm", norm_position="pre", norm_eps=1e-5,
              activation="silu", gated_mlp=True, position="rope", use_bias=False,
              tie_embeddings=False, rope_theta=10000.0)
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
    # A few-hundred-thousand-parameter Llama (GQA 4/2) for tests and CPU smoke runs; its
    # vocabulary covers the byte tokenizer.
    "llama-tiny": dict(_LLAMA, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                       d_ff=128, vocab_size=512, max_seq_len=256),
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

