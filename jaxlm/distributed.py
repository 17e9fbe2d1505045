"""Joining a multi-process run: where the coordinator is, how many processes, which one we are.

`detect()` reads, in order of precedence: explicit CLI values; `JAXLM_*` then `JAX_*`
coordinator variables; `JAXLM_DISTRIBUTED` (off, auto, or one of JAX's cluster detection
methods); else the signs of a cluster that `jax.distributed.initialize()` detects by itself
(SLURM, Open MPI, Cloud TPU incl. multislice, GKE/Kubernetes), leaving the coordinator,
process count and process id to JAX. `initialize()` hands the result to
`jax.distributed.initialize` under a deadline, so a coordinator that never answers ends the
process with one line and exit code 2 instead of a hang. Both must run before anything
touches a JAX backend.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jaxlm.config import ConfigError

AUTO = "auto"
DEFAULT_TIMEOUT_S = 300
# Names jax.distributed.initialize(cluster_detection_method=...) knows.
METHODS = ("slurm", "ompi", "mpi4py", "gcetpu", "gketpu")
# PCI device ids of Cloud TPU chips (vendor 0x1ae0, Google), as JAX's own TPU probe lists them.
_TPU_PCI_IDS = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


@dataclass(frozen=True)
class DistributedSpec:
    """How this process joins a run. `source` says where it came from; when the process count
    is None (`auto`), JAX's cluster detection fills in what is missing (`method` names the
    one to use; None lets JAX try each)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None
    source: str = "cli"
    method: str | None = None

    @property
    def auto(self) -> bool:
        return self.num_processes is None


# ------------------------------------------------------------------ parsing helpers

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


def _tpu_chips_on_pci(pci: str = "/sys/bus/pci/devices") -> bool:
    for vendor in glob.glob(f"{pci}/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == "0x1ae0" and (
                    Path(vendor).with_name("device").read_text().strip() in _TPU_PCI_IDS):
                return True
        except OSError:
            continue
    return False


def cluster_hint(env: Mapping[str, str]) -> str | None:
    """The kind of cluster this process runs in, for jax.distributed to detect, or None on a
    plain machine. A one-task SLURM job is one process (JAX would also pin it to one GPU);
    Colab's TPU runtime is one host without pod metadata."""
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and (
            _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi"
    if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env:
        return None
    tpu_vars = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
    if any(env.get(k) for k in tpu_vars) or _tpu_chips_on_pci():
        return "tpu"
    if "KUBERNETES_SERVICE_HOST" in env and importlib.util.find_spec("kubernetes"):
        return "k8s"
    return None


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None,
           env: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """The distributed setup of this process, or None for a single-process run.

    Precedence: the arguments (the CLI flags); JAXLM_DISTRIBUTED=off (one process), =auto or
    =<JAX cluster detection method> (JAX detects); JAXLM_COORDINATOR_ADDRESS /
    JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID and the same JAX_* names; a cluster JAX detects
    (`cluster_hint`). JAXLM_LOCAL_DEVICE_IDS restricts this process's devices.
    """
    env = os.environ if env is None else env

    def var(name: str) -> str | None:
        return env.get(f"JAXLM_{name}") or env.get(f"JAX_{name}")

    local_ids = _device_ids(var("LOCAL_DEVICE_IDS"))
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        return _from_explicit(
            coordinator or var("COORDINATOR_ADDRESS"),
            num_processes if num_processes is not None else _int(var("NUM_PROCESSES"),
                                                                 "NUM_PROCESSES"),
            process_id if process_id is not None else _int(var("PROCESS_ID"), "PROCESS_ID"),
            local_ids, "command line")
    mode = env.get("JAXLM_DISTRIBUTED", "").strip().lower()
    if mode in ("off", "0", "no", "false"):
        return None
    if mode and mode != AUTO and mode not in METHODS:
        raise ConfigError(f"JAXLM_DISTRIBUTED='{mode}' is not one of off, auto, "
                          f"{', '.join(METHODS)}")
    if mode:
        return DistributedSpec(var("COORDINATOR_ADDRESS"), None, None, local_ids,
                               f"JAXLM_DISTRIBUTED={mode}", None if mode == AUTO else mode)
    if var("NUM_PROCESSES") or var("PROCESS_ID"):
        return _from_explicit(var("COORDINATOR_ADDRESS"), _int(var("NUM_PROCESSES"),
                                                               "NUM_PROCESSES"),
                              _int(var("PROCESS_ID"), "PROCESS_ID"), local_ids, "environment")
    hint = cluster_hint(env)
    if hint is not None:
        return DistributedSpec(var("COORDINATOR_ADDRESS"), None, None, local_ids, hint)
    if var("COORDINATOR_ADDRESS"):
        raise ConfigError("a coordinator address is set but not the number of processes or "
                          "this process's id; set JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID")
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
            cluster_detection_method=spec.method, initialization_timeout=int(timeout_s) + 60)
    except (ValueError, RuntimeError, TypeError) as e:
        if spec.source == "tpu":
            # A single TPU VM without pod metadata, or JAX already in use in this process
            # (a notebook): carry on as one process; libtpu still joins a slice's hosts.
            print(f"jaxlm: not joining a distributed run ({str(e).splitlines()[0][:120]})",
                  file=sys.stderr, flush=True)
            return
        raise ConfigError(f"jax.distributed.initialize failed ({spec.source}): "
                          f"{str(e).splitlines()[0][:200]}; JAXLM_DISTRIBUTED=off runs one "
                          "process, --coordinator/--num-processes/--process-id set it by "
                          "hand") from None
    finally:
        watchdog.cancel()
    local = jax.local_devices()
    print(f"jaxlm: process {jax.process_index()}/{jax.process_count()} on "
          f"{socket.gethostname()}: {len(local)} local {local[0].platform} device(s) "
          f"{[d.id for d in local]} of {jax.device_count()} ({spec.source}"
          f"{', detected by jax.distributed' if spec.auto else ''})",
          file=sys.stderr, flush=True)
