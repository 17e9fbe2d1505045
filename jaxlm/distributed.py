"""Joining a multi-process run: where the coordinator is, how many processes, which one we are.

`detect()` reads, in order of precedence: explicit CLI values; `JAXLM_*` then `JAX_*`
coordinator variables; SLURM's task variables; a Cloud TPU VM (left to JAX's own metadata
detection, marked `auto`). `initialize()` hands the result to `jax.distributed.initialize`
under a deadline, so a coordinator that never answers ends the process with one line and
exit code 2 instead of a hang. Both must run before anything touches a JAX backend.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from jaxlm.config import ConfigError

AUTO = "auto"
DEFAULT_TIMEOUT_S = 300
# JAX's own SLURM port rule (jax/_src/clusters/slurm_cluster.py): one port per job id in the
# top 4096 ports, so every task derives the same one without talking to the others.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 65535 - 4096 + 1, 4096


@dataclass(frozen=True)
class DistributedSpec:
    """How this process joins a run. `source` says where it came from; for source 'tpu' or
    'forced-auto' the other fields are None and JAX detects them (`auto` is True)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None
    source: str = "cli"

    @property
    def auto(self) -> bool:
        return self.coordinator is None


# ------------------------------------------------------------------ parsing helpers

def expand_nodelist(nodelist: str) -> list[str]:
    """Expands SLURM's compact host lists: 'node[01-03,07],gpu5' -> node01 node02 node03
    node07 gpu5. Ranges keep their zero padding; several bracket groups in one name multiply."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices = [_expand_range_group(p[1:-1]) if p.startswith("[") else [p] for p in parts]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return [h for h in hosts if h]


def _split_top_level(text: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ConfigError(f"unbalanced brackets in SLURM node list '{text}'")
    return [*items, cur]


def _expand_range_group(group: str) -> list[str]:
    out = []
    for part in group.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ConfigError(f"bad range '{part}' in SLURM node list")
            out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(part)
    return out


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """SLURM_NTASKS_PER_NODE, else the first count of SLURM_TASKS_PER_NODE ('4(x2),3')."""
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") \
        or env.get("SLURM_TASKS_PER_NODE")
    m = re.match(r"\s*(\d+)", raw or "")
    return int(m.group(1)) if m else None


def _int(value: str | int | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer, got '{value}'") from None


def _device_ids(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"local device ids must be comma-separated integers, got "
                          f"'{value}'") from None


# ------------------------------------------------------------------ detection

def _from_explicit(coordinator: str | None, num_processes: int | None, process_id: int | None,
                   local_ids: tuple[int, ...] | None, source: str) -> DistributedSpec | None:
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given) or num_processes == 1:
        return None  # one process: nothing to join
    if not all(given):
        missing = [n for n, g in zip(("coordinator address", "number of processes",
                                      "process id"), given) if not g]
        raise ConfigError(f"distributed run ({source}): {', '.join(missing)} not given; set "
                          "all of --coordinator HOST:PORT --num-processes N --process-id I")
    assert num_processes is not None and process_id is not None and coordinator is not None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in [0, {num_processes}) "
                          f"({source})")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", coordinator):
        raise ConfigError(f"coordinator '{coordinator}' is not HOST:PORT ({source})")
    return DistributedSpec(coordinator, num_processes, process_id, local_ids, source)


def _from_slurm(env: Mapping[str, str], coordinator: str | None = None
                ) -> DistributedSpec | None:
    needed = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist or not all(k in env for k in needed):
        return None
    ntasks = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    if not ntasks or ntasks < 2:
        return None
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError(f"SLURM node list '{nodelist}' names no host")
    port = env.get("JAXLM_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT") or str(
        _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % _SLURM_PORT_SPAN + _SLURM_PORT_BASE)
    # Several tasks per node means one device per task (the usual one-process-per-GPU
    # layout); one task per node sees all of its node's devices.
    local_ids = None
    per_node = _tasks_per_node(env)
    if per_node and per_node > 1 and "SLURM_LOCALID" in env:
        local_ids = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
    return _from_explicit(coordinator or f"{hosts[0]}:{port}", ntasks,
                          _int(env["SLURM_PROCID"], "SLURM_PROCID"), local_ids, "slurm")


def _on_cloud_tpu_vm(env: Mapping[str, str]) -> bool:
    """TPU chips on the PCI bus (not Colab, whose runtime is one host and has no pod
    metadata). Uses JAX's own probe, which reads /sys and needs no network."""
    if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env:
        return False
    workers = env.get("TPU_WORKER_HOSTNAMES", "").split(",")
    if len(workers) > 1 and all(re.fullmatch(r"[\w.-]+", w) for w in workers):
        return True  # GKE sets the pod's hostnames; JAX reads them
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True  # multislice
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private helper moved: no TPU auto-detection, explicit flags still work
        return False


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None,
           env: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """The distributed setup of this process, or None for a single-process run.

    Precedence: the arguments (the CLI flags); JAXLM_COORDINATOR_ADDRESS /
    JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID; the same JAX_* names; SLURM (first host of the
    node list, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID); a Cloud TPU VM (auto).
    JAXLM_DISTRIBUTED=off forces a single process, =auto forces JAX's auto-detection.
    """
    env = os.environ if env is None else env

    def var(name: str) -> str | None:
        return env.get(f"JAXLM_{name}") or env.get(f"JAX_{name}")

    if any(v is not None for v in (coordinator, num_processes, process_id)):
        return _from_explicit(
            coordinator or var("COORDINATOR_ADDRESS"),
            num_processes if num_processes is not None else _int(var("NUM_PROCESSES"),
                                                                 "NUM_PROCESSES"),
            process_id if process_id is not None else _int(var("PROCESS_ID"), "PROCESS_ID"),
            _device_ids(var("LOCAL_DEVICE_IDS")), "command line")
    mode = env.get("JAXLM_DISTRIBUTED", "").strip().lower()
    if mode in ("off", "0", "no", "false"):
        return None
    if mode == AUTO:
        return DistributedSpec(None, None, None, None, "forced-auto")
    if mode:
        raise ConfigError(f"JAXLM_DISTRIBUTED='{mode}' is not one of auto, off")
    if var("NUM_PROCESSES") or var("PROCESS_ID"):
        return _from_explicit(var("COORDINATOR_ADDRESS"), _int(var("NUM_PROCESSES"),
                                                               "NUM_PROCESSES"),
                              _int(var("PROCESS_ID"), "PROCESS_ID"),
                              _device_ids(var("LOCAL_DEVICE_IDS")), "environment")
    spec = _from_slurm(env, coordinator=var("COORDINATOR_ADDRESS"))
    if spec is not None:
        return spec
    if var("COORDINATOR_ADDRESS"):
        raise ConfigError("a coordinator address is set but not the number of processes or "
                          "this process's id; set JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID")
    if _on_cloud_tpu_vm(env):
        return DistributedSpec(None, None, None, None, "tpu")
    return None


