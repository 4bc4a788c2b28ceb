"""The merge plan: which adapter factors change which base-checkpoint tensors, decided from header shapes only.

Experts LoRA (``target_parameters``): each ``.base_layer`` level of an experts module is assigned to gate_up or down
by its shapes; its orientation comes from `reference.layout`; per-expert checkpoints get per-expert (row-sliced)
deltas, fused ones the stacked ``ΔW [E, d1, d2]``. ``target_modules`` LoRA: ``ΔW = s·B A`` on a 2-D weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from impl.checkpoint import Checkpoint, ExpertGroup, check_against_config, find_expert_groups
from impl.errors import AdapterError, MergeError
from impl.merge.adapter import Adapter, lora_scaling
from impl.sidecar import SIDECAR, sidecar_orientation
from reference.layout import GPT_OSS, LayoutDecision, LayoutError, Orientation, detect_orientation, peft_swaps
from reference.lora import delta_weight, expert_factors



@dataclass
class ExpertLora:
    """One adapter on one fused expert param (``param`` "gate_up" or "down") of an `ExpertGroup`."""

    group: ExpertGroup
    param: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    decision: LayoutDecision
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
    """Assign each wrapper level to gate_up or down by shape (their dims {2I, H} and {H, I} always differ)."""
    out, taken = [], {}
    for _depth, (ka, kb) in sorted(levels.items()):
        A, B = adapter.tensors[ka], adapter.tensors[kb]
        fits = [p for p, shape in group.param_shapes.items() if _shape_fits(shape, A.shape, B.shape)]
        if len(fits) != 1:
            raise AdapterError(
                f"{adapter.root}: {ka} {list(A.shape)} / {kb} {list(B.shape)} fit {fits or 'no'} expert param of "
                f"{group.prefix} (shapes {group.param_shapes}, E={group.num_experts}); exactly one must fit"
            )
        (param,) = fits
        if param in taken:
            raise AdapterError(f"{adapter.root}: two wrappers on {module} both fit {param} ({taken[param]}, {ka})")
        taken[param] = ka
        decision = _orientation(adapter, group, module, param, A, B)
        current_key = f"{module}.{param}_proj"
        scaling = lora_scaling(adapter, current_key, decision.rank)
        out.append(ExpertLora(group, param, A, B, scaling, decision, adapter.convention, (ka, kb)))
    return out


def _shape_fits(shape, a_shape, b_shape) -> bool:
    """``A [r·E, a]``, ``B [b, r·E]`` fit ``P [E, d1, d2]`` in some orientation: {a, b} == {d1, d2}, r·E a multiple of E."""
    E, d1, d2 = shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] % E or not a_shape[0]:
        return False
    return (a_shape[1], b_shape[0]) in ((d1, d2), (d2, d1))


def _orientation(adapter: Adapter, group: ExpertGroup, module: str, param: str, A, B) -> LayoutDecision:
    """detect_orientation with hints only where they are needed or explicit (the sidecar)."""
    shape, E = group.param_shapes[param], group.num_experts
    pname = f"{param}_proj"
    side = sidecar_orientation(adapter.root, adapter.sidecar, f"{module}.{pname}", pname)
    if side is not None:
        return _detect(adapter, shape, A, B, E, did_swap=side is Orientation.SWAPPED)
    d = detect_orientation(shape, A.shape, B.shape, E, refuse_ambiguous=False)
    if not d.ambiguous:
        return d
    v = adapter.peft_version
    if v is None:
        return _detect(adapter, shape, A, B, E)  # raises AmbiguousLayoutError with the shapes
    try:
        rule = {peft_swaps(v, 3, t) for t in ((True, False) if group.layout == GPT_OSS else (False,))}
    except ValueError as err:
        raise AdapterError(
            f"{adapter.root}: {module}.{pname} is square ({shape}) and peft_version {v!r}: {err}"
        ) from err
    if len(rule) != 1:
        raise AdapterError(
            f"{adapter.root}: {module}.{pname} {list(shape)} is square (both orientations fit) and PEFT {v}'s swap rule "
            "depends on the experts' is_transposed (transformers-version dependent for gpt_oss); write the orientation "
            f"into {SIDECAR}"
        )
    return _detect(adapter, shape, A, B, E, did_swap=rule.pop())


def _detect(adapter, shape, A, B, E, **hints) -> LayoutDecision:
    try:
        d = detect_orientation(shape, A.shape, B.shape, E, **hints)
    except LayoutError as err:
        raise AdapterError(f"{adapter.root}: {err}") from err
    if d.orientation is Orientation.UNKNOWN:
        raise AdapterError(f"{adapter.root}: {d.reason}")
    return d


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
