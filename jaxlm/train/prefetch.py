"""Batches built and put on the devices ahead of the step that uses them, on a background
thread (as MaxText and Levanter prefetch): the host work of batch p+1 overlaps step p.

The batch at a data position is a pure function of the position, so prefetching never changes
which batch a step gets: `get(p)` returns make(p), and a request for any other position than
the next one queued (after a rollback or a resume) drops what was queued and starts over at p.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class Prefetcher:
    """make(position) -> device batch, computed `depth` positions ahead of `get`. depth 0
    builds each batch when asked, on the caller's thread."""

    def __init__(self, make: Callable[[int], Any], depth: int = 2) -> None:
        self.make, self.depth = make, depth
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._next = -1  # the position the queue's head holds

    def get(self, position: int) -> Any:
        """make(position): from the queue when it is the next one prefetched."""
        if self.depth == 0:
            return self.make(position)
        if position != self._next or self._thread is None:
            self._restart(position)
        item = self._queue.get()
        if isinstance(item, BaseException):  # the builder's error, raised where it is used
            self.close()
            raise item
        self._next = position + 1
        return item

    def _restart(self, position: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._next = position
        self._thread = threading.Thread(target=self._fill, args=(position, self._queue,
                                                                 self._stop),
                                        name="jaxlm-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, position: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self.make(position)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = e
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            position += 1

    def close(self) -> None:
        """Stops the builder thread and drops what it queued."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a builder waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._thread = None
        self._next = -1
