"""From `data.*` settings to token stores and the training and validation spans of them.

The documents come from `data.files` (+ `data.valid_files`), an HF dataset (`data.hf_path`)
or a prepared corpus (`data.name`). Each set of documents is tokenized once into a store
(jaxlm.data.store), built on first use. Without separate validation documents, the last
`valid_fraction` of the documents is held out (of the tokens, when there are fewer than 20
documents). Each document ends in EOS, except the only document of a span."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from etils import epath

from jaxlm.config import DataConfig
from jaxlm.data import build
from jaxlm.data.errors import DataError
from jaxlm.data.paths import Fingerprints, expand_files
from jaxlm.data.pieces import Source
from jaxlm.data.sources import iter_texts, plan_files
from jaxlm.data.store import TokenSpan, TokenStore, store_root

MIN_DOCS_TO_HOLD_OUT = 20


@dataclass
class Splits:
    train: TokenSpan
    valid: TokenSpan
    valid_bytes: int
    description: str


def file_source(files: list[str], fingerprints: Fingerprints, description: str) -> Source:
    records = [fingerprints.of(f) for f in files]
    return Source({"files": [r["sha256"] for r in records]}, lambda: plan_files(files),
                  description, records)


def sources(d: DataConfig, root: epath.Path, quiet: bool = False
            ) -> tuple[Source, Source | None]:
    """The training documents and, if the data has them, separate validation documents."""
    if d.hf_path:
        from jaxlm.data import hf

        return hf.sources(d)
    fingerprints = Fingerprints(root / "fingerprints.json")
    try:
        if d.files:
            train = file_source(expand_files(d.files), fingerprints, ",".join(d.files))
            valid = (file_source(expand_files(d.valid_files, "validation file"), fingerprints,
                                 ",".join(d.valid_files)) if d.valid_files else None)
            return train, valid
        from jaxlm.data.prepare import prepare

        corpus = prepare(d.name, progress=not quiet)
        return (file_source([str(corpus.train)], fingerprints, f"{d.name} train split"),
                file_source([str(corpus.valid)], fingerprints, f"{d.name} valid split"))
    finally:
        fingerprints.save()


def training_texts(train: Source, valid: Source | None, d: DataConfig) -> Iterator[str]:
    """The training documents' text (a tokenizer trains on it): without separate validation
    documents, the first 1 - valid_fraction of the data, so the held-out part is unseen."""
    share = 1.0 if valid is not None else 1.0 - d.valid_fraction
    return iter_texts(train.plan(), d.text_field, d.utf8_errors, share)


def open_store(source: Source, tokenizer: Any, d: DataConfig, root: epath.Path,
               quiet: bool = False) -> TokenStore:
    return build.ensure(root, source.identity, source.plan, tokenizer, sources=source.records,
                        text_field=d.text_field, utf8_errors=d.utf8_errors,
                        workers=d.workers, quiet=quiet, description=source.description)


def whole(store: TokenStore, start: int = 0, stop: int | None = None) -> TokenSpan:
    """Tokens [start, stop) of `store`, without the EOS that closes a span's only document."""
    span = store.span(start, stop)
    starts, _ = span.documents()
    if len(starts) == 1 and store.eos_id is not None and len(span) > 1:
        return store.span(span.start, span.stop - 1)
    return span


def hold_out(store: TokenStore, fraction: float) -> tuple[TokenSpan, TokenSpan]:
    """(train, valid): the last `fraction` of the documents, or of the tokens when there
    are fewer than MIN_DOCS_TO_HOLD_OUT documents."""
    n = store.num_docs
    if n >= MIN_DOCS_TO_HOLD_OUT:
        cut = int(store.doc_ends[n - max(1, int(n * fraction)) - 1])
        return whole(store, 0, cut), whole(store, cut)
    stream = whole(store)
    cut = int(len(stream) * (1 - fraction))
    if cut <= 0 or cut >= len(stream):
        raise DataError("the corpus is too small to hold out a validation split")
    return store.span(0, cut), store.span(cut, stream.stop)


def splits(d: DataConfig, tokenizer: Any, train: Source, valid: Source | None,
           quiet: bool = False) -> Splits:
    """The training and validation spans, their stores built on first use."""
    root = store_root(d.store_dir)
    train_store = open_store(train, tokenizer, d, root, quiet)
    if valid is not None:
        train_span, valid_span = whole(train_store), whole(open_store(valid, tokenizer, d, root,
                                                                      quiet))
    else:
        train_span, valid_span = hold_out(train_store, d.valid_fraction)
    return Splits(train_span, valid_span, valid_span.num_bytes(),
                  f"tokens: train={len(train_span):,} valid={len(valid_span):,}")
