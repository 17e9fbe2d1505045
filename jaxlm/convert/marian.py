"""HF MarianMTModel (opus-mt) <-> jaxlm `marian` preset: BART's layer layout, fixed sinusoidal
positions in Marian's split layout (not stored), no embedding LayerNorm. Only the shared
source/target vocabulary (share_encoder_decoder_embeddings=true) is supported."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, bart


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("share_encoder_decoder_embeddings", True) is False:
        raise ConversionError("marian: separate source and target vocabularies "
                              "(share_encoder_decoder_embeddings=false) are not supported")
    dec_vocab = hf.get("decoder_vocab_size")
    if dec_vocab not in (None, hf["vocab_size"]):
        raise ConversionError(f"marian: decoder_vocab_size={dec_vocab} differs from "
                              f"vocab_size={hf['vocab_size']}; jaxlm needs them equal")
    # HF MarianConfig's default decoder start is its pad id (58100).
    return bart.common_config(hf, "marian", hf.get("pad_token_id", 58100))


def _check(cfg: ModelConfig) -> None:
    bart.check(cfg, "marian", position="sinusoidal", sinusoidal_layout="split",
               embed_norm=False)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    return bart.common_params(tensors, cfg)


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check(cfg)
    return bart.common_to_hf(params, cfg)


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    return dict(bart.common_hf_config(cfg, "marian", "MarianMTModel"),
                decoder_vocab_size=cfg.vocab_size, share_encoder_decoder_embeddings=True)
