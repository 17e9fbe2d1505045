"""HF datasets as training text: `data.hf_path` is a hub name (where there is a network), a
folder of parquet/arrow/json/csv/text files, or a `save_to_disk` folder; each row's
`data.text_field` is one document (a .txt file loaded by HF datasets gives one per line).

Without streaming the rows are tokenized once into a token store (workers read row ranges)
and read through grain like any corpus. With `data.streaming=true` nothing is tokenized
ahead: each process reads its share of the documents (`split_dataset_by_node`) as they come
(jaxlm.data.stream)."""

from __future__ import annotations

import functools
import json
from typing import Any

from jaxlm.config import DataConfig
from jaxlm.data.errors import DataError
from jaxlm.data.paths import as_path, is_remote
from jaxlm.data.pieces import PIECE_BYTES, Piece, Source

VALID_SPLIT = "validation"


def spec_of(d: DataConfig, split: str) -> dict[str, Any]:
    return {"path": d.hf_path, "name": d.hf_name or None, "split": split}


def _saved(path: str) -> bool:
    """Whether `path` is a folder `save_to_disk` wrote (a Dataset or a DatasetDict)."""
    root = as_path(path)
    return not is_remote(path) and root.is_dir() and any(
        (root / f).exists() for f in ("dataset_dict.json", "state.json"))


def load(spec: dict[str, Any], streaming: bool = False) -> Any:
    """The split `spec["split"]` of the dataset, as a Dataset (or an IterableDataset)."""
    import datasets

    datasets.disable_progress_bars()
    path, split = spec["path"], spec["split"]
    try:
        if _saved(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"the dataset '{path}' has no split '{split}' (splits: "
                                    f"{', '.join(ds)}); set data.split")
                ds = ds[split]
            return ds.to_iterable_dataset(num_shards=max(1, len(ds) // 10_000)) \
                if streaming else ds
        return datasets.load_dataset(path, spec["name"], split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types: missing, offline, malformed
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load the HF dataset '{path}' (split '{split}'): "
                        f"{text}") from None


def split_names(d: DataConfig) -> list[str]:
    """The dataset's splits, or [] where they cannot be listed."""
    import datasets

    try:
        if _saved(d.hf_path):
            ds = datasets.load_from_disk(d.hf_path)
            return list(ds) if isinstance(ds, datasets.DatasetDict) else []
        return list(datasets.get_dataset_split_names(d.hf_path, d.hf_name or None))
    except Exception:  # unlistable (offline hub, odd layout): the caller holds out instead
        return []


def valid_split(d: DataConfig) -> str | None:
    """The split validated on: 'validation' where the dataset has one (and trains on
    another), else None (the last data.valid_fraction is held out)."""
    return VALID_SPLIT if d.split != VALID_SPLIT and VALID_SPLIT in split_names(d) else None


@functools.lru_cache(maxsize=4)
def _cached(spec_json: str) -> Any:
    return load(json.loads(spec_json))


def read_rows(spec: dict[str, Any], start: int, stop: int, text_field: str) -> list[str]:
    """The non-empty `text_field` values of rows [start, stop)."""
    ds = _cached(json.dumps(spec, sort_keys=True))
    if text_field not in ds.column_names:
        raise DataError(f"the dataset '{spec['path']}' has no column '{text_field}' (columns: "
                        f"{', '.join(ds.column_names)}); set data.text_field")
    return [str(t) for t in ds.select_columns([text_field])[start:stop][text_field] if t]


def plan_rows(spec: dict[str, Any], piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """Row ranges of about `piece_bytes` of data each."""
    ds = _cached(json.dumps(spec, sort_keys=True))
    n = len(ds)
    per_row = max(1.0, ds.data.nbytes / max(n, 1))
    step = max(1, int(piece_bytes / per_row))
    source = json.dumps(spec, sort_keys=True)
    return [Piece("hf", source, a, min(a + step, n), True) for a in range(0, n, step)]


def _source(d: DataConfig, split: str) -> Source:
    spec = spec_of(d, split)
    ds = _cached(json.dumps(spec, sort_keys=True))
    record = {**spec, "rows": len(ds), "fingerprint": ds._fingerprint}
    return Source({"hf": record}, lambda: plan_rows(spec), f"{d.hf_path} ({split})", [record])


def sources(d: DataConfig) -> tuple[Source, Source | None]:
    """(training source, validation source or None) of a non-streamed HF dataset."""
    valid = valid_split(d)
    return _source(d, d.split), (_source(d, valid) if valid else None)
