"""One tokenizer interface over bytes, HF `tokenizers` JSON, GPT-2 BPE and SentencePiece.

`encode(text, add_special_tokens=True)` gives a text's ids as HF's `tokenizer.encode` does
(by default within the tokenizer's own special-token rules: a tokenizer.json post-processor
template, or add_bos_token/add_eos_token); `encode_input` gives what a model reads for it,
those rules or jaxlm's where the tokenizer has none. `apply_chat_template` renders
tokenizer_config.json's chat template as HF does (jaxlm.data.chat_template)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from jaxlm.data.tokenizer_files import (
    COMMON_TOKENS,
    HF_TOKEN_KEYS,
    byte_level_bpe,
    config_specials,
    config_tokens,
    content,
    processor_affixes,
    read_json,
    wordpiece,
)

if TYPE_CHECKING:
    from jaxlm.config import ModelConfig

META_FILE = "jaxlm_tokenizer.json"
ROLES = ("pad", "bos", "eos", "mask", "unk")
# GPT-2's pre-tokenizer regex (also HF's ByteLevel default), for reference and tests.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LOOKED_FOR = ("jaxlm_tokenizer.json, tokenizer.json, vocab.txt, tokenizer.model, spiece.model, "
               "vocab.json+merges.txt")


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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's ids, as HF's `tokenizer.encode(text, add_special_tokens=...)`: by
        default within the tokenizer's own special tokens (its template: Llama's BOS,
        BERT's [CLS] ... [SEP]; none for bytes, jaxlm's BPE or GPT-2), else the bare ids."""
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

    def special_tokens_map(self) -> dict[str, str]:
        """HF's `special_tokens_map`: {'bos_token': '<s>', ...}."""
        ...

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs: Any) -> list[int] | str:
        """The conversation through the tokenizer's chat template, as HF's."""
        ...


class _ModelInputs:
    """`encode_input` from `encode` and the tokenizer's own special-token rules; chat
    templates."""

    bos_id: int | None
    eos_id: int | None
    chat_template: str | None = None  # Jinja, as tokenizer_config.json ships it
    declared_tokens: dict[str, str] | None = None  # {'bos_token': ...} as its files say

    def id_to_token(self, i: int) -> str | None:
        raise NotImplementedError

    def special_tokens_map(self) -> dict[str, str]:
        """HF's `special_tokens_map`: the tokens the tokenizer's files declare, else those of
        its role ids ({'bos_token': '<s>', 'eos_token': '</s>', ...})."""
        if self.declared_tokens is not None:
            return dict(self.declared_tokens)
        found = {f"{r}_token": self.id_to_token(i) for r in ROLES
                 if (i := getattr(self, f"{r}_id")) is not None}
        return {k: v for k, v in found.items() if v is not None}

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs: Any) -> list[int] | str:
        """`messages` ([{'role': ..., 'content': ...}]) rendered by the chat template as HF's
        `apply_chat_template` does (extra keyword arguments, e.g. tools, reach the
        template); the text, or with `tokenize` its ids (HF returns those as input_ids), no
        special tokens added beyond what the template writes (which are their ids even
        where encode() keeps such strings as text, as the byte tokenizer does)."""
        from jaxlm.data import chat_template

        try:
            text = chat_template.render(self.chat_template, messages,
                                        special_tokens=self.special_tokens_map(),
                                        add_generation_prompt=add_generation_prompt, **kwargs)
        except chat_template.ChatTemplateError as e:
            raise TokenizerError(str(e)) from None
        if not tokenize:
            return text
        from jaxlm.data.chat import encode_rendered  # the ids chat SFT trains on

        return encode_rendered(self, text)

    def _encode(self, text: str) -> list[int]:
        """The text's own ids, no special tokens."""
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode(text)
        if not add_special_tokens:
            return ids
        before, after = self._own_affixes()
        return [*before, *ids, *after]

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
        ids = before + self._encode(text) + after
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


def _write_meta(directory: Path, kind: str, tok: Tokenizer, **extra: Any) -> None:
    from jaxlm.data.chat_template import TEMPLATE_FILE

    meta = {"kind": kind, "vocab_size": tok.vocab_size, **extra}
    meta.update({f"{r}_id": getattr(tok, f"{r}_id") for r in ROLES})
    if tok.declared_tokens is not None:
        meta["special_tokens"] = tok.declared_tokens
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tok.chat_template is not None:
        (directory / TEMPLATE_FILE).write_text(tok.chat_template, encoding="utf-8")


