"""Safetensors checkpoints on disk: header scan over shards, expert key schemes, FP8 scale discovery and validation.

Only safetensors is read (never pickle). Headers are parsed directly (8-byte little-endian header length + JSON);
tensors are read with ``safetensors.safe_open``.

Expert key schemes (``E`` experts, ``I`` expert intermediate size, ``H`` hidden size):

- per-expert (transformers 4.x, and what 5.x ``save_pretrained`` writes): ``<p>.experts.{e}.{gate,up,down}_proj.weight``
  or ``<p>.experts.{e}.{w1,w3,w2}.weight`` (Mixtral/LFM2, incl. legacy ``block_sparse_moe``); gate/up ``[I, H]``,
  down ``[H, I]``. The model's fused view is ``gate_up [E, 2I, H] = stack_e(cat(gate_e, up_e))``, ``down [E, H, I]``.
- fused (GPT-OSS, Gemma4, ...): ``<p>.experts.gate_up_proj`` ``[E, 2I, H]`` (fused_linear) or ``[E, H, 2I]`` (gpt_oss),
  ``<p>.experts.down_proj`` ``[E, H, I]`` or ``[E, I, H]``.

FP8 scales (both names are the dequant *multiplier*: ``W ≈ float(q) · S`` broadcast over blocks):

- ``<w>.weight_scale_inv`` (DeepSeek / transformers finegrained FP8) or ``<w>.weight_scale`` (compressed-tensors);
- fused/stacked ``<p>.experts.gate_up_proj_scale_inv`` ``[E, ⌈2I/bm⌉, ⌈H/bn⌉]`` (and ``down_proj_scale_inv``), used by
  fused weights and by the per-expert weights transformers 5.24 saves next to a fused scale.

A scale grid must be the ceil grid of the configured block (``quantization_config.weight_block_size``, compressed-tensors
``block_structure``, else 128×128), a per-tensor scalar, or per-row ``[R, 1]`` / ``[R]``; anything else, a missing scale,
e5m2 weights or a shape mismatch raises `FP8CheckpointError` naming the key, the shapes and the rule broken.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reference.layout import FUSED_LINEAR, GPT_OSS

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_FP8_BLOCK = (128, 128)
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

PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
FUSED_RE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")
ROLE_OF_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
FUSED_OF_ROLE = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # appended to "<w>.weight" or to a fused "<p>.experts.gate_up_proj"
ACTIVATION_SCALE_SUFFIXES = (".input_scale", ".activation_scale")


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


def fp8_block_size(config: dict) -> tuple[int, int] | None:
    """The FP8 weight block ``(bm, bn)`` a config declares: finegrained ``weight_block_size`` or compressed-tensors
    ``config_groups[*].weights.block_structure``; None when the config names none."""
    qc = config.get("quantization_config") or {}
    if qc.get("weight_block_size"):
        bm, bn = qc["weight_block_size"]
        return int(bm), int(bn)
    for group in (qc.get("config_groups") or {}).values():
        structure = (group.get("weights") or {}).get("block_structure")
        if structure:
            bm, bn = structure
            return int(bm), int(bn)
    return None


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


# --- expert groups -------------------------------------------------------------------------------------------


@dataclass
class ExpertGroup:
    """One experts module on disk.

    prefix: disk prefix (``model.layers.0.block_sparse_moe.experts``); module_path: the 5.x model's module path
    (``block_sparse_moe`` -> ``mlp``); scheme: "per_expert" or "fused"; layout: FUSED_LINEAR or GPT_OSS (the model's
    fused view); keys: per_expert ``{"gate": [k_0..k_E-1], "up": [...], "down": [...]}``, fused
    ``{"gate_up": k, "down": k}``; param_shapes: the fused view ``{"gate_up": (E, 2I, H) | (E, H, 2I), "down": ...}``.
    """

    prefix: str
    module_path: str
    scheme: str
    layout: str
    num_experts: int
    keys: dict[str, object]
    param_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def module_path_of(prefix: str) -> str:
    """The transformers 5.x module path of a disk expert prefix (legacy Mixtral ``block_sparse_moe`` -> ``mlp``)."""
    return re.sub(r"\.block_sparse_moe\.experts$", ".mlp.experts", prefix)


def find_expert_groups(ckpt: Checkpoint) -> dict[str, ExpertGroup]:
    """Every experts module on disk, keyed by disk prefix; checks expert indices are 0..E-1 and shapes agree."""
    per: dict[str, dict[str, dict[int, str]]] = {}
    fused: dict[str, dict[str, str]] = {}
    for key in ckpt.tensors:
        m = PER_EXPERT_RE.match(key)
        if m:
            role = ROLE_OF_PROJ[m["proj"]]
            per.setdefault(m["prefix"], {}).setdefault(role, {})[int(m["e"])] = key
            continue
        m = FUSED_RE.match(key)
        if m:
            fused.setdefault(m["prefix"], {})[m["param"].removesuffix("_proj")] = key
    groups = {p: _per_expert_group(ckpt, p, roles) for p, roles in per.items()}
    for p, params in fused.items():
        if p in groups:
            raise CheckpointError(f"{ckpt.root}: experts {p!r} have both per-expert and fused keys")
        groups[p] = _fused_group(ckpt, p, params)
    return groups


def check_against_config(ckpt: Checkpoint, groups: dict[str, ExpertGroup]) -> None:
    """Expert dims must match config.json: ``hidden_size`` = H and ``moe_intermediate_size`` (else
    ``intermediate_size``) = I, where the config has them; otherwise CheckpointError naming the key and shapes."""
    cfg = ckpt.config.get("text_config") or ckpt.config
    want_h = cfg.get("hidden_size")
    want_i = cfg.get("moe_intermediate_size", cfg.get("intermediate_size"))
    for g in groups.values():
        E, a, b = g.param_shapes["down"]
        H, I = (a, b) if g.layout == FUSED_LINEAR else (b, a)  # down [E, H, I] or gpt_oss [E, I, H]
        for name, got, want in (("hidden_size", H, want_h), ("moe_intermediate_size/intermediate_size", I, want_i)):
            if want is not None and got != want:
                key = g.keys["down"][0] if g.scheme == "per_expert" else g.keys["down"]
                raise CheckpointError(
                    f"{key}: expert down shape {[a, b]} ({g.layout}) gives {name} = {got}, config.json says {want}"
                )


def _per_expert_group(ckpt: Checkpoint, prefix: str, roles: dict[str, dict[int, str]]) -> ExpertGroup:
    if set(roles) != {"gate", "up", "down"}:
        raise CheckpointError(f"{ckpt.root}: experts {prefix!r} have roles {sorted(roles)}, need gate, up and down")
    E = max(max(ids) for ids in roles.values()) + 1
    for role, ids in roles.items():
        if sorted(ids) != list(range(E)):
            missing = sorted(set(range(E)) - set(ids))
            raise CheckpointError(
                f"{ckpt.root}: experts {prefix!r} role {role}: expert indices {missing} missing (E={E})"
            )
    keys = {role: [ids[e] for e in range(E)] for role, ids in roles.items()}
    shapes = {role: {ckpt.info(k).shape for k in ks} for role, ks in keys.items()}
    if any(len(s) != 1 for s in shapes.values()) or shapes["gate"] != shapes["up"]:
        raise CheckpointError(f"{ckpt.root}: experts {prefix!r} per-expert shapes disagree: {shapes}")
    (I, H), (H2, I2) = next(iter(shapes["gate"])), next(iter(shapes["down"]))
    if (H, I) != (H2, I2):
        raise CheckpointError(
            f"{ckpt.root}: experts {prefix!r}: gate/up [I, H] = {[I, H]} and down [H, I] = {[H2, I2]} disagree"
        )
    return ExpertGroup(
        prefix,
        module_path_of(prefix),
        "per_expert",
        FUSED_LINEAR,
        E,
        keys,
        {"gate_up": (E, 2 * I, H), "down": (E, H, I)},
    )


def _fused_group(ckpt: Checkpoint, prefix: str, params: dict[str, str]) -> ExpertGroup:
    if set(params) != {"gate_up", "down"}:
        raise CheckpointError(f"{ckpt.root}: fused experts {prefix!r} have {sorted(params)}, need gate_up and down")
    gu, dn = ckpt.info(params["gate_up"]).shape, ckpt.info(params["down"]).shape
    if len(gu) != 3 or len(dn) != 3 or gu[0] != dn[0]:
        raise CheckpointError(
            f"{ckpt.root}: fused experts {prefix!r}: gate_up {list(gu)}, down {list(dn)} not [E, ., .]"
        )
    if gu[1] == 2 * dn[2] and gu[2] == dn[1]:
        layout = FUSED_LINEAR  # gate_up [E, 2I, H], down [E, H, I]
    elif gu[2] == 2 * dn[1] and gu[1] == dn[2]:
        layout = GPT_OSS  # gate_up [E, H, 2I], down [E, I, H]
    else:
        raise CheckpointError(
            f"{ckpt.root}: fused experts {prefix!r}: gate_up {list(gu)} and down {list(dn)} fit neither "
            "[E,2I,H]/[E,H,I] (fused_linear) nor [E,H,2I]/[E,I,H] (gpt_oss)"
        )
    if ckpt.model_type == "gpt_oss" and layout != GPT_OSS:
        raise CheckpointError(f"{ckpt.root}: model_type gpt_oss but {prefix!r} shapes are {layout}")
    return ExpertGroup(
        prefix, module_path_of(prefix), "fused", layout, gu[0], dict(params), {"gate_up": gu, "down": dn}
    )


# --- FP8 scale discovery and validation ----------------------------------------------------------------------


@dataclass(frozen=True)
class FP8Entry:
    """How one FP8 weight dequantizes: ``W = float(q) · S`` on its block grid.

    weight_key / scale_key: the tensors; block: ``(bm, bn)`` (per-tensor = ``(R, C)``, per-row = ``(1, C)``);
    expert: for a per-expert weight under a stacked scale ``S [E, gr, gc]``, its index ``e`` (else None);
    row_offset: its first row in the virtual matrix the scale covers (``I`` for up under a fused gate_up scale, else 0);
    virtual_rows: rows of that virtual matrix (``2I`` for gate/up under a fused scale; else the weight's rows).
    """

    weight_key: str
    scale_key: str
    block: tuple[int, int]
    expert: int | None = None
    row_offset: int = 0
    virtual_rows: int | None = None


def _scale_candidates(key: str, group: ExpertGroup | None, role: str | None) -> list[tuple[str, int | None, str]]:
    """(scale key, expert index or None, role) candidates for an FP8 weight key, in naming-convention order."""
    out = [(key + s, None, role) for s in SCALE_SUFFIXES]  # "<w>.weight_scale_inv", "<p>.experts.gate_up_proj_scale"
    m = PER_EXPERT_RE.match(key)
    if m and group is not None:
        fused = f"{m['prefix']}.{FUSED_OF_ROLE[ROLE_OF_PROJ[m['proj']]]}"
        out += [(fused + s, int(m["e"]), ROLE_OF_PROJ[m["proj"]]) for s in SCALE_SUFFIXES]
    return out


def discover_fp8(ckpt: Checkpoint) -> dict[str, FP8Entry]:
    """Every FP8 weight with its validated scale. Raises FP8CheckpointError on e5m2, a missing or doubly-named
    scale, or a grid that is not the ceil grid of the block (config block, else 128×128), a scalar or per-row."""
    groups = find_expert_groups(ckpt)
    member = _member_roles(groups)
    block = fp8_block_size(ckpt.config) or DEFAULT_FP8_BLOCK
    out: dict[str, FP8Entry] = {}
    for key, info in ckpt.tensors.items():
        if info.dtype not in FP8_DTYPES:
            continue
        if info.dtype == FP8_E5M2:
            raise FP8CheckpointError(
                f"{key}: dtype F8_E5M2 {list(info.shape)}; only float8_e4m3fn weights are supported (e5m2 refused: "
                "its 2-bit mantissa is not the format FP8 checkpoints are validated for)"
            )
        if len(info.shape) not in (2, 3):
            raise FP8CheckpointError(
                f"{key}: FP8 weight must be 2-D [R, C] or fused 3-D [E, R, C], got {list(info.shape)}"
            )
        group, role = member.get(key, (None, None))
        found = [c for c in _scale_candidates(key, group, role) if c[0] in ckpt.tensors]
        if not found:
            names = [c[0] for c in _scale_candidates(key, group, role)]
            raise FP8CheckpointError(f"{key}: FP8 weight {list(info.shape)} has no scale tensor; looked for {names}")
        if len(found) > 1:
            raise FP8CheckpointError(f"{key}: FP8 weight has several scale tensors {[c[0] for c in found]}; ambiguous")
        scale_key, expert, role = found[0]
        out[key] = _validate_scale(ckpt, key, scale_key, expert, role, group, block)
    return out


def _member_roles(groups: dict[str, ExpertGroup]) -> dict[str, tuple[ExpertGroup, str]]:
    out = {}
    for g in groups.values():
        if g.scheme == "per_expert":
            for role in ("gate", "up", "down"):
                out.update({k: (g, role) for k in g.keys[role]})
    return out


def _validate_scale(ckpt, key, scale_key, expert, role, group, block) -> FP8Entry:
    """Check ``scale_key`` against weight ``key``; returns the FP8Entry (block, expert, row offset)."""
    w, s = ckpt.info(key).shape, ckpt.info(scale_key).shape
    sdtype = ckpt.info(scale_key).dtype
    if sdtype not in ("F32", "BF16", "F16", "F64", "F8_E8M0"):
        raise FP8CheckpointError(f"{scale_key}: scale dtype {sdtype} is not a float (scale of {key} {list(w)})")
    if expert is not None:  # per-expert weight under a stacked fused scale [E, gr, gc]
        R, C = w
        vrows = 2 * R if role in ("gate", "up") else R
        if len(s) != 3 or s[0] != group.num_experts:
            raise FP8CheckpointError(
                f"{scale_key}: stacked scale {list(s)} for per-expert {key} {list(w)} must be [E={group.num_experts}, gr, gc]"
            )
        b = _grid_block(key, scale_key, (vrows, C), s[1:], block)
        return FP8Entry(key, scale_key, b, expert, R if role == "up" else 0, vrows)
    lead, R, C = (w[0], *w[1:]) if len(w) == 3 else (None, *w)
    grid = s
    if lead is not None:
        if len(s) != 3 or s[0] != lead:
            raise FP8CheckpointError(
                f"{scale_key}: scale {list(s)} for fused {key} {list(w)} must be [E={lead}, gr, gc]"
            )
        grid = s[1:]
    return FP8Entry(key, scale_key, _grid_block(key, scale_key, (R, C), grid, block), None, 0, R)


def _grid_block(key, scale_key, rc, grid, block) -> tuple[int, int]:
    """The block ``(bm, bn)`` that a scale grid implies for a matrix ``[R, C]``; raises if it fits no rule."""
    R, C = rc
    grid = tuple(grid)
    bm, bn = block
    if grid == (-(-R // bm), -(-C // bn)):
        return bm, bn
    if math.prod(grid) == 1 and len(grid) <= 2:
        return R, C  # per-tensor scalar ([], [1] or [1, 1])
    if grid in ((R, 1), (R,)):
        return 1, C  # per-row (compressed-tensors channel strategy)
    raise FP8CheckpointError(
        f"{scale_key}: scale grid {list(grid)} for weight {key} [R, C] = {[R, C]} matches no rule: expected the ceil "
        f"grid [⌈R/{bm}⌉, ⌈C/{bn}⌉] = {[-(-R // bm), -(-C // bn)]} of block {[bm, bn]} (quantization_config."
        "weight_block_size, else 128x128), a scalar, or per-row [R, 1]"
    )


def fp8_companion_keys(ckpt: Checkpoint, entries: dict[str, FP8Entry]) -> set[str]:
    """Keys that exist only to dequantize FP8 weights: their scales and static activation scales."""
    out = {e.scale_key for e in entries.values()}
    for key in entries:
        stem = key.removesuffix(".weight")
        out.update(stem + s for s in ACTIVATION_SCALE_SUFFIXES if stem + s in ckpt.tensors)
    return out


def expand_scale_rows(scale: torch.Tensor, entry: FP8Entry) -> torch.Tensor:
    """The 2-D scale grid of one FP8 weight (``[gr, gc]``); for a per-expert weight under a stacked scale, ``S[e]``."""
    s = scale.to(torch.float32)
    if entry.expert is not None:
        s = s[entry.expert]
    elif s.ndim == 3:
        return s
    if s.ndim == 0 or s.numel() == 1:
        return s.reshape(1, 1)
    if s.ndim == 1:
        return s.reshape(-1, 1)
    return s


# --- reader for the live-model loader ------------------------------------------------------------------------


def read_fp8_experts(ckpt_dir: str | Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]]:
    """FP8 experts fused to the model's layout: ``{module_path: {"gate_up": (q, scale_inv, block), "down": ...}}``.

    fused_linear: ``q`` e4m3fn ``[E, 2I, H]`` / ``[E, H, I]``, ``scale_inv`` fp32 ``[E, ⌈2I/bm⌉, ⌈H/bn⌉]`` /
    ``[E, ⌈H/bm⌉, ⌈I/bn⌉]``; gpt_oss fused checkpoints are returned in their own ``[E, H, 2I]`` layout. Per-expert
    scales are stacked (gate rows then up rows), which needs ``I % bm == 0`` so the gate and up grids tile the fused
    grid; otherwise FP8CheckpointError. Validates every scale first (see `discover_fp8`).
    """
    ckpt = open_checkpoint(ckpt_dir)
    entries = discover_fp8(ckpt)
    out = {}
    with reader(ckpt) as rd:
        for g in find_expert_groups(ckpt).values():
            fp8 = [k for k in _group_weight_keys(g) if k in entries]
            if not fp8:
                continue
            if len(fp8) != len(_group_weight_keys(g)):
                raise FP8CheckpointError(f"{g.prefix}: some expert weights are FP8 and some are not: FP8 {fp8[:3]}...")
            out[g.module_path] = _fused_fp8(g, entries, rd)
    return out


def _group_weight_keys(g: ExpertGroup) -> list[str]:
    if g.scheme == "fused":
        return [g.keys["gate_up"], g.keys["down"]]
    return [k for role in ("gate", "up", "down") for k in g.keys[role]]


def _fused_fp8(g: ExpertGroup, entries: dict[str, FP8Entry], rd: TensorReader) -> dict:
    if g.scheme == "fused":
        res = {}
        for name in ("gate_up", "down"):
            e = entries[g.keys[name]]
            res[name] = (rd.get(e.weight_key), rd.get(e.scale_key).to(torch.float32), e.block)
        return res
    gate, up, down = (g.keys[r] for r in ("gate", "up", "down"))
    q_gu = torch.stack([torch.cat([rd.get(a), rd.get(b)], 0) for a, b in zip(gate, up)])
    q_dn = torch.stack([rd.get(k) for k in down])
    return {
        "gate_up": (q_gu, *_stack_scales(g, entries, rd, gate, up)),
        "down": (q_dn, *_stack_scales(g, entries, rd, down)),
    }


def _stack_scales(g, entries, rd, *role_keys) -> tuple[torch.Tensor, tuple[int, int]]:
    """Stacked ``[E, gr, gc]`` scale for the fused view of one or two per-expert roles."""
    first = entries[role_keys[0][0]]
    if first.expert is not None:  # already a stacked fused scale (transformers 5.24 save)
        return rd.get(first.scale_key).to(torch.float32), first.block
    blocks = {entries[k].block for keys in role_keys for k in keys}
    if len(blocks) != 1:
        raise FP8CheckpointError(f"{g.prefix}: per-expert scale blocks differ {sorted(blocks)}; cannot fuse")
    (block,) = blocks
    rows = entries[role_keys[0][0]].virtual_rows  # I for gate (own scale: virtual rows == its rows)
    if len(role_keys) == 2 and rows % block[0] != 0:
        raise FP8CheckpointError(
            f"{g.prefix}: per-expert gate/up scales with block {list(block)} cannot be fused into one gate_up grid: "
            f"I = {rows} is not a multiple of bm = {block[0]} (a block would straddle gate and up)"
        )
    per_e = []
    for parts in zip(*role_keys):
        grids = [expand_scale_rows(rd.get(entries[k].scale_key), entries[k]) for k in parts]
        per_e.append(torch.cat(grids, 0))
    return torch.stack(per_e), block


# --- streaming shard writer ----------------------------------------------------------------------------------


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
