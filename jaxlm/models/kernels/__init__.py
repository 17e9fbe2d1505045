"""Attention kernels: pure-JAX chunked attention, Pallas TPU wrappers, structured masks."""
