"""From a config to the tokenizer and the train/validation batch sources the loop consumes.

`data.format` says what the files hold (resolved in config: a prepared corpus's own kind, or
text for data.files); nothing here guesses it from their contents."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import jax

from jaxlm.config import Config, ConfigError
from jaxlm.data import chat, corpus, pipeline, preference
from jaxlm.data.batch import LMBatch
from jaxlm.data.packing import PackedRows
from jaxlm.data.pipeline import BatchSource, DataError
from jaxlm.data.store import TokenStore, store_root
from jaxlm.data.tokenizers import Tokenizer, decoder_start_id, from_name, load_tokenizer
from jaxlm.families import registry

T = TypeVar("T")

PAIR_FORMATS = ("pairs", "prompt_answer")


@dataclass
class TrainData:
    tokenizer: Tokenizer
    train: BatchSource
    valid: BatchSource
    bytes_per_token: float  # of the validation text, for bits per byte
    description: str


def _is_pair_corpus(name: str) -> bool:
    """Whether `jaxlm prepare NAME` makes (source, target) JSON lines (bible-mt-en-fr...)."""
    from jaxlm.data.prepare import CORPORA

    return name in CORPORA and CORPORA[name].suffix == ".jsonl"


def uses_pairs(cfg: Config) -> bool:
    """Whether the run trains on (source, target) pairs (data.format pairs/prompt_answer)."""
    return cfg.data.format in PAIR_FORMATS


def pair_files(cfg: Config) -> tuple[list[str], list[str]]:
    """The train and validation .jsonl files of a pair run: data.files / data.valid_files,
    else the prepared corpus's train and valid splits."""
    if cfg.data.files:
        files = pipeline.expand_files(cfg.data.files)
        valid = pipeline.expand_files(cfg.data.valid_files) if cfg.data.valid_files else []
        for f in files + valid:
            if not f.endswith((".jsonl", ".json")):
                raise DataError(f"data.format={cfg.data.format} reads (source, target) JSON "
                                f"lines, but '{f}' is not a .jsonl file; set data.format=text "
                                "for plain text")
        return files, valid
    from jaxlm.data.prepare import prepare

    corpus = prepare(cfg.data.name, progress=False)
    return [str(corpus.train)], [str(corpus.valid)]


