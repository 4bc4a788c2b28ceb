"""Safetensors checkpoint directories: the header scan over shards and the tensor reader.

Only safetensors is read (never pickle). Headers are parsed directly (8-byte little-endian header length + JSON) and
validated at scan time; tensors are read with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024

FP8_E4M3 = "F8_E4M3"
FP8_E5M2 = "F8_E5M2"
FP8_DTYPES = (FP8_E4M3, FP8_E5M2)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    FP8_E4M3: torch.float8_e4m3fn,
    FP8_E5M2: torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DTYPE_SIZES = {k: torch.empty(0, dtype=v).element_size() for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory, index or safetensors header that cannot be read as a consistent checkpoint."""


class FP8CheckpointError(CheckpointError):
    """An FP8 weight whose format, scale tensor or scale grid breaks a rule (see module docstring)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by its shard's header: dtype is the safetensors name ("BF16", "F8_E4M3", ...)."""

    key: str
    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (``<u64 LE n><n bytes JSON>``) without reading tensor data; validates offsets."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: shorter than the 8-byte safetensors header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes) or {_MAX_HEADER}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for key, entry in header.items():
        dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        info = TensorInfo(key, path.name, dtype, shape)
        if end - start != info.nbytes or end > data_len:
            raise CheckpointError(
                f"{path}: tensor {key!r} {dtype} {list(shape)} needs {info.nbytes} bytes, header offsets "
                f"[{start}, {end}) in a {data_len}-byte data section"
            )
        out[key] = info
    return out


@dataclass
class Checkpoint:
    """A checkpoint directory: shard files, every tensor's header info, ``config.json`` (``{}`` if absent)."""

    root: Path
    shards: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    config: dict
    indexed: bool

    def keys_in(self, shard: str) -> list[str]:
        return [k for k, t in self.tensors.items() if t.shard == shard]

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise CheckpointError(f"{self.root}: no tensor {key!r} in any shard")
        return self.tensors[key]

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def quant_method(self) -> str | None:
        return (self.config.get("quantization_config") or {}).get("quant_method")


def open_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    """Scan ``model.safetensors.index.json`` (every mapped key must be in its shard's header) or ``model.safetensors``."""
    root = Path(ckpt_dir)
    config_path = root / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if (root / INDEX_NAME).is_file():
        weight_map = json.loads((root / INDEX_NAME).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{root / INDEX_NAME}: no 'weight_map' object")
        shards = tuple(sorted(set(weight_map.values())))
        tensors = _scan_shards(root, shards)
        for key, shard in weight_map.items():
            if key not in tensors or tensors[key].shard != shard:
                where = tensors[key].shard if key in tensors else "no shard"
                raise CheckpointError(f"{root / INDEX_NAME}: maps {key!r} to {shard} but its header is in {where}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise CheckpointError(f"{root / INDEX_NAME}: shard tensors missing from the weight_map: {extra[:5]}")
        return Checkpoint(root, shards, dict(sorted(tensors.items())), config, True)
    if (root / SINGLE_NAME).is_file():
        tensors = _scan_shards(root, (SINGLE_NAME,))
        return Checkpoint(root, (SINGLE_NAME,), dict(sorted(tensors.items())), config, False)
    raise CheckpointError(f"{root}: neither {INDEX_NAME} nor {SINGLE_NAME} found")


def _scan_shards(root: Path, shards: tuple[str, ...]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        if not (root / shard).is_file():
            raise CheckpointError(f"{root}: shard {shard} listed in the index does not exist")
        for key, info in read_header(root / shard).items():
            if key in tensors:
                raise CheckpointError(f"{root}: tensor {key!r} is in both {tensors[key].shard} and {shard}")
            tensors[key] = info
    return tensors


class TensorReader:
    """Reads tensors of one checkpoint through ``safe_open`` handles kept open until `close` (mmap-backed)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._handles: dict[str, object] = {}

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.ckpt.info(key).shard
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.ckpt.root / shard), framework="pt", device="cpu")
        return self._handles[shard].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


@contextmanager
def reader(ckpt: Checkpoint) -> Iterator[TensorReader]:
    r = TensorReader(ckpt)
    try:
        yield r
    finally:
        r.close()
