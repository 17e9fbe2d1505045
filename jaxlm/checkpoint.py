"""Orbax checkpoints of the train state and the data position; restore onto any mesh.

Restores always use a target of sharded jax.ShapeDtypeStructs built from the current mesh,
so a checkpoint written on one mesh loads onto another and optax NamedTuples stay NamedTuples.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm.data.paths import as_path, is_remote

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the CLI prints it and exits with code 2."""


def _dir(directory: str | Path) -> epath.Path:
    """A checkpoint folder for orbax: absolute if local; `gs://...` as it is."""
    path = as_path(directory)
    return path if is_remote(path) else path.absolute()


def _shape_mismatch(target: Any, saved: Any) -> str | None:
    """The first parameter whose saved shape differs from the target's, as a message."""
    saved_shapes = {jax.tree_util.keystr(p): getattr(x, "shape", None)
                    for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
        key = jax.tree_util.keystr(path)
        if key not in saved_shapes:
            return f"parameter {key} (shape {tuple(leaf.shape)}) is not in the checkpoint"
        if saved_shapes[key] is not None and tuple(saved_shapes[key]) != tuple(leaf.shape):
            return (f"parameter {key} has shape {tuple(saved_shapes[key])} in the checkpoint "
                    f"but {tuple(leaf.shape)} in this model")
    return None


class Checkpointer:
    """Saves {state, data} when asked; keeps the newest `keep` plus every `keep_period`-th.
    Orbax writes each step to a temporary directory and renames it when complete, so a
    checkpoint either exists whole or not at all."""

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_period: int = 0,
                 async_save: bool = True):
        self.directory = _dir(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None,
                                               create=True, enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=force)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def delete_after(self, step: int) -> None:
        """Deletes the checkpoints newer than `step` (after a rollback they hold the damaged
        parameters, and the resumed run will save those steps again)."""
        self.wait()
        for s in self.steps():
            if s > step:
                self.manager.delete(s)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores the newest checkpoint that loads (or `step`); returns (step, state, data).

        A checkpoint of another model is refused naming the first mismatching parameter;
        a corrupt or incomplete newest checkpoint is skipped, with a warning, for an older one.
        """
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        self._check_shapes(abstract_state, candidates[0])
        errors = []
        for s in candidates:
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
                if errors:
                    log.warning("skipped unreadable checkpoint(s) %s; resumed from step %d",
                                ", ".join(e[0] for e in errors), s)
                return s, restored["state"], dict(restored["data"] or {})
            except Exception as e:  # orbax/tensorstore raise many types on bad files
                errors.append((str(s), f"{type(e).__name__}: {str(e)[:200]}"))
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {msg}" for s, msg in errors))

    def _check_shapes(self, abstract_state: Any, step: int) -> None:
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception:  # unreadable metadata: let restore() try older steps
            return
        if meta is None:
            return
        try:  # orbax's tree metadata is a mapping, but not a dict
            saved_params = meta["params"]
        except (KeyError, TypeError):
            saved_params = getattr(meta, "params", None)
        if saved_params is None:
            return
        problem = _shape_mismatch(abstract_state.params, saved_params)
        if problem:
            raise CheckpointError(f"checkpoint {self.directory} is of another model: {problem}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _saved_params(manager: ocp.CheckpointManager, step: int) -> Any:
    """The params subtree of a step's saved state metadata, or None if unreadable."""
    try:
        meta = manager.item_metadata(step)["state"]
        return meta["params"] if meta is not None else None
    except Exception:  # metadata layout differs between orbax versions: restore decides
        return None


def restore_state_params(directory: str | Path, abstract_params: Any,
                         step: int | None = None) -> Any:
    """The parameters alone of a run's checkpoint (the newest readable one, or `step`),
    restored onto the shardings and dtypes of `abstract_params`; the optimizer state is not
    read. None when there is no checkpoint."""
    directory = _dir(directory)
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    try:
        steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
        if not steps:
            return None
        saved = _saved_params(manager, steps[0])
        problem = _shape_mismatch(abstract_params, saved) if saved is not None else None
        if problem:
            raise CheckpointError(f"checkpoint {directory} is of another model: {problem}")
        item = {"params": abstract_params}
        args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                            item)
        errors = []
        for s in steps:
            try:
                restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=item, restore_args=args, partial_restore=True)))
                return restored["state"]["params"]
            except Exception as e:  # orbax/tensorstore raise many types on bad files
                errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
        raise CheckpointError(f"no readable checkpoint in {directory}: " + "; ".join(errors))
    finally:
        manager.close()


def save_params(directory: str | Path, params: Any) -> None:
    """A params-only checkpoint (for inference): `jaxlm export`."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(_dir(directory), params)


def restore_params(directory: str | Path, abstract_params: Any) -> Any:
    problem = None
    with ocp.StandardCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(_dir(directory))
            saved = getattr(meta, "item_metadata", meta)
            problem = _shape_mismatch(abstract_params, saved.tree if hasattr(saved, "tree")
                                      else saved)
        except Exception:  # metadata layout differs between orbax versions: restore decides
            pass
        if problem:
            raise CheckpointError(f"{directory} holds another model: {problem}")
        try:
            return ckptr.restore(_dir(directory), abstract_params)
        except Exception as e:  # tensorstore/orbax errors on damaged files
            raise CheckpointError(f"cannot read parameters from {directory}: "
                                  f"{str(e).splitlines()[0][:200]}") from None
