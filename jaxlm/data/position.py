"""The data item of a checkpoint: the position of the next batch and, for a source whose
batches are costly to reach from the start (a stream), every process's cursor.

Orbax writes the item from process 0, so the cursors are gathered from all processes first;
a run resumed on the same number of processes gives each its own back."""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def gather_json(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(raw)], np.int32)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(raw)] = raw
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(every[i, :int(n)].tobytes()) for i, n in enumerate(sizes.reshape(-1))]


def saved(source: Any, position: int) -> dict[str, Any]:
    """The checkpoint's data item at `position`. All processes call it at the same step,
    and gather even where there is nothing to keep (the same collectives on every process)."""
    every = gather_json(source.state(position))
    if all(c is None for c in every):
        return {"position": position}
    return {"position": position, "cursors": every}


def restore(source: Any, item: dict[str, Any], step: int) -> int:
    """The position of a checkpoint's data item; a stream reads on from this process's
    cursor (saved by as many processes), else from the start up to the position."""
    position = int(item.get("position", step))
    cursors = item.get("cursors")
    if cursors and len(cursors) == jax.process_count():
        if cursors[jax.process_index()] is not None:
            source.resume(position, cursors[jax.process_index()])
    elif cursors:
        log.warning("the checkpoint's stream positions are those of %d processes, not %d: "
                    "the stream is read again up to position %d", len(cursors),
                    jax.process_count(), position)
    return position
