"""Per-device bytes of parameters + optimizer state in the compiled train step (XLA's memory
analysis of the arguments) as fsdp or tensor parallelism grows, on simulated CPU devices.

    python benchmarks/sharding_memory.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import setup  # noqa: E402
from jaxlm.train.state import count_params  # noqa: E402

SHAPE = ["model.num_layers=4", "model.d_model=512", "model.num_heads=8", "model.d_ff=2048",
         "model.vocab_size=8192", "model.max_seq_len=128", "train.seq_len=128",
         "train.batch_size=8", "train.steps=10"]


def state_bytes_per_device(mesh_shape: tuple[int, int, int]) -> tuple[int, int]:
    data, fsdp, tensor = mesh_shape
    cfg = config_lib.load(None, SHAPE + [f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                         f"mesh.tensor={tensor}"])
    s = setup.build(cfg, devices=jax.devices()[:int(np.prod(mesh_shape))])
    with jax.set_mesh(s.mesh):
        batch = s.abstract_batch()
        mem = s.train_step.lower(s.abstract_state, batch).compile().memory_analysis()
    batch_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(batch)) // (data * fsdp)
    return mem.argument_size_in_bytes - batch_bytes, count_params(s.abstract_state.params)


def main() -> None:
    one, params = state_bytes_per_device((1, 1, 1))
    print(f"model: {params / 1e6:.1f}M parameters; params + AdamW state = {one / 2**20:.1f} MiB "
          f"on one device (jax {jax.__version__})\n")
    print("| mesh (data×fsdp×tensor) | MiB per device | fraction of one device | ideal |")
    print("|---|---:|---:|---:|")
    for shape in [(1, 1, 1), (1, 2, 1), (1, 4, 1), (1, 8, 1), (1, 1, 2), (1, 1, 4), (1, 1, 8),
                  (1, 2, 4), (2, 2, 2)]:
        b, _ = state_bytes_per_device(shape)
        ideal = 1 / (shape[1] * shape[2])
        print(f"| {'×'.join(map(str, shape))} | {b / 2**20:.2f} | {b / one:.3f} | {ideal:.3f} |")


if __name__ == "__main__":
    main()
