"""Tensors not read yet: what a converter builds from a checkpoint opened lazily.

A `Lazy` behaves like the numpy array it stands for as far as converters go (`.shape`,
`.T`, `.transpose`, `.reshape`, indexing, `np.stack`, `np.concatenate`, arithmetic), but
only records the recipe: which checkpoint tensors to read and what to do with them. The
loader runs each parameter's recipe on its own (`fill(out)`), straight into an array of the
target dtype, so the whole model is never on the host at once. Source tensors are read a
block of rows at a time and written where they land (through transposes, reshapes and
stacks), so a parameter never needs a second copy of itself either. A numpy function
without a lazy form (`np.allclose`, `np.asarray(x, np.float32)`) still works: it reads the
tensors then, in float32, as the eager path always did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Shape = tuple[int, ...]


class Lazy(np.lib.mixins.NDArrayOperatorsMixin):
    """A tensor recipe. `fill(out)` writes it into an array of its shape (any dtype: cast on
    the way); `materialize(dtype)` returns a new one. A recipe gives either `fill` (which
    can write piece by piece, never holding a second copy) or `compute(dtype)`."""

    def __init__(self, shape: Sequence[int], dtype: Any, what: str, *,
                 fill: Callable[[np.ndarray], None] | None = None,
                 compute: Callable[[Any], np.ndarray] | None = None,
                 rows: Callable[[int, int], np.ndarray] | None = None):
        self.shape: Shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.what = what  # for messages: the tensor names it reads
        self._fill, self._compute = fill, compute
        self.rows = rows  # reads rows [a, b) of the leading axis, when the source can

    # ------------------------------------------------------------- array-like surface
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Lazy({self.what}, shape={self.shape}, dtype={self.dtype})"

    def fill(self, out: np.ndarray) -> None:
        """Writes the tensor into `out` (its shape; cast to out's dtype)."""
        if self._fill is not None:
            self._fill(out)
        else:
            out[...] = self._compute(out.dtype)

    def materialize(self, dtype: Any = None) -> np.ndarray:
        """The array, in `dtype` (default: the tensor's own)."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if self._fill is None:
            return np.asarray(self._compute(dtype)).astype(dtype, copy=False)
        out = np.empty(self.shape, dtype)
        self._fill(out)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # Eager fallback for numpy code with no lazy form: float32 unless asked otherwise.
        return self.materialize(dtype or np.float32)

    def copy(self) -> Lazy:
        return self  # a recipe is never mutated

    def astype(self, dtype: Any, copy: bool = True) -> Lazy:
        return Lazy(self.shape, dtype, self.what, fill=self.fill, rows=self.rows)

    @property
    def T(self) -> Lazy:  # noqa: N802 (numpy's name)
        return self.transpose()

    def transpose(self, *axes: Any) -> Lazy:
        order = tuple(axes[0]) if len(axes) == 1 and axes[0] is not None and not isinstance(
            axes[0], int) else (axes or tuple(reversed(range(self.ndim))))
        shape = tuple(self.shape[a] for a in order)
        if self.rows is None:
            return Lazy(shape, self.dtype, self.what,
                        compute=lambda d: self.materialize(d).transpose(order))
        # Read a block of source rows at a time and write it where the rows land.
        lead = order.index(0)

        def write_blocks(out: np.ndarray) -> None:
            step = _rows_per_block(self.shape, max(out.dtype.itemsize, self.dtype.itemsize))
            for a in range(0, self.shape[0], step):
                b = min(a + step, self.shape[0])
                out[(slice(None),) * lead + (slice(a, b),)] = self.rows(a, b).transpose(order)

        return Lazy(shape, self.dtype, self.what, fill=write_blocks)

    def reshape(self, *shape: Any) -> Lazy:
        dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        dims = _reshaped(self.shape, dims)

        def write_through(out: np.ndarray) -> None:
            if out.flags.c_contiguous:  # a view in the source's shape: write through it
                self.fill(out.reshape(self.shape))
            else:
                out[...] = self.materialize(out.dtype).reshape(dims)

        return Lazy(dims, self.dtype, self.what, fill=write_through)

    def __getitem__(self, index: Any) -> Lazy:
        probe = np.broadcast_to(np.empty((), np.int8), self.shape)[index]
        return Lazy(probe.shape, self.dtype, self.what,
                    compute=lambda d: self.materialize(d)[index])

    # ------------------------------------------------------------- numpy protocols
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any):
        if method != "__call__" or "out" in kwargs:
            return getattr(ufunc, method)(*_eager(inputs), **_eager(kwargs))
        probes = [np.empty((), np.float32) if isinstance(x, Lazy)
                  else np.empty((), x.dtype) if isinstance(x, np.ndarray) else x for x in inputs]
        out_dtype = ufunc(*probes, **kwargs).dtype  # arithmetic runs in float32, as before
        shape = np.broadcast_shapes(*(np.shape(x) for x in inputs))
        what = "+".join(x.what for x in inputs if isinstance(x, Lazy))

        def compute(dtype: Any) -> np.ndarray:
            args = [x.materialize(np.float32) if isinstance(x, Lazy) else x for x in inputs]
            return ufunc(*args, **kwargs)

        return Lazy(shape, out_dtype, what, compute=compute)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any):
        if func is np.stack:
            return stack(*args, **kwargs)
        if func is np.concatenate:
            return concatenate(*args, **kwargs)
        if func is np.transpose:
            return args[0].transpose(*args[1:], **kwargs)
        if func is np.reshape:
            return args[0].reshape(*args[1:], **kwargs)
        if func is np.shape:
            return args[0].shape
        return func(*_eager(args), **_eager(kwargs))


BLOCK_BYTES = 4 * 2**20  # what one read of a source tensor holds at most (beyond a row)


def _rows_per_block(shape: Shape, itemsize: int) -> int:
    return max(1, BLOCK_BYTES // max(1, math.prod(shape[1:]) * itemsize))


def fill(part: Any, out: np.ndarray) -> None:
    """Writes a recipe or an array into `out` (cast to its dtype)."""
    if isinstance(part, Lazy):
        part.fill(out)
    else:
        out[...] = part


def source(shape: Sequence[int], dtype: Any, what: str,
           rows: Callable[[int, int], np.ndarray]) -> Lazy:
    """A checkpoint tensor, read by blocks of rows of its leading axis (`rows(a, b)`), so
    that filling a parameter never holds the whole source tensor beside it."""
    shape = tuple(int(n) for n in shape)
    if not shape:  # a scalar has no rows
        return Lazy(shape, dtype, what, compute=lambda d: np.asarray(rows(0, 1)))

    def write_blocks(out: np.ndarray) -> None:
        step = _rows_per_block(shape, max(out.dtype.itemsize, np.dtype(dtype).itemsize))
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            out[a:b] = rows(a, b)

    return Lazy(shape, dtype, what, fill=write_blocks, rows=rows)


def _reshaped(shape: Shape, dims: Sequence[int]) -> Shape:
    dims = tuple(int(d) for d in dims)
    if dims.count(-1) == 1:
        known = math.prod(d for d in dims if d != -1)
        dims = tuple(math.prod(shape) // known if d == -1 else d for d in dims)
    if math.prod(dims) != math.prod(shape):
        raise ValueError(f"cannot reshape {shape} into {dims}")
    return dims


def _eager(x: Any) -> Any:
    """`x` with every Lazy inside (lists, tuples, dicts) read as a float32 array."""
    if isinstance(x, Lazy):
        return np.asarray(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_eager(v) for v in x)
    if isinstance(x, dict):
        return {k: _eager(v) for k, v in x.items()}
    return x


def is_lazy(x: Any) -> bool:
    return isinstance(x, Lazy)


def _dtype_of(parts: Sequence[Any]) -> np.dtype:
    return np.result_type(*(p.dtype if isinstance(p, Lazy) else np.asarray(p).dtype
                            for p in parts))


def stack(arrays: Sequence[Any], axis: int = 0) -> Lazy:
    """np.stack of recipes (and arrays): filled one part at a time into an array allocated
    in the target dtype, so a stacked parameter costs its own size plus one part."""
    parts = list(arrays)
    shape = tuple(np.shape(parts[0]))
    if any(tuple(np.shape(p)) != shape for p in parts):
        raise ValueError(f"cannot stack shapes {[tuple(np.shape(p)) for p in parts]}")
    axis = axis % (len(shape) + 1)
    out_shape = (*shape[:axis], len(parts), *shape[axis:])

    def fill_parts(out: np.ndarray) -> None:
        for i, p in enumerate(parts):
            fill(p, out[(slice(None),) * axis + (i,)])

    what = next((p.what for p in parts if isinstance(p, Lazy)), "arrays")
    return Lazy(out_shape, _dtype_of(parts), f"stack of {len(parts)}: {what}, ...",
                fill=fill_parts)


def concatenate(arrays: Sequence[Any], axis: int = 0) -> Lazy:
    parts = list(arrays)
    axis = axis % len(np.shape(parts[0]))
    shape = list(np.shape(parts[0]))
    shape[axis] = sum(np.shape(p)[axis] for p in parts)

    def fill_parts(out: np.ndarray) -> None:
        start = 0
        for p in parts:
            n = np.shape(p)[axis]
            fill(p, out[(slice(None),) * axis + (slice(start, start + n),)])
            start += n

    what = "+".join(p.what for p in parts if isinstance(p, Lazy))
    return Lazy(shape, _dtype_of(parts), what, fill=fill_parts)


def materialize(x: Any, dtype: Any = None) -> np.ndarray:
    """A recipe or an array as a numpy array in `dtype` (default: its own)."""
    if isinstance(x, Lazy):
        return x.materialize(dtype)
    return np.asarray(x) if dtype is None else np.asarray(x, dtype)
