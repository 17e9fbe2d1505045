"""What HF tokenizer files say about special tokens, and tokenizers built from vocabulary
files: the tokens tokenizer_config.json / special_tokens_map.json declare, the rules HF's
tokenizer classes follow where no tokenizer.json says (add_bos_token/add_eos_token, BERT's
[CLS] ... [SEP]), a post-processor's affixes, WordPiece and byte-level BPE from vocab files.
A leaf: jaxlm.data.tokenizers builds its classes on it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Token strings tried, in order, when a role's id is not given or configured.
COMMON_TOKENS: dict[str, tuple[str, ...]] = {
    "pad": ("<pad>", "[PAD]"),
    "bos": ("<s>", "[CLS]", "<|endoftext|>"),
    "eos": ("</s>", "[SEP]", "<|endoftext|>"),
    "mask": ("<mask>", "[MASK]"),
    "unk": ("<unk>", "[UNK]"),
}


# What HF's tokenizer classes put around a text when no tokenizer.json says (and
# tokenizer_config.json sets no add_bos_token/add_eos_token): (role before, role after).
CLASS_SPECIALS: dict[str, tuple[str | None, str | None]] = {
    "BertTokenizer": ("cls", "sep"), "DistilBertTokenizer": ("cls", "sep"),
    "ElectraTokenizer": ("cls", "sep"), "RobertaTokenizer": ("bos", "eos"),
    "BartTokenizer": ("bos", "eos"), "LongformerTokenizer": ("bos", "eos"),
    "T5Tokenizer": (None, "eos"),
}


def processor_affixes(processor: dict[str, Any] | None) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the text that a `tokenizers` post-processor (as JSON) adds to
    a single sequence."""
    kind = (processor or {}).get("type")
    if kind == "TemplateProcessing":
        specials = processor.get("special_tokens", {})
        before: list[int] = []
        after: list[int] = []
        seen_text = False
        for piece in processor["single"]:
            if "Sequence" in piece:
                seen_text = True
            else:
                ids = specials[piece["SpecialToken"]["id"]]["ids"]
                (after if seen_text else before).extend(ids)
        return before, after
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [processor["cls"][1]], [processor["sep"][1]]
    if kind == "Sequence":  # each wraps what the one before it made
        before, after = [], []
        for p in processor["processors"]:
            b, a = processor_affixes(p)
            before, after = b + before, after + a
        return before, after
    return [], []  # ByteLevel (offsets only), or none


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def config_tokens(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json, role -> token as configured: a str or an AddedToken-like dict)."""
    config = read_json(directory / "tokenizer_config.json")
    merged = {**config, **read_json(directory / "special_tokens_map.json")}
    roles = {}
    for role, alt in [("pad", None), ("bos", "cls"), ("eos", "sep"), ("mask", None), ("unk", None)]:
        value = merged.get(f"{role}_token") or (alt and merged.get(f"{alt}_token"))
        if value:
            roles[role] = value
    for extra in ("cls", "sep"):  # registered as specials even when bos/eos are set
        if merged.get(f"{extra}_token"):
            roles[extra] = merged[f"{extra}_token"]
    return config, roles


def content(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def add_specials(tok: Any, roles: dict[str, Any], fallback: Iterable[str] = ()) -> None:
    from tokenizers import AddedToken

    values = list(roles.values()) + [t for t in fallback if tok.token_to_id(t) is not None]
    tok.add_special_tokens([
        AddedToken(content(v), special=True, normalized=False,
                   **({k: v[k] for k in ("lstrip", "rstrip", "single_word") if k in v}
                      if isinstance(v, dict) else {}))
        for v in values])


def config_specials(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """The roles whose tokens HF's tokenizer classes put before and after a text when there
    is no tokenizer.json to say: add_bos_token/add_eos_token of tokenizer_config.json, else
    the class's own (BERT: [CLS] text [SEP], RoBERTa/BART: <s> text </s>, T5: text </s>)."""
    if "add_bos_token" in config or "add_eos_token" in config:
        return ("bos" if config.get("add_bos_token") else None,
                "eos" if config.get("add_eos_token") else None)
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    return CLASS_SPECIALS.get(name, (None, None))


def set_template(tok: Any, config: dict[str, Any], roles: dict[str, Any]) -> None:
    """Gives a `tokenizers.Tokenizer` built from vocabulary files the post-processor HF's
    class would use (see `config_specials`), so that save() keeps it in tokenizer.json."""
    from tokenizers import processors

    sides: list[list[str]] = [[], []]  # tokens before, after the text
    specials = {}
    for side, role in zip(sides, config_specials(config), strict=True):
        if role is None:
            continue
        common = {"cls": "bos", "sep": "eos"}.get(role, role)
        # As configured, else the class's default token (HF's [CLS], <s>, ...) if present.
        value = roles.get(role) or roles.get(common) or next(
            (t for t in COMMON_TOKENS[common] if tok.token_to_id(t) is not None), None)
        if value and (i := tok.token_to_id(content(value))) is not None:
            side.append(content(value))
            specials[content(value)] = i
    if specials:
        before, after = sides
        tok.post_processor = processors.TemplateProcessing(
            single=[*before, "$A", *after],
            pair=[*before, "$A", *after, "$B:1", *(f"{t}:1" for t in after)],
            special_tokens=list(specials.items()))


def wordpiece(directory: Path, config: dict[str, Any], roles: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    unk = content(roles.get("unk", "[UNK]"))
    tok = _Tok(models.WordPiece.from_file(str(directory / "vocab.txt"), unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    add_specials(tok, roles, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    set_template(tok, config, roles)
    return tok


def byte_level_bpe(directory: Path, config: dict[str, Any], roles: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers

    model = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tok = _Tok(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    add_specials(tok, roles, [t for ts in COMMON_TOKENS.values() for t in ts])
    set_template(tok, config, roles)
    return tok


# HF's special-token attributes, as tokenizer_config.json / special_tokens_map.json name them.
HF_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
