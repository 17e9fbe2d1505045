"""The collectives of a compiled XLA program, read from its HLO text: bytes per kind, and
which of them cross the data-center network (DCN) between slices.

A program compiled for one set of devices names the devices of each collective by replica
groups of partition ids: a list `{{0,1},{2,3}}`, the iota form `[2,2]<=[4]`, or a mesh of axes
with the axes a group spans (`mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'a'}`); a
collective crosses DCN when one of its groups holds devices of two slices. A program compiled
for a multislice TPU is one slice's program: its DCN collectives are host transfers tagged
`_xla_megascale_transfer_type` (ALL_REDUCE, ALL_GATHER, ...)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
# `%name = TYPE op(` where TYPE is one shape or a tuple of shapes; -start ops are async.
_COLLECTIVE_LINE = re.compile(
    r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))?"
                          r" \{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_MEGASCALE_SEND = re.compile(r"=\s*\((.*?)\)\s+send\(.*_xla_megascale_transfer_type=\"(\w+)\"")


def shape_bytes(type_text: str) -> int:
    """Bytes of the array shapes in an HLO type (`f32[8,4]` or a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _line_bytes(line: str, match: re.Match) -> int:
    sizes = [shape_bytes(t.group(0)) for t in _SHAPE.finditer(match.group(1))]
    # An async start's tuple also holds its operand: count the larger half.
    return max(sizes, default=0) if "-start(" in line else sum(sizes)


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each device's program moves per step, by collective kind, from the output
    shapes of the collectives in compiled HLO text (async -start ops counted once). A loop
    body's collectives appear once in the text: pass the unrolled program
    (bench.counting_executable) to count every layer."""
    out = {k: 0 for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE_LINE.search(line)
        if m and "-done(" not in line:
            out[m.group(2)] += _line_bytes(line, m)
    return out


def _iota(dims: str, perm: str | None) -> np.ndarray:
    ids = np.arange(int(np.prod([int(x) for x in dims.split(",")])))
    ids = ids.reshape([int(x) for x in dims.split(",")])
    return ids.transpose([int(x) for x in perm.split(",")]) if perm else ids


def _mesh_groups(m: re.Match) -> list[list[int]] | None:
    """Groups of the mesh form; None for a device list it does not read."""
    axes = [(a.strip("'"), int(n)) for a, n in
            (item.rsplit("=", 1) for item in m.group(1).split(","))]
    sizes = [n for _, n in axes]
    ids_text = m.group(2)
    if ids_text is None:
        ids = np.arange(int(np.prod(sizes)))
    elif iota := re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", ids_text):
        ids = _iota(iota.group(1), iota.group(2))
    else:
        return None
    spans = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in m.group(3)]
    keep = [i for i in range(len(axes)) if i not in spans]
    ids = ids.reshape(sizes).transpose(keep + spans)
    return ids.reshape(-1, int(np.prod([sizes[i] for i in spans]))).tolist()


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of one collective instruction (all devices when it names none, or
    in a form this does not read)."""
    if (m := _GROUPS_MESH.search(line)) and (groups := _mesh_groups(m)) is not None:
        return groups
    if m := _GROUPS_IOTA.search(line):
        shape = [int(x) for x in m.group(1).split(",")]
        return _iota(m.group(2), m.group(3)).reshape(shape).tolist()
    if m := _PAIRS.search(line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    if (m := _GROUPS_LIST.search(line)) and m.group(1):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}",
                                                                        m.group(1))]
    return [list(range(num_devices))]


def dcn_bytes(hlo_text: str, slice_of: Sequence[int]) -> dict[str, int]:
    """Bytes per collective kind that cross slices, where `slice_of[i]` is the slice of the
    program's device (partition) i. Counts megascale host transfers of a multislice TPU
    program, or collectives whose replica groups span slices."""
    out = {k: 0 for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        if m := _MEGASCALE_SEND.search(line):
            kind = m.group(2).lower().replace("_", "-")
            first = _SHAPE.search(m.group(1))  # the data; then a context id and a token
            out[kind] = out.get(kind, 0) + (shape_bytes(first.group(0)) if first else 0)
            continue
        m = _COLLECTIVE_LINE.search(line)
        if not m or "-done(" in line:
            continue
        groups = replica_groups(line, len(slice_of))
        if any(len({slice_of[i] for i in g}) > 1 for g in groups):
            out[m.group(2)] += _line_bytes(line, m)
    return out