def _tokenizer(cfg: Config, run_dir: Path, texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The run's saved tokenizer, else data.tokenizer (`texts()`: what a BPE trains on)."""
    saved = run_dir / "tokenizer"
    spec = cfg.data.tokenizer
    tok = load_tokenizer(saved) if saved.exists() else from_name(
        spec, texts=texts() if spec == "bpe" else None, vocab_size=cfg.data.bpe_vocab_size)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but "
                          f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    if registry.of(cfg.model).needs_mask_token and tok.mask_id is None:
        raise ConfigError(f"the {cfg.model.family} family's objective needs a tokenizer with a "
                          f"mask token; data.tokenizer='{cfg.data.tokenizer}' has none")
    return tok


def hold_out_last(items: list[T], fraction: float, what: str) -> tuple[list[T], list[T]]:
    """(items but the last `fraction` of them (at least one), those held out); DataError
    when nothing would be left to train on."""
    n = max(1, int(len(items) * fraction))
    if n >= len(items):
        raise DataError(f"{len(items)} {what}(s) cannot be split into train and validation; "
                        f"add {what}s or set data.valid_files")
    return items[:-n], items[-n:]


def build(cfg: Config, run_dir: Path, progress: bool = True) -> TrainData:
    if cfg.data.format == "preference":  # DPO pairs (jaxlm.data.preference)
        return _preference_data(cfg, run_dir)
    if uses_chat(cfg):
        return _chat_data(cfg, run_dir)
    if uses_pairs(cfg):
        return _pair_data(cfg, run_dir)
    return _text_data(cfg, run_dir, progress)


def _pair_data(cfg: Config, run_dir: Path) -> TrainData:
    t, d = cfg.train, cfg.data
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_files, valid_files = pair_files(cfg)
    train_pairs = pipeline.read_pairs(train_files, d.source_field, d.target_field)
    if valid_files:
        valid_pairs = pipeline.read_pairs(valid_files, d.source_field, d.target_field)
    else:
        train_pairs, valid_pairs = hold_out_last(train_pairs, d.valid_fraction, "pair")
    tok = _tokenizer(cfg, run_dir, lambda: [x for p in train_pairs for x in p])
    valid_bytes = sum(len(b.encode("utf-8")) for _, b in valid_pairs)
    description = f"pairs: train={len(train_pairs):,} valid={len(valid_pairs):,}"
    if d.format == "prompt_answer":  # decoder-only: prompt -> answer rows, loss on the answer
        train_rows = LMBatch(**pipeline.prompted_rows(train_pairs, tok, t.seq_len))
        valid_rows = LMBatch(**pipeline.prompted_rows(valid_pairs, tok, t.seq_len))
        return TrainData(tok, pipeline.RowBatches(train_rows, t.batch_size, seed=cfg.seed,
                                                  **proc),
                         pipeline.RowBatches(valid_rows, t.batch_size, shuffle=False, **proc),
                         valid_bytes / max(float(valid_rows.loss_mask.sum()), 1.0),
                         description)
    sid = decoder_start_id(cfg.model, tok)
    train = pipeline.PairBatches.from_pairs(train_pairs, tok, t.seq_len, t.batch_size, sid,
                                            seed=cfg.seed, **proc)
    valid = pipeline.PairBatches.from_pairs(valid_pairs, tok, t.seq_len, t.batch_size, sid,
                                            shuffle=False, **proc)
    bpt = valid_bytes / max(float(valid.tgt_mask.sum()), 1.0)
    return TrainData(tok, train, valid, bpt, description)


def uses_chat(cfg: Config) -> bool:
    """Whether the run trains on conversations (data.format chat)."""
    return cfg.data.format == "chat"


def chat_files(cfg: Config) -> tuple[list[str], list[str]]:
    """The train and held-out chat JSON lines of a chat run: data.files / data.valid_files,
    else data.name=chat-tasks (made on first use)."""
    from jaxlm.data import chat_tasks

    d = cfg.data
    if d.hf_path or d.streaming or d.pack:
        raise DataError("data.format=chat reads chat JSON lines of data.files (always packed);"
                        " remove data.hf_path, data.streaming and data.pack")
    if d.files:
        files = pipeline.expand_files(d.files)
        valid = pipeline.expand_files(d.valid_files) if d.valid_files else []
        for f in files + valid:
            if not f.endswith((".jsonl", ".json")):
                raise DataError(f"data.format=chat reads chat JSON lines, but '{f}' is not a "
                                ".jsonl file")
        return files, valid
    if d.name != chat_tasks.NAME:
        raise DataError(f"data.format=chat reads chat JSON lines: set data.files, or "
                        f"data.name={chat_tasks.NAME} (data.name={d.name} is not a chat corpus)")
    made = chat_tasks.ensure()
    return [str(made.train)], [str(made.heldout)]


def chat_splits(cfg: Config) -> tuple[list, list]:
    """(train, held-out) conversations: the held-out files, else the last
    data.valid_fraction of the training files'."""
    train_files, valid_files = chat_files(cfg)
    train = chat.read_chats(train_files)
    if valid_files:
        return train, chat.read_chats(valid_files)
    return hold_out_last(train, cfg.data.valid_fraction, "conversation")


def _chat_data(cfg: Config, run_dir: Path) -> TrainData:
    """Conversations through the tokenizer's chat template (chat.DEFAULT_TEMPLATE when it
    has none; the run's tokenizer keeps it), packed, the loss on assistant tokens only."""
    t = cfg.train
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train, valid = chat_splits(cfg)
    tok = _tokenizer(cfg, run_dir, lambda: [m["content"] for c in train for m in c])
    tok.chat_template = chat.template_of(tok)
    train_rows, dropped = chat.chat_rows(train, tok, t.seq_len)
    valid_rows, _ = chat.chat_rows(valid, tok, t.seq_len)
    reply_bytes = sum(len(m["content"].encode("utf-8")) for c in valid for m in c
                      if m["role"] == "assistant")
    description = (f"chat: train={len(train) - dropped:,} conversations in "
                   f"{len(train_rows['inputs']):,} rows, valid={len(valid):,}")
    if dropped:
        description += f" ({dropped:,} left out: no assistant token within train.seq_len)"
    return TrainData(
        tok, pipeline.RowBatches(LMBatch(**train_rows), t.batch_size, seed=cfg.seed, **proc),
        pipeline.RowBatches(LMBatch(**valid_rows), t.batch_size, shuffle=False, **proc),
        reply_bytes / max(float(valid_rows["loss_mask"].sum()), 1.0), description)


def _preference_data(cfg: Config, run_dir: Path) -> TrainData:
    """Preference pairs (DPO): data.files (else data.name=chat-preferences, made on first
    use), held out by data.valid_files or the last data.valid_fraction of the pairs."""
    t, d = cfg.train, cfg.data
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    files, valid_files = d.files, d.valid_files
    if not files:  # config allows only data.name=chat-preferences then
        from jaxlm.data import chat_preferences

        made = chat_preferences.ensure()
        files, valid_files = [str(made.train)], [str(made.heldout)]
    train_pairs = preference.read_preferences(pipeline.expand_files(files))
    if valid_files:
        valid_pairs = preference.read_preferences(pipeline.expand_files(valid_files))
    else:
        train_pairs, valid_pairs = hold_out_last(train_pairs, d.valid_fraction,
                                                 "preference pair")
    tok = _tokenizer(cfg, run_dir, lambda: preference.texts(train_pairs))
    (train_rows, cut), (valid_rows, _) = (preference.preference_rows(p, tok, t.seq_len)
                                          for p in (train_pairs, valid_pairs))
    description = (f"preference pairs: train={len(train_pairs):,} valid={len(valid_pairs):,}"
                   + (f" ({cut:,} cut to train.seq_len={t.seq_len})" if cut else ""))
    # bytes_per_token 0: the DPO loss is no text likelihood (no perplexity, bits per byte).
    return TrainData(tok, pipeline.RowBatches(train_rows, t.batch_size, seed=cfg.seed, **proc),
                     pipeline.RowBatches(valid_rows, t.batch_size, shuffle=False, **proc),
                     0.0, description)


def _text_data(cfg: Config, run_dir: Path, progress: bool) -> TrainData:
    """Windows (or packed rows) of the corpus's token stores, built on first use."""
    t, d = cfg.train, cfg.data
    family = registry.of(cfg.model)
    if d.pack and not family.packs_documents:
        raise ConfigError(f"data.pack applies to decoder-only models, not the "
                          f"{cfg.model.family} family; remove it")
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    quiet = not progress
    def layout(tok: Tokenizer) -> Callable:  # plain-text windows as the family trains on
        return functools.partial(family.from_windows, start_id=decoder_start_id(cfg.model, tok))

    if d.streaming:
        from jaxlm.data import stream

        tok = _tokenizer(cfg, run_dir, lambda: ())  # config refuses a BPE trained on a stream
        s = stream.streams(cfg, tok, **proc)
        return TrainData(tok, pipeline.MappedBatches(s.train, layout(tok)),
                         pipeline.MappedBatches(s.valid, layout(tok)), s.bytes_per_token,
                         s.description)
    train_src, valid_src = corpus.sources(d, store_root(d.store_dir), quiet)
    tok = _tokenizer(cfg, run_dir, lambda: corpus.training_texts(train_src, valid_src, d))
    sp = corpus.splits(d, tok, train_src, valid_src, quiet)
    if d.pack:
        rows = [PackedRows(span, *span.documents(), t.seq_len) for span in (sp.train, sp.valid)]
        train = pipeline.RowBatches(rows[0], t.batch_size, collate=rows[0].collate,
                                    seed=cfg.seed, **proc)
        valid = pipeline.RowBatches(rows[1], t.batch_size, collate=rows[1].collate,
                                    shuffle=False, **proc)
        return TrainData(tok, train, valid, sp.valid_bytes / max(rows[1].num_pairs, 1),
                         f"packed rows: train={len(rows[0]):,} valid={len(rows[1]):,}")
    train = pipeline.MappedBatches(
        pipeline.LMBatches(sp.train, t.seq_len, t.batch_size, seed=cfg.seed, **proc),
        layout(tok))
    valid = pipeline.MappedBatches(
        pipeline.LMBatches(sp.valid, t.seq_len, t.batch_size, shuffle=False, **proc),
        layout(tok))
    return TrainData(tok, train, valid, sp.valid_bytes / max(len(sp.valid), 1), sp.description)


def prepare_stores(cfg: Config, quiet: bool = False) -> dict[str, TokenStore]:
    """The token stores a text run of `cfg` reads, built now (`jaxlm prepare`); none for
    (source, target) pairs or a stream."""
    d = cfg.data
    if uses_pairs(cfg) or uses_chat(cfg) or d.streaming or d.format == "preference":
        return {}
    root = store_root(d.store_dir)
    train_src, valid_src = corpus.sources(d, root, quiet)
    tok = from_name(d.tokenizer, vocab_size=d.bpe_vocab_size,
                    texts=corpus.training_texts(train_src, valid_src, d)
                    if d.tokenizer == "bpe" else None)
    stores = {"train": corpus.open_store(train_src, tok, d, root, quiet)}
    if valid_src is not None:
        stores["valid"] = corpus.open_store(valid_src, tok, d, root, quiet)
    return stores
