"""The batch prefetcher: the same batches as building them in place, built ahead on another
thread, restarted where a rollback or resume asks, errors raised at their position."""

import threading
import time

import pytest

from jaxlm.train.prefetch import Prefetcher


class Recorder:
    """make(p) = ("batch", p), noting the thread and order of the calls."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at

    def __call__(self, position: int):
        self.calls.append(position)
        self.threads.add(threading.current_thread().name)
        if position == self.fail_at:
            raise ValueError(f"bad record at {position}")
        return ("batch", position)


def _wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_gets_exactly_the_batch_of_each_position(depth):
    make = Recorder()
    pf = Prefetcher(make, depth)
    try:
        assert [pf.get(p) for p in range(5, 12)] == [("batch", p) for p in range(5, 12)]
    finally:
        pf.close()
    if depth == 0:  # built in place, on the caller's thread, nothing ahead
        assert make.calls == list(range(5, 12))
        assert make.threads == {threading.current_thread().name}


def test_builds_ahead_on_a_background_thread():
    make = Recorder()
    pf = Prefetcher(make, depth=2)
    try:
        assert pf.get(0) == ("batch", 0)
        # Without another get, the builder goes on with the next positions.
        assert _wait_until(lambda: {1, 2} <= set(make.calls))
        assert make.threads == {"jaxlm-prefetch"}
        assert max(make.calls) <= 3  # bounded: depth queued plus one being put
    finally:
        pf.close()
    assert not any(t.name == "jaxlm-prefetch" for t in threading.enumerate())


def test_a_jump_restarts_at_the_asked_position():
    make = Recorder()
    pf = Prefetcher(make, depth=2)
    try:
        assert [pf.get(p) for p in range(4)] == [("batch", p) for p in range(4)]
        assert pf.get(40) == ("batch", 40)  # rolled back to a checkpoint past the data
        assert pf.get(41) == ("batch", 41)
        assert pf.get(2) == ("batch", 2)  # or resumed from an earlier position
    finally:
        pf.close()


def test_a_builder_error_is_raised_at_its_position():
    pf = Prefetcher(Recorder(fail_at=3), depth=2)
    assert [pf.get(p) for p in range(3)] == [("batch", p) for p in range(3)]
    with pytest.raises(ValueError, match="bad record at 3"):
        pf.get(3)
    pf.close()
    assert not any(t.name == "jaxlm-prefetch" for t in threading.enumerate())
