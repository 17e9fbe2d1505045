"""One tokenizer interface over bytes, HF `tokenizers` JSON, GPT-2 BPE and SentencePiece.

`encode` gives a text's own ids; `encode_input` gives what a model reads for it, with the
tokenizer's own special-token rules (a tokenizer.json post-processor template, or
add_bos_token/add_eos_token), as HF's `tokenizer(text)["input_ids"]`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from jaxlm.config import ModelConfig

META_FILE = "jaxlm_tokenizer.json"
ROLES = ("pad", "bos", "eos", "mask", "unk")
# Token strings tried, in order, when a role's id is not given or configured.
COMMON_TOKENS: dict[str, tuple[str, ...]] = {
    "pad": ("<pad>", "[PAD]"),
    "bos": ("<s>", "[CLS]", "<|endoftext|>"),
    "eos": ("</s>", "[SEP]", "<|endoftext|>"),
    "mask": ("<mask>", "[MASK]"),
    "unk": ("<unk>", "[UNK]"),
}
# GPT-2's pre-tokenizer regex (also HF's ByteLevel default), for reference and tests.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LOOKED_FOR = ("jaxlm_tokenizer.json, tokenizer.json, vocab.txt, tokenizer.model, spiece.model, "
               "vocab.json+merges.txt")
# What HF's tokenizer classes put around a text when no tokenizer.json says (and
# tokenizer_config.json sets no add_bos_token/add_eos_token): (role before, role after).
_CLASS_SPECIALS: dict[str, tuple[str | None, str | None]] = {
    "BertTokenizer": ("cls", "sep"), "DistilBertTokenizer": ("cls", "sep"),
    "ElectraTokenizer": ("cls", "sep"), "RobertaTokenizer": ("bos", "eos"),
    "BartTokenizer": ("bos", "eos"), "LongformerTokenizer": ("bos", "eos"),
    "T5Tokenizer": (None, "eos"),
}


class TokenizerError(ValueError):
    """A tokenizer cannot be built or loaded."""


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None
    mask_id: int | None
    unk_id: int | None

    def encode(self, text: str) -> list[int]:
        """The text's own ids, no special tokens added."""
        ...

    def encode_input(self, text: str, *, whole: bool = False) -> list[int]:
        """What a model reads for `text`: with the tokenizer's own special-token rules, as
        HF's `tokenizer(text)["input_ids"]`; without rules, text + EOS for a `whole`
        sequence (seq2seq source or target), the bare text (BOS if empty) for a prompt."""
        ...

    def input_affixes(self, *, whole: bool = False) -> tuple[list[int], list[int]]:
        """The special ids `encode_input` puts before and after the text's ids."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


class _ModelInputs:
    """`encode_input` from `encode` and the tokenizer's own special-token rules."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _own_affixes(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text by the tokenizer's own rules; ([], []) if none."""
        return [], []

    def input_affixes(self, *, whole: bool = False) -> tuple[list[int], list[int]]:
        """The tokenizer's own rules when it has any; else jaxlm's: EOS closes a `whole`
        sequence, nothing around a prompt."""
        before, after = self._own_affixes()
        if before or after:
            return list(before), list(after)
        return [], [self.eos_id] if whole and self.eos_id is not None else []

    def encode_input(self, text: str, *, whole: bool = False) -> list[int]:
        """The ids a model reads for `text`. A tokenizer with special-token rules of its own
        (a tokenizer.json post-processor template such as BART's `<s> $A </s>`, T5's
        `$A </s>` or Llama's `<s> $A`; add_bos_token/add_eos_token) applies them, as HF's
        `tokenizer(text)["input_ids"]`. One without (bytes, jaxlm's BPE, GPT-2) follows jaxlm's:
        a `whole` sequence (an encoder-decoder source or target) is the text + EOS, a prompt
        to continue (`whole=False`) the bare text. An empty prompt is BOS alone."""
        before, after = self.input_affixes(whole=whole)
        ids = before + self.encode(text) + after
        if not ids and not whole and self.bos_id is not None:
            return [self.bos_id]
        return ids


def decoder_start_id(model_cfg: ModelConfig, tokenizer: Tokenizer | None) -> int:
    """The encoder-decoder's first decoder input: `model.decoder_start_id` when set (>= 0;
    HF conversions set the checkpoint's), else the tokenizer's BOS, else PAD, else 0."""
    if model_cfg.decoder_start_id >= 0:
        return model_cfg.decoder_start_id
    for i in (tokenizer.bos_id, tokenizer.pad_id) if tokenizer is not None else ():
        if i is not None:
            return i
    return 0


def _processor_affixes(processor: dict[str, Any] | None) -> tuple[list[int], list[int]]:
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
            b, a = _processor_affixes(p)
            before, after = b + before, after + a
        return before, after
    return [], []  # ByteLevel (offsets only), or none


def _write_meta(directory: Path, kind: str, tok: Tokenizer, **extra: Any) -> None:
    meta = {"kind": kind, "vocab_size": tok.vocab_size, **extra}
    meta.update({f"{r}_id": getattr(tok, f"{r}_id") for r in ROLES})
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class ByteTokenizer(_ModelInputs):
    """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258, mask=259."""

    vocab_size = 260
    pad_id, bos_id, eos_id, mask_id, unk_id = 256, 257, 258, 259, None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in map(int, ids) if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_meta(directory, "byte", self)


class HFTokenizer(_ModelInputs):
    """A `tokenizers.Tokenizer`; ids of a role left as `...` are found from common token strings.
    Its post-processor (kept in tokenizer.json) holds its special-token rules.

    `split_special_tokens=True` encodes special-token strings found in text as plain text (the
    transformers option of that name); by default they become their special ids, as in HF.
    """

    vocab_size: int
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None
    mask_id: int | None
    unk_id: int | None

    def __init__(self, tokenizer: Any, *, pad_id: int | None | EllipsisType = ...,
                 bos_id: int | None | EllipsisType = ..., eos_id: int | None | EllipsisType = ...,
                 mask_id: int | None | EllipsisType = ..., unk_id: int | None | EllipsisType = ...,
                 split_special_tokens: bool = False):
        # Some shipped tokenizer.json files (e.g. sentence-transformers) pad/truncate to 128.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # Not kept in tokenizer.json, so save() records it in jaxlm_tokenizer.json.
        tokenizer.encode_special_tokens = split_special_tokens
        self.split_special_tokens = split_special_tokens
        self.tokenizer = tokenizer
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        given = dict(pad=pad_id, bos=bos_id, eos=eos_id, mask=mask_id, unk=unk_id)
        for role, value in given.items():
            if value is ...:
                value = _find_id(tokenizer, COMMON_TOKENS[role])
            setattr(self, f"{role}_id", value)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        return cls(_Tok.from_file(str(path)), **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _own_affixes(self) -> tuple[list[int], list[int]]:
        processor = self.tokenizer.post_processor
        return _processor_affixes(json.loads(processor.__getstate__()) if processor else None)

    def decode(self, ids: Sequence[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}
        # int() first: numpy/JAX scalars may not hash like ints.
        return self.tokenizer.decode([i for i in map(int, ids) if i not in skip],
                                     skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        _write_meta(directory, "hf", self, split_special_tokens=self.split_special_tokens)


class SentencePieceTokenizer(_ModelInputs):
    """A SentencePiece model, given as the bytes of its `.model` file. `add_bos`/`add_eos`:
    its special-token rules (tokenizer_config.json's add_bos_token/add_eos_token)."""

    def __init__(self, model_proto: bytes, *, mask_id: int | None | EllipsisType = ...,
                 add_bos: bool = False, add_eos: bool = False):
        import sentencepiece as spm

        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.model_proto = bytes(model_proto)
        self.processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
        sp = self.processor
        self.vocab_size = sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            i if i >= 0 else None for i in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()))
        if mask_id is ...:
            # piece_to_id answers unk for unknown pieces, so check the round trip.
            found = (sp.piece_to_id(p) for p in COMMON_TOKENS["mask"])
            mask_id = next((i for i in found if sp.id_to_piece(i) in COMMON_TOKENS["mask"]), None)
        self.mask_id = mask_id

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes(), **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def _own_affixes(self) -> tuple[list[int], list[int]]:
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else [],
                [self.eos_id] if self.add_eos and self.eos_id is not None else [])

    def decode(self, ids: Sequence[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}
        return self.processor.decode([i for i in map(int, ids) if i not in skip])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self.model_proto)
        _write_meta(directory, "sentencepiece", self, add_bos_token=self.add_bos,
                    add_eos_token=self.add_eos)