# ------------------------------------------------------------------ initialisation

def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _failure_message(spec: DistributedSpec, timeout_s: float) -> str:
    if spec.auto:
        return (f"jax.distributed auto-detection ({spec.source}) did not complete within "
                f"{timeout_s:.0f}s; are all workers running the same command?")
    who = f"process {spec.process_id} of {spec.num_processes}"
    if spec.process_id != 0 and not _reachable(spec.coordinator):
        return (f"could not reach the coordinator {spec.coordinator} within {timeout_s:.0f}s "
                f"({who}); check the address and port, and that process 0 is running")
    return (f"not all {spec.num_processes} processes joined the coordinator "
            f"{spec.coordinator} within {timeout_s:.0f}s ({who}); start every process with "
            "the same coordinator and process count")


def initialize(spec: DistributedSpec | None, timeout_s: float | None = None,
               command: str = "train") -> None:
    """Joins the run described by `spec` (no-op for None or when already joined).

    JAX aborts the process if a coordinator never answers, so a watchdog thread ends it
    first after `timeout_s` (default: $JAXLM_INIT_TIMEOUT or 300): one line on stderr, exit
    code 2. Logs this process's index and devices once.
    """
    import jax

    if spec is None or jax.distributed.is_initialized():
        return
    if timeout_s is None:
        timeout_s = float(_int(os.environ.get("JAXLM_INIT_TIMEOUT"), "JAXLM_INIT_TIMEOUT")
                          or DEFAULT_TIMEOUT_S)
    # Cross-process collectives on CPU (the local multi-process launcher); GPUs and TPUs
    # use NCCL / ICI regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def give_up() -> None:
        print(f"jaxlm {command}: error: {_failure_message(spec, timeout_s)}", file=sys.stderr,
              flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own deadline comes later, so the watchdog's message is the one a user sees.
        jax.distributed.initialize(
            coordinator_address=spec.coordinator, num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
            initialization_timeout=int(timeout_s) + 60)
    except (ValueError, RuntimeError, TypeError) as e:
        if spec.source == "tpu":
            # A single TPU VM without pod metadata, or JAX already in use in this process
            # (a notebook): carry on as one process; libtpu still joins a slice's hosts.
            print(f"jaxlm: not joining a distributed run ({str(e).splitlines()[0][:120]})",
                  file=sys.stderr, flush=True)
            return
        raise ConfigError(f"jax.distributed.initialize failed ({spec.source}): "
                          f"{str(e).splitlines()[0][:200]}") from None
    finally:
        watchdog.cancel()
    local = jax.local_devices()
    print(f"jaxlm: process {jax.process_index()}/{jax.process_count()} on "
          f"{socket.gethostname()}: {len(local)} local {local[0].platform} device(s) "
          f"{[d.id for d in local]} of {jax.device_count()} ({spec.source})",
          file=sys.stderr, flush=True)
