"""FP8 scale discovery and validation, and the fused FP8 experts reader for the live-model loader.

Scales (both names are the dequant *multiplier*: ``W ≈ float(q) · S`` broadcast over blocks):

- ``<w>.weight_scale_inv`` (DeepSeek / transformers finegrained FP8) or ``<w>.weight_scale`` (compressed-tensors);
- fused/stacked ``<p>.experts.gate_up_proj_scale_inv`` ``[E, ⌈2I/bm⌉, ⌈H/bn⌉]`` (and ``down_proj_scale_inv``), used by
  fused weights and by the per-expert weights transformers 5.24 saves next to a fused scale.

A scale grid must be the ceil grid of the configured block (``quantization_config.weight_block_size``, compressed-tensors
``block_structure``, else 128×128), a per-tensor scalar, or per-row ``[R, 1]`` / ``[R]``; anything else, a missing scale,
e5m2 weights or a shape mismatch raises `FP8CheckpointError` naming the key, the shapes and the rule broken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from impl.checkpoint.expert_keys import (
    FUSED_OF_ROLE,
    PER_EXPERT_RE,
    ROLE_OF_PROJ,
    ExpertGroup,
    find_expert_groups,
)
from impl.checkpoint.header import (
    FP8_DTYPES,
    FP8_E5M2,
    Checkpoint,
    FP8CheckpointError,
    TensorReader,
    open_checkpoint,
    reader,
)

DEFAULT_FP8_BLOCK = (128, 128)
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # appended to "<w>.weight" or to a fused "<p>.experts.gate_up_proj"
ACTIVATION_SCALE_SUFFIXES = (".input_scale", ".activation_scale")


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
    scale, a grid that is not the ceil grid of the block (config block, else 128×128), a scalar or per-row, or a
    scale holding NaN / inf (`check_scale_values`). The merge and the live loader (`read_fp8_experts`) both call
    this, so both refuse the same checkpoints."""
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
    with reader(ckpt) as rd:
        check_scale_values(rd, out)
    return out


def check_scale_values(rd: TensorReader, entries: dict[str, FP8Entry]) -> None:
    """Every scale must be finite: a NaN / inf scale turns every weight of its block into NaN / inf (NaN logits in a
    live model, a NaN merge). FP8CheckpointError naming the scale, its shape and the count of bad values."""
    for scale_key in sorted({e.scale_key for e in entries.values()}):
        s = rd.get(scale_key).to(torch.float32)
        bad = int((~torch.isfinite(s)).sum())
        if bad:
            weights = sorted(e.weight_key for e in entries.values() if e.scale_key == scale_key)
            raise FP8CheckpointError(
                f"{scale_key}: {bad} of {s.numel()} scale values {list(s.shape)} are NaN or inf (scale of {weights[0]}"
                f"{f' and {len(weights) - 1} more' if len(weights) > 1 else ''}); such a checkpoint dequantizes to "
                "NaN / inf"
            )


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