class ByteTokenizer(_ModelInputs):
    """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258, mask=259."""

    vocab_size = 260
    pad_id, bos_id, eos_id, mask_id, unk_id = 256, 257, 258, 259, None
    # How the special ids are written as text (chat templates, the HF export).
    SPECIAL_TOKENS = {256: "<pad>", 257: "<s>", 258: "</s>", 259: "<mask>"}

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def id_to_token(self, i: int) -> str | None:
        return self.SPECIAL_TOKENS.get(i)

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

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def _own_affixes(self) -> tuple[list[int], list[int]]:
        processor = self.tokenizer.post_processor
        return processor_affixes(json.loads(processor.__getstate__()) if processor else None)

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

    def _encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def id_to_token(self, i: int) -> str | None:
        return self.processor.id_to_piece(i) if 0 <= i < self.vocab_size else None

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def gpt2_from_tiktoken(path: str | Path) -> HFTokenizer:
    """The GPT-2 BPE (50,257 ids, <|endoftext|>=50256) from a `gpt2.tiktoken` ranks file."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    from jaxlm.data.paths import as_path

    ranks: dict[bytes, int] = {}
    for line in as_path(path).read_bytes().splitlines():
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
    b2u = bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)
    model = models.BPE({enc(t): r for t, r in ranks.items()},
                       [(enc(a), enc(b)) for *_, a, b in merges])
    tok = _Tok(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    eot = tok.token_to_id("<|endoftext|>")
    return HFTokenizer(tok, pad_id=None, bos_id=eot, eos_id=eot, mask_id=None, unk_id=None)


def _hf_with_roles(tok: Any, roles: dict[str, Any]) -> HFTokenizer:
    ids = {f"{r}_id": tok.token_to_id(content(roles[r])) for r in ROLES if r in roles}
    return HFTokenizer(tok, **ids)


def has_tokenizer(directory: str | Path) -> bool:
    """Whether `directory` (local or remote) holds files `load_tokenizer` reads."""
    from jaxlm.data.paths import as_path

    d = as_path(directory)
    singles = (META_FILE, "tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model")
    return d.is_dir() and (any((d / f).is_file() for f in singles)
                           or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Loads what `save()` wrote, or a plain HF model directory's tokenizer files, with the
    chat template and special tokens its files declare; a remote folder through a local copy
    (the tokenizer libraries read local files)."""
    from jaxlm.data import chat_template
    from jaxlm.data.paths import is_remote, local_copy

    if is_remote(directory):
        with local_copy(directory) as local:
            return load_tokenizer(local)
    d = Path(directory)
    tok = _load(d)
    meta = read_json(d / META_FILE) if d.is_dir() else {}
    config = read_json(d / "tokenizer_config.json")
    tok.chat_template = chat_template.read(d, config)
    if meta.get("special_tokens"):
        tok.declared_tokens = dict(meta["special_tokens"])
    elif not meta:
        merged = {**config, **read_json(d / "special_tokens_map.json")}
        declared = {k: content(merged[k]) for k in HF_TOKEN_KEYS if merged.get(k)}
        tok.declared_tokens = declared or None
    return tok


def _load(d: Path) -> Tokenizer:
    from tokenizers import Tokenizer as _Tok

    meta = read_json(d / META_FILE) if d.is_dir() else {}
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
    config, roles = config_tokens(d)
    if (d / "tokenizer.json").is_file():
        # Its post-processor holds the special-token rules: transformers 5 ignores
        # add_bos_token/add_eos_token beside a tokenizer.json (the Hub's files agree).
        return _hf_with_roles(_Tok.from_file(str(d / "tokenizer.json")), roles)
    if (d / "vocab.txt").is_file():
        return _hf_with_roles(wordpiece(d, config, roles), roles)
    for name in ("tokenizer.model", "spiece.model"):
        if (d / name).is_file():
            before, after = config_specials(config)
            return SentencePieceTokenizer.from_file(d / name, add_bos=before is not None,
                                                    add_eos=after is not None)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return _hf_with_roles(byte_level_bpe(d, config, roles), roles)
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
    from jaxlm.data.paths import as_path

    path = as_path(spec)
    if path.is_dir():
        return load_tokenizer(path)
    if path.is_file() and path.suffix == ".tiktoken":
        return gpt2_from_tiktoken(path)
    raise TokenizerError(f"unknown tokenizer {spec!r}: expected 'byte', 'bpe', a tokenizer "
                         "directory or a .tiktoken file")
