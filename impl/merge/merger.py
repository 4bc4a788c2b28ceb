"""`Merger`: produces every output tensor of one merge (base tensor + planned deltas; FP8 dequant, merge and requant)
and counts the deltas it applies."""

from __future__ import annotations

import torch

from impl.checkpoint import (
    DTYPE_NAMES,
    Checkpoint,
    FP8CheckpointError,
    FP8Entry,
    OutSpec,
    TensorReader,
    discover_fp8,
    expand_scale_rows,
    fp8_companion_keys,
)
from impl.errors import MergeError
from impl.merge.plan import MergePlan
from reference.fp8 import dequantize_fp8, requantize_fp8_block

MERGED_16BIT = "merged_16bit"
FP8_METHOD = "fp8"
METHODS = (MERGED_16BIT, FP8_METHOD)


class Merger:
    """Produces every output tensor of one merge (see `merge_adapter`); counts the deltas it applies."""

    def __init__(self, ckpt: Checkpoint, plan: MergePlan, method: str, out_dtype: torch.dtype):
        self.ckpt, self.plan, self.method, self.out_dtype = ckpt, plan, method, out_dtype
        self.fp8 = discover_fp8(ckpt)
        self.companions = fp8_companion_keys(ckpt, self.fp8)
        self.units = _quant_units(ckpt, self.fp8)
        self.scale_units: dict[str, list] = {}
        for unit in self.units:
            self.scale_units.setdefault(unit[0], []).append(unit)
        self.reader = TensorReader(ckpt)
        self.applied: dict[str, int] = {}
        self._cache: dict = {}

    # output layout
    def dropped(self, key: str) -> bool:
        return self.method == MERGED_16BIT and key in self.companions

    def spec(self, key: str) -> OutSpec:
        info = self.ckpt.tensors[key]
        if key in self.fp8 and self.method == MERGED_16BIT:
            return OutSpec(key, _dtype_name(self.out_dtype), info.shape)
        if key in self.scale_units and self._scale_changes(key):
            return OutSpec(key, "F8_E8M0" if info.dtype == "F8_E8M0" else "F32", info.shape)
        return OutSpec(key, info.dtype, info.shape)

    def _scale_changes(self, scale_key: str) -> bool:
        return self.method == FP8_METHOD and any(self._unit_has_delta(u) for u in self.scale_units[scale_key])

    def _unit_has_delta(self, unit) -> bool:
        return any(e.weight_key in self.plan.targets for e in self.units[unit])

    # tensors
    def produce(self, key: str) -> torch.Tensor:
        if key in self.fp8:
            return self._fp8_weight(key)
        if key in self.scale_units and self._scale_changes(key):
            return self._new_scale(key)
        t = self.reader.get(key)
        if key not in self.plan.targets:
            return t
        return _cast(key, self._finite(key, t.to(torch.float32) + self._delta(key)), t.dtype)

    def _delta(self, key: str) -> torch.Tensor:
        refs = self.plan.targets[key]
        self.applied[key] = self.applied.get(key, 0) + len(refs)
        total = refs[0].delta()
        for ref in refs[1:]:
            total = total + ref.delta()
        return total

    def _delta_no_count(self, key: str) -> torch.Tensor | None:
        refs = self.plan.targets.get(key)
        if not refs:
            return None
        return sum((r.delta() for r in refs[1:]), refs[0].delta())

    def _fp8_weight(self, key: str) -> torch.Tensor:
        entry = self.fp8[key]
        if self.method == MERGED_16BIT:
            w = _dequant_member(self.reader, entry)
            if key in self.plan.targets:
                w = self._finite(key, w + self._delta(key))
            return _cast(key, w, self.out_dtype)
        unit = (entry.scale_key, entry.expert)
        if not self._unit_has_delta(unit):
            return self.reader.get(key)
        q, _ = self._requant(unit)
        if key in self.plan.targets:
            self.applied[key] = self.applied.get(key, 0) + len(self.plan.targets[key])
        rows = self.reader.ckpt.tensors[key].shape[-2]
        return q[..., entry.row_offset : entry.row_offset + rows, :].contiguous()

    def _requant(self, unit) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale grid) of one quant unit's merged virtual matrix.

        Only the last unit is kept: a shard's scales are written before its weights (larger element size first), so
        caching every unit would hold all of a shard's requantized weights at once. Recomputing is deterministic
        (same inputs, same ops), so a scale written earlier and a q computed later agree bit for bit; gate_e and up_e
        of a stacked scale are adjacent in key order and share the cached unit."""
        if unit not in self._cache:
            members = self.units[unit]
            parts = []
            for e in members:
                w = _dequant_member(self.reader, e)
                d = self._delta_no_count(e.weight_key)
                parts.append(w if d is None else w + d)
            x = self._finite(unit[0], torch.cat(parts, dim=-2))
            ue8m0 = self.ckpt.tensors[unit[0]].dtype == "F8_E8M0"
            self._cache = {unit: requantize_fp8_block(x, members[0].block, ue8m0=ue8m0)}
        return self._cache[unit]

    def _new_scale(self, scale_key: str) -> torch.Tensor:
        units = sorted(self.scale_units[scale_key], key=lambda u: -1 if u[1] is None else u[1])
        info = self.ckpt.tensors[scale_key]
        if units[0][1] is None:  # one unit owns the whole scale tensor
            return self._requant(units[0])[1].reshape(info.shape)
        old = self.reader.get(scale_key)
        grids = []
        for u in units:
            if self._unit_has_delta(u):
                grids.append(self._requant(u)[1])
            else:
                grids.append(old[u[1]].to(torch.float32 if info.dtype != "F8_E8M0" else old.dtype))
        return torch.stack(grids).reshape(info.shape)

    @staticmethod
    def _finite(key: str, t: torch.Tensor) -> torch.Tensor:
        if torch.isfinite(t.sum(dtype=torch.float64)):  # one reduction, no bool copy; NaN/inf propagate into it
            return t
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise MergeError(
                f"merged tensor {key!r} {list(t.shape)} has {bad} non-finite values (adapter or base has inf/NaN)"
            )
        return t

    def end_shard(self) -> None:
        self._cache.clear()
        self.reader.close()


def _cast(key: str, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``merged`` (fp32, finite) cast to the output ``dtype``; values beyond its range would become inf: MergeError
    naming the tensor, the count and the largest magnitude."""
    out = merged.to(dtype)
    if out.dtype == merged.dtype or torch.isfinite(out.sum(dtype=torch.float64)):
        return out
    bad = int((~torch.isfinite(out)).sum())
    raise MergeError(
        f"merged tensor {key!r} {list(merged.shape)}: {bad} values overflow {dtype} (largest |W + ΔW| = "
        f"{float(merged.abs().max()):.6g}, {dtype} max {torch.finfo(dtype).max:.6g}); merge to a wider dtype "
        "(--dtype bfloat16 / float32 for FP8 bases) or check the adapter"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise MergeError(f"output dtype must be bfloat16, float16 or float32, got {dtype}")
    return DTYPE_NAMES[dtype]


def _quant_units(ckpt: Checkpoint, entries: dict[str, FP8Entry]) -> dict[tuple, list[FP8Entry]]:
    """FP8 weights grouped by the scale (slice) they share: ``(scale_key, expert)`` -> members sorted by row offset.
    The members' rows must tile the virtual matrix exactly (gate then up under a fused gate_up scale)."""
    units: dict[tuple, list[FP8Entry]] = {}
    for e in entries.values():
        units.setdefault((e.scale_key, e.expert), []).append(e)
    for unit, members in units.items():
        members.sort(key=lambda e: e.row_offset)
        rows, offset = [ckpt.tensors[e.weight_key].shape[-2] for e in members], 0
        for e, r in zip(members, rows):
            if e.row_offset != offset:
                raise FP8CheckpointError(
                    f"{unit[0]}: weights {[m.weight_key for m in members]} with rows {rows} do not tile the "
                    f"{members[0].virtual_rows} rows the scale covers (expert {unit[1]})"
                )
            offset += r
        if offset != members[0].virtual_rows:
            raise FP8CheckpointError(
                f"{unit[0]}: scale covers {members[0].virtual_rows} rows (expert {unit[1]}) but its FP8 weights "
                f"{[m.weight_key for m in members]} have {offset}"
            )
    return units


def _dequant_member(rd: TensorReader, entry: FP8Entry) -> torch.Tensor:
    """fp32 ``W = float(q)·S`` of one FP8 weight; for a slice of a fused scale (row offset not on a block boundary)
    q is zero-padded on top so that reference.fp8.dequantize_fp8 sees whole blocks."""
    q, scale = rd.get(entry.weight_key), rd.get(entry.scale_key)
    grid = expand_scale_rows(scale, entry)
    if q.ndim == 3:
        return dequantize_fp8(q, grid, entry.block)
    bm = entry.block[0]
    top, g0 = entry.row_offset % bm, entry.row_offset // bm
    g1 = -(-(entry.row_offset + q.shape[0]) // bm)
    if top:
        q = torch.cat([torch.zeros(top, q.shape[1], dtype=q.dtype), q], 0)
    return dequantize_fp8(q, grid[g0:g1], entry.block)[top:]
