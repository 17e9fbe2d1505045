"""HF safetensors checkpoints on disk: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Read lazily, one tensor at a time through `safe_open` (the
file is opened for that read only, so the pages of its memory map are let go after each
tensor); written in shards of at most a given size, in a given dtype, with an index."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors reads into)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxlm.convert import ConversionError
from jaxlm.convert.lazy import Lazy, materialize, source

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's "5GB"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (ValueError if it is none of those)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"'{text}' is not a size (e.g. 5GB, 500MB, 2GiB or bytes)")
        size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ValueError(f"a shard size must be positive, got {text}")
    return size


def _read_rows(file: Path, name: str, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of a tensor's leading axis (all of a scalar). The file is opened for this
    read alone: its memory-mapped pages are let go when it closes."""
    try:
        with safe_open(str(file), framework="numpy") as f:
            part = f.get_slice(name)
            return part[a:b] if part.get_shape() else f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"cannot read tensor '{name}' from '{file}': {e}") from None


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """name -> (shape, numpy dtype) of every tensor in one file, from its header alone."""
    try:
        with safe_open(str(file), framework="numpy") as f:
            out = {}
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (tuple(s.get_shape()), _DTYPES.get(s.get_dtype(), np.float32))
            return out
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"cannot read the safetensors file '{file}': {e}") from None


def _files(directory: Path) -> list[Path]:
    """The checkpoint's files: those its index names, else every *.safetensors."""
    index = directory / INDEX_FILE
    if not index.is_file():
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(
                f"no *.safetensors file in '{directory}' (pickled .bin checkpoints are not "
                "loaded; re-save with safe_serialization=True)")
        return files
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"'{index}' is not a safetensors index ({e})") from None
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise ConversionError(f"'{index}' lists '{missing[0]}', which is not in '{directory}'")
    return [directory / n for n in names]


class SafetensorsCheckpoint(Mapping[str, Lazy]):
    """HF tensor name -> a `Lazy` that reads it. Only headers are read up front."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._where: dict[str, tuple[Path, tuple[int, ...], Any]] = {}
        for file in _files(self.directory):  # later files win, as a dict.update would
            for name, (shape, dtype) in _header(file).items():
                self._where[name] = (file, shape, dtype)

    def __getitem__(self, name: str) -> Lazy:
        file, shape, dtype = self._where[name]
        return source(shape, dtype, name, lambda a, b: _read_rows(file, name, a, b))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in self._where.values())


def _plan(tensors: Mapping[str, Any], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = int(np.prod(np.shape(t))) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_shards(tensors: Mapping[str, Any], out_dir: str | Path, *, dtype: Any = np.float32,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Writes `tensors` (arrays or recipes) in `dtype`: one model.safetensors when they fit
    in one shard, else model-0000i-of-0000n.safetensors and model.safetensors.index.json.
    One shard is in memory at a time."""
    out, dtype = Path(out_dir), np.dtype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    shards = _plan(tensors, dtype.itemsize, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                          for i in range(n)]
    weight_map, total = {}, 0
    for file, shard in zip(names, shards, strict=True):
        arrays = {k: np.ascontiguousarray(materialize(tensors[k], dtype)) for k in shard}
        save_file(arrays, str(out / file), metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update(dict.fromkeys(shard, file))
        del arrays
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out / f for f in names]
