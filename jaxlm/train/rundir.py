"""The run directory: config.yaml, metrics.jsonl, tokenizer/, checkpoints/; local or in the
cloud (`gs://...`), through etils.epath.

Resolving a config against an existing run directory happens before anything is written,
so a refused resume leaves the directory untouched.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from etils import epath

from jaxlm import config as config_lib
from jaxlm.config import Config, ConfigError
from jaxlm.data.paths import as_path, is_remote

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"


def default_dir(cfg: Config) -> epath.Path:
    return as_path("runs") / (cfg.name or "run")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resolve(config_name: str | None, overrides: list[str], *,
            read_checkpoint: Callable[[str], dict[str, Any]] | None = None
            ) -> tuple[Config, epath.Path, bool]:
    """(config, run dir, resuming?). An existing run dir's saved config wins; overrides may
    only change what a resumed run can change (steps, logging, checkpointing, mesh).
    `read_checkpoint`: what model.init_from fixes (see config.load)."""
    cfg = config_lib.load(config_name, overrides, read_checkpoint=read_checkpoint)
    run_dir = as_path(cfg.run.dir) if cfg.run.dir else default_dir(cfg)
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.exists():
        cfg.run.dir = str(run_dir)
        return cfg, run_dir, False
    saved = read_config_file(saved_file)
    given = {k for a in overrides for k in [a.split("=", 1)[0].strip()]}
    resumed_raw = config_lib._merge(config_lib.to_dict(saved), config_lib.parse_overrides(
        overrides))
    resumed = config_lib.from_dict(resumed_raw)
    config_lib.validate(resumed)
    old, new = _flatten(config_lib.to_dict(saved)), _flatten(config_lib.to_dict(resumed))
    for key in sorted(given):
        if old.get(key) != new.get(key) and not key.startswith(config_lib.RESUMABLE_PREFIXES):
            what = "the model shape" if key.startswith("model.") else "the run"
            raise ConfigError(
                f"{run_dir} already holds a run with {key}={old.get(key)!r}; "
                f"{key}={new.get(key)!r} would change {what}. Use a new run.dir, or drop "
                f"the override to resume")
    if config_name is not None:
        explicit = config_lib.load(config_name, [], read_checkpoint=read_checkpoint)
        if config_lib.to_dict(explicit.model) != config_lib.to_dict(saved.model):
            raise ConfigError(
                f"{run_dir} holds a run of another model than config '{config_name}'; "
                "use a new run.dir")
    resumed.run.dir = str(run_dir)
    resumed.run.quiet = cfg.run.quiet  # this invocation's choice, not a property of the run
    return resumed, run_dir, True


def write_config(run_dir: str | Path, cfg: Config) -> None:
    run_dir = as_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_whole(run_dir / CONFIG_FILE, config_lib.dump(cfg))


def _write_whole(path: epath.Path, text: str) -> None:
    """Replaces the file at once (a rename locally; a cloud object is written whole)."""
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class DamagedConfig(ConfigError):
    """A run directory's config.yaml that cannot be read; `reason` says why (without the
    path, for `jaxlm runs`)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is not a valid jaxlm run config: {reason}")
        self.path, self.reason = path, reason


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"not valid YAML{where}: {problem}"


def read_config_file(path: str | Path) -> Config:
    """A saved config.yaml as a validated Config; DamagedConfig (a ConfigError) naming the
    file when it cannot be read, is not YAML, or does not hold a valid config."""
    try:
        text = as_path(path).read_bytes().decode("utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise DamagedConfig(path, "not UTF-8 text") from None
    except OSError as e:
        raise DamagedConfig(path, e.strerror or type(e).__name__) from None
    except yaml.YAMLError as e:
        raise DamagedConfig(path, _yaml_problem(e)) from None
    if not isinstance(raw, dict) or not raw:
        what = "empty" if not raw else f"a YAML {type(raw).__name__}"
        raise DamagedConfig(path, f"expected a mapping of config keys, the file is {what}")
    try:
        return config_lib.from_yaml_text(text)
    except ConfigError as e:
        raise DamagedConfig(path, str(e)) from None


def load_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A run directory's config, with dotted `overrides` applied and validated."""
    path = as_path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"'{run_dir}' is not a jaxlm run directory (no {CONFIG_FILE})")
    cfg = read_config_file(path)
    if overrides:
        cfg = config_lib.from_dict(config_lib._merge(
            config_lib.to_dict(cfg), config_lib.parse_overrides(list(overrides))))
        config_lib.validate(cfg)
    return cfg


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per row to metrics.jsonl and hands the row to the trackers
    (TensorBoard, W&B; see jaxlm.tracking). Only on process 0 (`enabled`). A cloud object
    cannot be appended to: there the file is written whole, at most every
    REMOTE_FLUSH_SECONDS and when the writer closes."""

    REMOTE_FLUSH_SECONDS = 30.0

    def __init__(self, run_dir: str | Path, enabled: bool = True,
                 trackers: Sequence[Any] = ()):
        self.path = as_path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.trackers = list(trackers) if enabled else []
        self._remote: list[str] | None = None  # the whole file, when it is a cloud object
        if enabled and is_remote(self.path):
            old = self.path.read_bytes().decode() if self.path.exists() else ""
            self._remote = [old] if old else []
        self._flushed = 0.0  # the first row is written at once

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        line = json.dumps({k: _clean(v) for k, v in row.items()}) + "\n"
        if self._remote is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._remote.append(line)
            if time.time() - self._flushed > self.REMOTE_FLUSH_SECONDS:
                self.flush()
        for tracker in self.trackers:
            tracker.log(row)

    def flush(self) -> None:
        if self._remote is not None:
            self.path.write_text("".join(self._remote))
            self._flushed = time.time()

    def close(self) -> None:
        """Writes what is buffered and closes the trackers."""
        self.flush()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a line that is not a JSON object (one cut short by a run that is
    still writing or was killed) is skipped."""
    path = as_path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_summary(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Replaces summary.json atomically (the run's status and totals; see jaxlm.runs)."""
    _write_whole(as_path(run_dir) / SUMMARY_FILE,
                 json.dumps({k: _clean(v) for k, v in record.items()}, indent=2) + "\n")


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json as a dict; {} when absent or unreadable (an older or foreign run)."""
    path = as_path(run_dir) / SUMMARY_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
