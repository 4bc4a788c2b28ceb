"""Streaming safetensors shard writer: the header first (from declared specs), then tensor by tensor."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from impl.checkpoint.header import DTYPE_NAMES, DTYPE_SIZES, CheckpointError


@dataclass(frozen=True)
class OutSpec:
    """One tensor of an output shard: its key, safetensors dtype name and shape (known before it is computed)."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def write_shard(path: str | Path, specs: list[OutSpec], produce, metadata: dict | None = None) -> int:
    """Write a safetensors file tensor by tensor: the header is computed from ``specs`` first, then ``produce(key)``
    is called once per key (in header order) and its bytes appended, so memory holds one tensor at a time.

    Order: by element size (largest first) then key, which keeps every tensor aligned to its element size (the
    header is space-padded to 8 bytes). ``produce`` must return exactly the declared dtype and shape, else
    CheckpointError. Returns the data size in bytes.
    """
    order = sorted(specs, key=lambda s: (-DTYPE_SIZES[s.dtype], s.key))
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in order:
        header[s.key] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in order:
            t = produce(s.key)
            if DTYPE_NAMES.get(t.dtype) != s.dtype or tuple(t.shape) != s.shape:
                raise CheckpointError(
                    f"{path}: tensor {s.key!r} produced as {t.dtype} {list(t.shape)}, declared {s.dtype} {list(s.shape)}"
                )
            f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return offset
