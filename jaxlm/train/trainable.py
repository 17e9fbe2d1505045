"""Which parameters a run trains: every one, or with LoRA the adapters alone. The frozen rest
is never differentiated and has no optimizer state (no Adam moments are allocated for it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flax import traverse_util


@dataclass(frozen=True)
class Trainable:
    """`select(path)`: whether the parameter at a key path trains; None: every one."""

    select: Callable[[tuple], bool] | None = None

    def split(self, params: Any) -> tuple[Any, Any]:
        """(trained, frozen), two nested dicts; (params, {}) when everything trains."""
        if self.select is None:
            return params, {}
        flat = traverse_util.flatten_dict(params)
        return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if self.select(k)}),
                traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                              if not self.select(k)}))

    def join(self, trained: Any, frozen: Any) -> Any:
        """The inverse of `split`."""
        if self.select is None:
            return trained
        return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                             **traverse_util.flatten_dict(trained)})

    def trained(self, params: Any) -> Any:
        """The trained part alone (what the optimizer state mirrors)."""
        return self.split(params)[0]


EVERYTHING = Trainable()
