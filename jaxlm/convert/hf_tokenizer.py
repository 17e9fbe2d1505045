"""A jaxlm tokenizer written so that HF's `AutoTokenizer` loads it as it is, with the same
ids: tokenizer.json (a byte tokenizer becomes a byte-level BPE without merges: byte b is
id b, the four specials follow), tokenizer_config.json (the class, the special tokens,
the chat template) and special_tokens_map.json. The jaxlm files stay beside them, so
`jaxlm.load` of the export reads the very same tokenizer back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxlm.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    bytes_to_unicode,
)


def byte_level_json(tok: ByteTokenizer) -> Any:
    """A `tokenizers.Tokenizer` giving ByteTokenizer's ids: each UTF-8 byte its own token
    (GPT-2's byte-to-character map, no merges), then <pad> <s> </s> <mask>."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    hf = _Tok(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    specials = [tok.SPECIAL_TOKENS[i] for i in sorted(tok.SPECIAL_TOKENS)]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return hf


def _hf_object(tokenizer: Tokenizer) -> tuple[Any, bool] | None:
    """(the `tokenizers.Tokenizer`, whether special-token text stays text), if HF can hold
    it as a tokenizer.json."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_level_json(tokenizer), True  # bytes never read "<s>" as a special
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer, tokenizer.split_special_tokens
    return None  # SentencePiece: its tokenizer.model, which HF reads through its own class


def save_for_hf(tokenizer: Tokenizer, out: str | Path) -> None:
    """Writes the tokenizer's jaxlm files plus what AutoTokenizer reads (see the module)."""
    out = Path(out)
    tokenizer.save(out)
    found = _hf_object(tokenizer)
    if found is None:
        return
    hf, split = found
    hf.save(str(out / "tokenizer.json"))
    tokens = tokenizer.special_tokens_map()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
              # The text a token decodes to, spaces and all (jaxlm's decode does no cleanup).
              "clean_up_tokenization_spaces": False, "split_special_tokens": split}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
