"""How far the host may run ahead of the devices.

Steps are dispatched asynchronously, so the host could queue hundreds of them. A few are
enough to keep the devices busy, and more are harmful: XLA's CPU runtime can deadlock a
multi-device program when many steps with collectives wait in its queue (seen with 2 CPU
devices and 100 queued steps). So the loop waits for the step `limit` back before it
dispatches another, which never idles a device while `limit` steps remain queued.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import jax

STEPS_AHEAD = 3


class Window:
    """The outputs of the last `limit` dispatched steps; `add` waits for the oldest once more
    than `limit` are in flight."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = STEPS_AHEAD if limit is None else limit
        self._outputs: deque = deque()

    def add(self, step_outputs: Any) -> None:
        self._outputs.append(step_outputs)
        if len(self._outputs) > self.limit:
            jax.block_until_ready(self._outputs.popleft())

    def clear(self) -> None:
        self._outputs.clear()