def _find_id(tokenizer: Any, candidates: Iterable[str]) -> int | None:
    for token in candidates:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> HFTokenizer:
    """Trains a byte-level BPE: <pad>=0, <s>=1, </s>=2, <mask>=3, no unk; encode() never emits
    them, so any text (even one holding "<s>") round-trips."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=["<pad>", "<s>", "</s>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, unk_id=None, split_special_tokens=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def gpt2_from_tiktoken(path: str | Path) -> HFTokenizer:
    """The GPT-2 BPE (50,257 ids, <|endoftext|>=50256) from a `gpt2.tiktoken` ranks file."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; listing every
    # split of every token, ordered by the token's rank, makes HF's merge-list BPE do the same.
    merges = []
    for token, rank in ranks.items():
        splits = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                  for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        merges += [(rank, *s) for s in sorted(splits)]
    merges.sort()
    b2u = _bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)
    model = models.BPE({enc(t): r for t, r in ranks.items()},
                       [(enc(a), enc(b)) for *_, a, b in merges])
    tok = _Tok(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    eot = tok.token_to_id("<|endoftext|>")
    return HFTokenizer(tok, pad_id=None, bos_id=eot, eos_id=eot, mask_id=None, unk_id=None)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _config_tokens(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json, role -> token as configured: a str or an AddedToken-like dict)."""
    config = _read_json(directory / "tokenizer_config.json")
    merged = {**config, **_read_json(directory / "special_tokens_map.json")}
    roles = {}
    for role, alt in [("pad", None), ("bos", "cls"), ("eos", "sep"), ("mask", None), ("unk", None)]:
        value = merged.get(f"{role}_token") or (alt and merged.get(f"{alt}_token"))
        if value:
            roles[role] = value
    for extra in ("cls", "sep"):  # registered as specials even when bos/eos are set
        if merged.get(f"{extra}_token"):
            roles[extra] = merged[f"{extra}_token"]
    return config, roles


def _content(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def _add_specials(tok: Any, roles: dict[str, Any], fallback: Iterable[str] = ()) -> None:
    from tokenizers import AddedToken

    values = list(roles.values()) + [t for t in fallback if tok.token_to_id(t) is not None]
    tok.add_special_tokens([
        AddedToken(_content(v), special=True, normalized=False,
                   **({k: v[k] for k in ("lstrip", "rstrip", "single_word") if k in v}
                      if isinstance(v, dict) else {}))
        for v in values])


def _config_specials(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """The roles whose tokens HF's tokenizer classes put before and after a text when there
    is no tokenizer.json to say: add_bos_token/add_eos_token of tokenizer_config.json, else
    the class's own (BERT: [CLS] text [SEP], RoBERTa/BART: <s> text </s>, T5: text </s>)."""
    if "add_bos_token" in config or "add_eos_token" in config:
        return ("bos" if config.get("add_bos_token") else None,
                "eos" if config.get("add_eos_token") else None)
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    return _CLASS_SPECIALS.get(name, (None, None))


def _set_template(tok: Any, config: dict[str, Any], roles: dict[str, Any]) -> None:
    """Gives a `tokenizers.Tokenizer` built from vocabulary files the post-processor HF's
    class would use (see `_config_specials`), so that save() keeps it in tokenizer.json."""
    from tokenizers import processors

    sides: list[list[str]] = [[], []]  # tokens before, after the text
    specials = {}
    for side, role in zip(sides, _config_specials(config), strict=True):
        if role is None:
            continue
        common = {"cls": "bos", "sep": "eos"}.get(role, role)
        # As configured, else the class's default token (HF's [CLS], <s>, ...) if present.
        value = roles.get(role) or roles.get(common) or next(
            (t for t in COMMON_TOKENS[common] if tok.token_to_id(t) is not None), None)
        if value and (i := tok.token_to_id(_content(value))) is not None:
            side.append(_content(value))
            specials[_content(value)] = i
    if specials:
        before, after = sides
        tok.post_processor = processors.TemplateProcessing(
            single=[*before, "$A", *after],
            pair=[*before, "$A", *after, "$B:1", *(f"{t}:1" for t in after)],
            special_tokens=list(specials.items()))


def _hf_with_roles(tok: Any, roles: dict[str, Any]) -> HFTokenizer:
    ids = {f"{r}_id": tok.token_to_id(_content(roles[r])) for r in ROLES if r in roles}
    return HFTokenizer(tok, **ids)


def _wordpiece(directory: Path, config: dict[str, Any], roles: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    unk = _content(roles.get("unk", "[UNK]"))
    tok = _Tok(models.WordPiece.from_file(str(directory / "vocab.txt"), unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    _add_specials(tok, roles, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    _set_template(tok, config, roles)
    return tok


def _byte_level_bpe(directory: Path, config: dict[str, Any], roles: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers

    model = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tok = _Tok(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    _add_specials(tok, roles, [t for ts in COMMON_TOKENS.values() for t in ts])
    _set_template(tok, config, roles)
    return tok


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Loads what `save()` wrote, or a plain HF model directory's tokenizer files."""
    from tokenizers import Tokenizer as _Tok

    d = Path(directory)
    meta = _read_json(d / META_FILE) if d.is_dir() else {}
    if meta:
        ids = {f"{r}_id": meta.get(f"{r}_id") for r in ROLES}
        if meta.get("kind") == "byte":
            return ByteTokenizer()
        if meta.get("kind") == "hf":
            split = bool(meta.get("split_special_tokens", False))
            return HFTokenizer.from_file(d / "tokenizer.json", split_special_tokens=split, **ids)
        if meta.get("kind") == "sentencepiece":
            return SentencePieceTokenizer.from_file(
                d / "tokenizer.model", mask_id=ids["mask_id"],
                add_bos=bool(meta.get("add_bos_token")), add_eos=bool(meta.get("add_eos_token")))
        raise TokenizerError(f"{d / META_FILE}: unknown tokenizer kind {meta.get('kind')!r}")
    config, roles = _config_tokens(d)
    if (d / "tokenizer.json").is_file():
        # Its post-processor holds the special-token rules: transformers 5 ignores
        # add_bos_token/add_eos_token beside a tokenizer.json (the Hub's files agree).
        return _hf_with_roles(_Tok.from_file(str(d / "tokenizer.json")), roles)
    if (d / "vocab.txt").is_file():
        return _hf_with_roles(_wordpiece(d, config, roles), roles)
    for name in ("tokenizer.model", "spiece.model"):
        if (d / name).is_file():
            before, after = _config_specials(config)
            return SentencePieceTokenizer.from_file(d / name, add_bos=before is not None,
                                                    add_eos=after is not None)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return _hf_with_roles(_byte_level_bpe(d, config, roles), roles)
    raise TokenizerError(f"no tokenizer in {d}: looked for {_LOOKED_FOR}")


def from_name(spec: str, texts: Iterable[str] | None = None,
              vocab_size: int | None = None) -> Tokenizer:
    """'byte', 'bpe' (trained on `texts`), a tokenizer directory or a `*.tiktoken` GPT-2 file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if texts is None or not vocab_size:
            raise TokenizerError("tokenizer 'bpe' needs texts and vocab_size to train on")
        return train_bpe(texts, vocab_size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_tokenizer(path)
    if path.is_file() and path.suffix == ".tiktoken":
        return gpt2_from_tiktoken(path)
    raise TokenizerError(f"unknown tokenizer {spec!r}: expected 'byte', 'bpe', a tokenizer "
                         "directory or a .tiktoken file")
