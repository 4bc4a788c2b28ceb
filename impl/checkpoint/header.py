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
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
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
    """An FP8 weight whose format, scale tensor, scale grid or scale values break a rule (`impl.checkpoint.fp8_scales`)."""


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
    """Parse and validate a safetensors header (``<u64 LE n><n bytes JSON><data>``) without reading tensor data.

    At least as strict as ``safetensors.safe_open`` (safetensors 0.8): the JSON is an object of tensor entries
    ``{"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end]}`` (ints >= 0, not floats or bools) plus
    an optional ``__metadata__`` object of strings; ``end - begin`` is the tensor's byte size; the entries, sorted by
    offset, cover the data section exactly (no hole, no overlap, no trailing bytes). Stricter: duplicate JSON keys,
    non-UTF-8 headers and dtypes this tool cannot read are refused too. Every failure is a CheckpointError naming
    the file, the tensor and the rule.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: shorter than the 8-byte safetensors header length ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes) or {_MAX_HEADER}")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKey) as err:
        raise CheckpointError(f"{path}: header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings, got {meta!r}"[:300])
    out = {key: _tensor_info(path, key, entry) for key, entry in header.items()}
    _check_coverage(path, header, size - 8 - n)
    return out


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(path: Path, key: str, entry) -> TensorInfo:
    if not isinstance(entry, dict) or any(f not in entry for f in ("dtype", "shape", "data_offsets")):
        raise CheckpointError(f"{path}: tensor {key!r} entry {entry!r} lacks dtype, shape or data_offsets"[:300])
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(
            f"{path}: tensor {key!r} has unsupported dtype {dtype!r} (readable: {sorted(DTYPE_SIZES)})"
        )
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {key!r} shape {shape!r} is not a list of integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {key!r} data_offsets {offsets!r} are not two integers >= 0")
    info = TensorInfo(key, path.name, dtype, tuple(shape))
    begin, end = offsets
    if end < begin or end - begin != info.nbytes:
        raise CheckpointError(
            f"{path}: tensor {key!r} {dtype} {shape} needs {info.nbytes} bytes but data_offsets are [{begin}, {end})"
        )
    return info


def _check_coverage(path: Path, header: dict, data_len: int) -> None:
    """The tensors' byte ranges, sorted, must tile ``[0, data_len)`` exactly."""
    pos = 0
    for key, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a hole [{pos}, {begin})"
            raise CheckpointError(f"{path}: tensor {key!r} at data_offsets [{begin}, {end}) {what}")
        pos = end
    if pos != data_len:
        what = "runs past the end of the file" if pos > data_len else f"leaves {data_len - pos} trailing bytes"
        raise CheckpointError(f"{path}: the tensors cover {pos} bytes of a {data_len}-byte data section ({what})")


def read_json(path: Path, error: type[Exception] = CheckpointError) -> dict:
    """A JSON object file; ``error`` naming the file when it is not valid JSON (or not UTF-8) or not an object."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise error(f"{path}: must be a JSON object, got {type(value).__name__}")
    return value


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
    """Scan ``model.safetensors.index.json`` (every mapped key must be in its shard's header, shard names plain file
    names in ``ckpt_dir``) or ``model.safetensors``; every shard's header is validated (`read_header`) here, before
    anything reads or writes tensor data."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    config_path = root / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if (root / INDEX_NAME).is_file():
        weight_map = read_json(root / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{root / INDEX_NAME}: no 'weight_map' object")
        for key, shard in weight_map.items():
            _check_shard_name(root, key, shard)
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


def _check_shard_name(root: Path, key, shard) -> None:
    """A shard must be a plain ``*.safetensors`` file name: a path (``../x``, ``/abs``, ``sub/x``) would read outside
    the checkpoint and make the merge write outside its output directory."""
    if not isinstance(key, str) or not isinstance(shard, str):
        raise CheckpointError(f"{root / INDEX_NAME}: weight_map entry {key!r}: {shard!r} is not a string to a string")
    if shard in ("", ".", "..") or "/" in shard or "\\" in shard or Path(shard).name != shard:
        raise CheckpointError(
            f"{root / INDEX_NAME}: path traversal refused: {key!r} maps to {shard!r}, which is not a file name "
            f"inside {root}"
        )
    if not shard.endswith(".safetensors"):
        raise CheckpointError(f"{root / INDEX_NAME}: {key!r} maps to {shard!r}, not a .safetensors file")


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
