"""From a config to the tokenizer and the train/validation batch sources the loop consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax

from jaxlm.config import Config, ConfigError
from jaxlm.data import pipeline
from jaxlm.data.tokenizers import Tokenizer, from_name, load_tokenizer


@dataclass
class TrainData:
    tokenizer: Tokenizer
    train: pipeline.LMBatches | pipeline.PairBatches | pipeline.RowBatches
    valid: pipeline.LMBatches | pipeline.PairBatches | pipeline.RowBatches
    bytes_per_token: float  # of the validation text, for bits per byte
    description: str


def _is_pair_corpus(name: str) -> bool:
    """Whether `jaxlm prepare NAME` makes (source, target) JSON lines (bible-mt-en-fr...)."""
    from jaxlm.data.prepare import CORPORA

    return name in CORPORA and CORPORA[name].suffix == ".jsonl"


def uses_pairs(cfg: Config) -> bool:
    """Whether the run trains on (source, target) pairs: an encoder-decoder on JSON lines or
    a prepared pair corpus; a decoder on a prepared pair corpus, or on JSON lines whose
    records hold the source and target fields but no text field (prompt -> answer rows)."""
    if cfg.model.family == "encoder":
        return False
    if not cfg.data.files:
        return _is_pair_corpus(cfg.data.name)
    if not any(f.endswith((".jsonl", ".json")) for f in cfg.data.files):
        return False
    return cfg.model.family == "encoder_decoder" or _records_are_pairs(cfg)


def _records_are_pairs(cfg: Config) -> bool:
    import json

    d = cfg.data
    files = [f for f in pipeline.expand_files(d.files) if f.endswith((".jsonl", ".json"))]
    try:
        with open(files[0], encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        record = json.loads(first)
    except (OSError, IndexError, ValueError):
        return False  # the text reader reports what is wrong with the file
    return (isinstance(record, dict) and d.source_field in record and d.target_field in record
            and d.text_field not in record)


def pair_files(cfg: Config) -> tuple[list[str], list[str]]:
    """The train and validation .jsonl files of a pair run: data.files / data.valid_files,
    else the prepared corpus's train and valid splits."""
    if cfg.data.files:
        return pipeline.expand_files(cfg.data.files), (
            pipeline.expand_files(cfg.data.valid_files) if cfg.data.valid_files else [])
    from jaxlm.data.prepare import prepare

    corpus = prepare(cfg.data.name, progress=False)
    return [str(corpus.train)], [str(corpus.valid)]


def _tokenizer(cfg: Config, run_dir: Path, texts: list[str]) -> Tokenizer:
    saved = run_dir / "tokenizer"
    tok = load_tokenizer(saved) if saved.exists() else from_name(
        cfg.data.tokenizer, texts=texts, vocab_size=cfg.data.bpe_vocab_size)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but "
                          f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    if cfg.model.family == "encoder" and tok.mask_id is None:
        raise ConfigError("masked-LM training needs a tokenizer with a mask token; "
                          f"data.tokenizer='{cfg.data.tokenizer}' has none")
    return tok


def start_id(tok: Tokenizer) -> int:
    """The decoder's first input for seq2seq: BOS, else PAD, else 0."""
    for i in (tok.bos_id, tok.pad_id):
        if i is not None:
            return i
    return 0


def build(cfg: Config, run_dir: Path, progress: bool = True) -> TrainData:
    t = cfg.train
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if uses_pairs(cfg):
        train_files, valid_files = pair_files(cfg)
        train_pairs = pipeline.read_pairs(train_files, cfg.data.source_field,
                                          cfg.data.target_field)
        if valid_files:
            valid_pairs = pipeline.read_pairs(valid_files, cfg.data.source_field,
                                              cfg.data.target_field)
        else:
            n = max(1, int(len(train_pairs) * cfg.data.valid_fraction))
            train_pairs, valid_pairs = train_pairs[:-n], train_pairs[-n:]
        tok = _tokenizer(cfg, run_dir, [x for p in train_pairs for x in p])
        valid_bytes = sum(len(b.encode("utf-8")) for _, b in valid_pairs)
        description = f"pairs: train={len(train_pairs):,} valid={len(valid_pairs):,}"
        if cfg.model.family == "decoder":  # prompt -> answer rows, loss on the answer
            train_rows = pipeline.prompted_rows(train_pairs, tok, t.seq_len)
            valid_rows = pipeline.prompted_rows(valid_pairs, tok, t.seq_len)
            n_valid = float(valid_rows["loss_mask"].sum())
            return TrainData(tok, pipeline.RowBatches(train_rows, t.batch_size, seed=cfg.seed,
                                                      **proc),
                             pipeline.RowBatches(valid_rows, t.batch_size, shuffle=False,
                                                 **proc),
                             valid_bytes / max(n_valid, 1.0), description)
        sid = start_id(tok)
        train = pipeline.PairBatches.from_pairs(train_pairs, tok, t.seq_len, t.batch_size, sid,
                                                seed=cfg.seed, **proc)
        valid = pipeline.PairBatches.from_pairs(valid_pairs, tok, t.seq_len, t.batch_size, sid,
                                                shuffle=False, **proc)
        bpt = valid_bytes / max(float(valid.tgt_mask.sum()), 1.0)
        return TrainData(tok, train, valid, bpt, description)
    texts = pipeline.load_text(cfg.data, progress=progress)
    tok = _tokenizer(cfg, run_dir, texts.train)
    if cfg.data.pack and cfg.model.family == "decoder":
        train_rows = pipeline.packed_rows(texts.train, tok, t.seq_len)
        valid_rows = pipeline.packed_rows(texts.valid, tok, t.seq_len)
        n_valid = float(valid_rows["loss_mask"].sum())
        train = pipeline.RowBatches(train_rows, t.batch_size, seed=cfg.seed, **proc)
        valid = pipeline.RowBatches(valid_rows, t.batch_size, shuffle=False, **proc)
        valid_bytes = sum(len(x.encode("utf-8")) for x in texts.valid)
        return TrainData(tok, train, valid, valid_bytes / max(n_valid, 1.0),
                         f"packed rows: train={len(train_rows['inputs']):,} "
                         f"valid={len(valid_rows['inputs']):,}")
    train_tokens = pipeline.tokenize(texts.train, tok, progress=progress)
    valid_tokens = pipeline.tokenize(texts.valid, tok)
    train = pipeline.LMBatches(train_tokens, t.seq_len, t.batch_size, seed=cfg.seed, **proc)
    valid = pipeline.LMBatches(valid_tokens, t.seq_len, t.batch_size, shuffle=False, **proc)
    valid_bytes = sum(len(x.encode("utf-8")) for x in texts.valid)
    return TrainData(tok, train, valid, valid_bytes / max(len(valid_tokens), 1),
                     f"tokens: train={len(train_tokens):,} valid={len(valid_tokens):,}")


def batch_at(data: TrainData, source, position: int, family: str) -> dict:
    """The host-local batch at `position` in the layout the family's objective expects."""
    b = source.batch(position)
    if isinstance(source, pipeline.PairBatches):
        return b
    return pipeline.for_family(b, family, start_id(data.tokenizer))
