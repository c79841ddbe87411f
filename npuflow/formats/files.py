"""Reading safetensors files with plain file reads into tensors of this process's own memory (no mapping).

safe_open maps the whole file: its tensors are views of the mapping, and every page a reader touches counts
in the process's RSS for as long as any tensor of that file lives (the file stays mapped). Rank-local
loading (runtime/shard_load.py) reads slices this way; load_quantized on the CPU reads whole tensors this
way (formats.read_tensors(mapped=False)), so the weights a backend then replaces (fused, repacked) are
really freed.
"""

from __future__ import annotations

import json
import math

import torch

from npuflow.core.errors import NpuflowError

# safetensors layout (huggingface/safetensors README, "Format"): 8 bytes little-endian N, an N-byte JSON header
# {name: {"dtype", "shape", "data_offsets": [begin, end]}} with offsets into the byte buffer that follows it
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
CHUNK_BYTES = 8 << 20  # row-parallel slices are read this many bytes of whole rows at a time


def read_header(f) -> tuple[dict, int]:
    """The header of an open safetensors file and where its tensor bytes start."""
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_into(f, offset: int, out: torch.Tensor) -> None:
    f.seek(offset)
    view = out.view(torch.uint8).reshape(-1).numpy()
    if f.readinto(view) != view.nbytes:
        raise NpuflowError(f"{f.name}: truncated at byte {offset} (re-download or re-quantize it)")


def read_slice(f, info: dict, base: int, dim: int | None, part: tuple[int, int],
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows or columns [a, b) of one tensor (dim None: all of it), read with plain file reads, CHUNK_BYTES of
    whole rows at a time, into this rank's own memory; float tensors land in `dtype` chunk by chunk (no
    second full-size copy). Not safe_open's get_slice: that maps the whole file, and a column slice of a
    row-major tensor touches every page of it, which then counts in the rank's RSS while the file stays
    mapped (measured: +330 MiB per TP=2 rank of the 1B W8A16 model)."""
    src, shape = ST_DTYPES[info["dtype"]], list(info["shape"])
    start = base + info["data_offsets"][0]
    dst = dtype if dtype is not None and src.is_floating_point else src
    rows_total = shape[0] if shape else 1
    width = math.prod(shape[1:]) if len(shape) > 1 else 1  # elements of one row (dim 0 entry)
    r0, r1 = part if dim == 0 else (0, rows_total)
    c0, c1 = part if dim == 1 else (0, width)
    out = torch.empty(r1 - r0, c1 - c0, dtype=dst)
    if dst == src and (c0, c1) == (0, width):  # whole rows as stored: straight into this rank's tensor
        _read_into(f, start + r0 * width * src.itemsize, out)
        return out if dim == 1 else out.reshape([r1 - r0, *shape[1:]] if shape else [])
    step = max(1, CHUNK_BYTES // (width * src.itemsize))
    for r in range(r0, r1, step):
        rows = torch.empty(min(step, r1 - r), width, dtype=src)
        _read_into(f, start + r * width * src.itemsize, rows)
        out[r - r0 : r - r0 + rows.shape[0]] = rows[:, c0:c1]
    if dim == 1:
        return out
    return out.reshape([r1 - r0, *shape[1:]] if shape else [])
