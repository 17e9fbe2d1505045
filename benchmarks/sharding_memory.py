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
from jaxlm import sharding  # noqa: E402
from jaxlm.config import MeshConfig  # noqa: E402
from jaxlm.models.transformer import build_model  # noqa: E402
from jaxlm.optim import lr_schedule, make_optimizer  # noqa: E402
from jaxlm.train.state import count_params, state_shardings  # noqa: E402
from jaxlm.train.step import jit_train_step, make_train_step  # noqa: E402

SHAPE = ["model.num_layers=4", "model.d_model=512", "model.num_heads=8", "model.d_ff=2048",
         "model.vocab_size=8192", "model.max_seq_len=128", "train.seq_len=128",
         "train.batch_size=8"]


def state_bytes_per_device(mesh_shape: tuple[int, int, int]) -> tuple[int, int]:
    cfg = config_lib.load(None, SHAPE)
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), jax.devices()[:n])
    model, tx = build_model(cfg.model), make_optimizer(cfg.optim, 10)
    with jax.set_mesh(mesh):
        abstract, shardings = state_shardings(model, tx, mesh)
        step = jit_train_step(make_train_step(model, tx, lr_schedule(cfg.optim, 10)),
                              shardings, mesh)
        bs = sharding.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((8, 128), dt, sharding=bs)
                 for k, dt in [("inputs", np.int32), ("targets", np.int32),
                               ("loss_mask", np.float32)]}
        mem = step.lower(abstract, batch).compile().memory_analysis()
    batch_bytes = 3 * 8 * 128 * 4 // (mesh_shape[0] * mesh_shape[1])
    return mem.argument_size_in_bytes - batch_bytes, count_params(abstract.params)


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
