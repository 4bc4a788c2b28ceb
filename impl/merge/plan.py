"""The merge plan: which adapter factors change which base-checkpoint tensors, decided from header shapes only.

Experts LoRA (``target_parameters``): each ``.base_layer`` level of an experts module is assigned to gate_up or down
by its shapes; its orientation comes from `reference.layout`; per-expert checkpoints get per-expert (row-sliced)
deltas, fused ones the stacked ``ΔW [E, d1, d2]``. ``target_modules`` LoRA: ``ΔW = s·B A`` on a 2-D weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from impl.adapter_dir import Adapter, assign_expert_params, expert_orientation, lora_scaling
from impl.checkpoint import Checkpoint, ExpertGroup, check_against_config, find_expert_groups
from impl.errors import AdapterError, MergeError
from reference.layout import Orientation, OrientationDecision
from reference.lora import delta_weight, expert_factors


@dataclass
class ExpertLora:
    """One adapter on one fused expert param (``param`` "gate_up" or "down") of an `ExpertGroup`."""

    group: ExpertGroup
    param: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    decision: OrientationDecision
    convention: str
    keys: tuple[str, str]
    _factors: tuple = field(default=(), repr=False)

    def expert_delta(self, e: int) -> torch.Tensor:
        """``ΔW[e]`` fp32 ``[d1, d2]`` of the fused param (reference.lora.delta_weight on expert e's factors)."""
        if not self._factors:
            A, B = self.lora_A.to(torch.float32), self.lora_B.to(torch.float32)
            self._factors = expert_factors(A, B, self.group.num_experts, self.convention)
        A, B = self._factors
        return delta_weight(A[e], B[e], 1, self.scaling, orientation=self.decision.orientation)[0]

    def full_delta(self) -> torch.Tensor:
        """``ΔW [E, d1, d2]`` fp32."""
        A, B = self.lora_A.to(torch.float32), self.lora_B.to(torch.float32)
        return delta_weight(
            A,
            B,
            self.group.num_experts,
            self.scaling,
            orientation=self.decision.orientation,
            convention=self.convention,
        )


@dataclass
class LinearLora:
    """A LoRA on a 2-D weight ``W [out, in]``: ``ΔW = s·B A`` (A ``[r, in]``, B ``[out, r]``)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    keys: tuple[str, str]

    def delta(self) -> torch.Tensor:
        A, B = self.lora_A.to(torch.float32), self.lora_B.to(torch.float32)
        return delta_weight(A, B, 1, self.scaling, orientation=Orientation.SWAPPED)[0]


@dataclass(frozen=True)
class DeltaRef:
    """The contribution of one LoRA to one disk tensor: ``rows`` of ``ΔW[expert]`` (per-expert), the whole stacked
    ``ΔW`` (fused, expert None) or the linear delta."""

    lora: ExpertLora | LinearLora
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def delta(self) -> torch.Tensor:
        if isinstance(self.lora, LinearLora):
            return self.lora.delta()
        if self.expert is None:
            return self.lora.full_delta()
        d = self.lora.expert_delta(self.expert)
        return d if self.rows is None else d[self.rows[0] : self.rows[1]]


@dataclass
class MergePlan:
    """``targets``: disk key -> its DeltaRefs; ``expert_loras`` / ``linear_loras``: what the adapter holds."""

    targets: dict[str, list[DeltaRef]]
    expert_loras: list[ExpertLora]
    linear_loras: list[LinearLora]


def plan_merge(ckpt: Checkpoint, adapter: Adapter) -> MergePlan:
    """Map every adapter module to base-checkpoint tensors (header shapes only); raises on anything unmatched."""
    found = find_expert_groups(ckpt)
    check_against_config(ckpt, found)
    groups = {g.module_path: g for g in found.values()}
    groups.update({g.prefix: g for g in groups.values()})
    targets: dict[str, list[DeltaRef]] = {}
    experts, linears = [], []
    for module, levels in sorted(adapter.modules.items()):
        if module in groups:
            for lora in _expert_loras(adapter, groups[module], module, levels):
                experts.append(lora)
                for key, ref in _expert_refs(lora):
                    targets.setdefault(key, []).append(ref)
            continue
        if set(levels) != {0}:
            raise AdapterError(
                f"{adapter.root}: module {module!r} has nested .base_layer wrappers but is not an experts module on disk"
            )
        lin, key = _linear_lora(ckpt, adapter, module, levels[0])
        linears.append(lin)
        targets.setdefault(key, []).append(DeltaRef(lin))
    used = {k for lo in experts + linears for k in lo.keys}
    if used != set(adapter.tensors):
        raise MergeError(
            f"{adapter.root}: adapter tensors not mapped to the base: {sorted(set(adapter.tensors) - used)[:5]}"
        )
    return MergePlan(targets, experts, linears)


def _expert_loras(adapter: Adapter, group: ExpertGroup, module: str, levels: dict) -> list[ExpertLora]:
    """One ExpertLora per nesting level: its parameter by shape, its orientation from every source
    (`impl.adapter_dir.assign_expert_params`, `impl.adapter_dir.expert_orientation`)."""
    shapes = {f"{p}_proj": s for p, s in group.param_shapes.items()}
    E = group.num_experts
    assigned = assign_expert_params(adapter, module, levels, shapes, E, f"{group.prefix} on disk")
    out = []
    for pname, (ka, kb) in assigned.items():
        decision = expert_orientation(adapter, module, pname, assigned, shapes, E, layout=group.layout)
        scaling = lora_scaling(adapter, f"{module}.{pname}", decision.rank)
        A, B = adapter.tensors[ka], adapter.tensors[kb]
        param = pname.removesuffix("_proj")
        out.append(ExpertLora(group, param, A, B, scaling, decision, adapter.convention, (ka, kb)))
    return out


def _expert_refs(lora: ExpertLora) -> list[tuple[str, DeltaRef]]:
    g = lora.group
    if g.scheme == "fused":
        return [(g.keys[lora.param], DeltaRef(lora))]
    if lora.param == "down":
        return [(k, DeltaRef(lora, e)) for e, k in enumerate(g.keys["down"])]
    inter = g.param_shapes["gate_up"][1] // 2  # gate_up [E, 2I, H]: gate rows [0, I), up rows [I, 2I)
    refs = [(k, DeltaRef(lora, e, (0, inter))) for e, k in enumerate(g.keys["gate"])]
    return refs + [(k, DeltaRef(lora, e, (inter, 2 * inter))) for e, k in enumerate(g.keys["up"])]


def _linear_lora(ckpt: Checkpoint, adapter: Adapter, module: str, pair) -> tuple[LinearLora, str]:
    ka, kb = pair
    A, B = adapter.tensors[ka], adapter.tensors[kb]
    candidates = [f"{module}.weight", f"{module.replace('.mlp.', '.block_sparse_moe.')}.weight"]
    found = sorted({k for k in candidates if k in ckpt.tensors})
    if len(found) != 1:
        raise AdapterError(
            f"{adapter.root}: no base tensor for LoRA module {module!r}; looked for {sorted(set(candidates))}"
        )
    key = found[0]
    shape = ckpt.tensors[key].shape
    if len(shape) != 2 or A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != shape:
        raise AdapterError(
            f"{adapter.root}: {ka} {list(A.shape)} / {kb} {list(B.shape)} do not fit {key} {list(shape)} as "
            "W [out, in] += s·B [out, r] @ A [r, in]"
        )
    return LinearLora(A, B, lora_scaling(adapter, module, A.shape[0]), (ka, kb)), key
