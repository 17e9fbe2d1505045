"""`jaxlm compile`: ahead-of-time compile the sharded train step for a TPU topology on any
machine (libtpu describes the chips, of one slice or several), and report per-chip memory,
FLOPs, whether it fits, and what crosses the network between slices."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np

from jaxlm import collectives
from jaxlm.config import Config, ConfigError
from jaxlm.setup import build
from jaxlm.train.state import count_params

GIB = 1024**3
# HBM per chip (GiB), by the device_kind libtpu reports.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95,
           "TPU v6 lite": 32, "TPU v6e": 32}


@dataclass
class CompileReport:
    topology: str
    device_kind: str
    chips: int
    slices: int
    mesh: dict[str, int]
    params: int
    params_bytes_per_chip: int
    opt_state_bytes_per_chip: int
    temp_bytes_per_chip: int
    total_bytes_per_chip: int
    hbm_bytes_per_chip: int | None
    fits: bool | None
    flops_per_step: float  # model FLOPs (6N + attention), all chips
    xla_flops_per_step: float  # XLA's cost analysis; counts a scanned layer's body once
    compile_seconds: float
    # Bytes per collective kind that cross slices (DCN), as written in one slice's program.
    dcn_bytes: dict[str, int]

    def table(self) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB"
        hbm = g(self.hbm_bytes_per_chip) if self.hbm_bytes_per_chip else "unknown"
        verdict = {True: "FITS", False: "DOES NOT FIT", None: "unknown HBM size"}[self.fits]
        slices = f" in {self.slices} slices" if self.slices > 1 else ""
        dcn = "  ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in self.dcn_bytes.items() if v)
        return "\n".join([
            f"topology        {self.topology} ({self.chips} × {self.device_kind}{slices})",
            f"mesh            {self.mesh}",
            f"parameters      {self.params / 1e9:.3f} B",
            f"params/chip     {g(self.params_bytes_per_chip)}",
            f"opt state/chip  {g(self.opt_state_bytes_per_chip)}",
            f"temporaries     {g(self.temp_bytes_per_chip)}",
            f"total/chip      {g(self.total_bytes_per_chip)}  of {hbm}  -> {verdict}",
            f"FLOPs/step      {self.flops_per_step:.3e} (6N + attention; XLA's cost "
            f"analysis: {self.xla_flops_per_step:.3e})",
            f"compile time    {self.compile_seconds:.1f} s",
            *([f"across slices   {dcn or 'nothing'} (DCN, per step; a scanned layer's "
               "collectives counted once)"] if self.slices > 1 else []),
        ])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def topology_devices(topology: str, slices: int = 1) -> list:
    """Devices of a TPU topology such as 'v5p:4x4x4', `slices` times over (a multislice run;
    each device has its `slice_index`). Needs libtpu: pip install jaxlm[tpu]."""
    # Describing a topology needs no TPU; don't contend for the TPU lockfile with other
    # processes on this machine.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                 num_slices=slices).devices)
    except Exception as e:  # missing libtpu or a bad name: one message either way
        raise ConfigError(f"cannot describe TPU topology '{topology}' ({str(e).splitlines()[0]}"
                          f"); install the [tpu] extra and use names like v5e:4x4 or "
                          "v5p:4x4x4") from None


def _bytes_per_chip(tree: Any) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


def compile_for_topology(cfg: Config, topology: str, slices: int = 1) -> CompileReport:
    devices = topology_devices(topology, slices)
    setup = build(cfg, devices=devices)
    abstract = setup.abstract_state
    B, T = cfg.train.batch_size, cfg.train.seq_len
    with jax.set_mesh(setup.mesh):
        t0 = time.time()
        compiled = setup.lower().compile()
        seconds = time.time() - t0
    mesh = setup.mesh
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    params_b = _bytes_per_chip(abstract.params)
    opt_b = _bytes_per_chip(abstract.opt_state)
    temp_b = int(mem.temp_size_in_bytes)
    # Arguments are donated, so outputs alias them: peak ≈ arguments + temporaries.
    total_b = int(mem.argument_size_in_bytes) + temp_b
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    hbm_b = hbm * GIB if hbm else None
    slice_of = [getattr(d, "slice_index", 0) for d in mesh.devices.flat]
    return CompileReport(
        topology=topology, device_kind=kind, chips=len(devices), slices=slices,
        mesh=dict(mesh.shape),
        params=count_params(abstract.params), params_bytes_per_chip=params_b,
        opt_state_bytes_per_chip=opt_b, temp_bytes_per_chip=temp_b,
        total_bytes_per_chip=total_b, hbm_bytes_per_chip=hbm_b,
        fits=None if hbm_b is None else total_b <= hbm_b,
        flops_per_step=setup.flops_per_token() * B * T,
        xla_flops_per_step=float(cost.get("flops", 0.0)) * len(devices),
        compile_seconds=seconds,
        dcn_bytes=collectives.dcn_bytes(compiled.as_text(), slice_of) if slices > 1 else {})
