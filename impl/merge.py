"""Merge a PEFT LoRA adapter into a safetensors base checkpoint and write a new checkpoint.

``merge_adapter(base_dir, adapter_dir, out_dir, method=...)``:

- ``merged_16bit``: every merged weight is high precision. bf16/fp16/fp32 weights keep their on-disk dtype; FP8
  weights are dequantized (``W = float(q)·S``), merged and written as ``dtype`` (bf16 by default); their scale tensors
  and static activation scales are dropped and ``quantization_config`` is removed from config.json.
  **NF4 (QLoRA) bases:** the base checkpoint of a QLoRA run is the bf16 checkpoint on disk; NF4 exists only in memory
  (bitsandbytes quantizes at load). Merging onto the bf16 weights is the expected path: ``W16 + ΔW`` is what the
  adapter was trained to correct up to the NF4 rounding of W16. A bnb-serialized 4-bit checkpoint is refused.
- ``fp8``: FP8 base only. FP8 weights are dequantized, merged and requantized (``reference.fp8.requantize_fp8_block``,
  same block as the input) with new scales (fp32, or UE8M0 if the input scales were); config.json is kept.

Adapter: ``adapter_config.json`` + ``adapter_model.safetensors``. ``target_parameters`` LoRA on 3-D experts
(``...mlp.experts.base_layer.lora_{A,B}.weight`` / ``...mlp.experts.lora_{A,B}.weight``; which wrapper is gate_up and
which is down is decided by the shapes, which always differ) and ``target_modules`` LoRA on 2-D Linear weights
(``ΔW = s·B A``). Experts LoRA: orientation from `reference.layout.detect_orientation` (param shape from the base
checkpoint's fused view); square ties are resolved by the adapter dir's ``moe_compat.json`` sidecar, else the
``peft_version`` in adapter_config.json (`reference.layout.peft_swaps`; for gpt_oss experts from PEFT 0.19 on the rule
depends on ``is_transposed``, which the checkpoint does not record, so that case needs the sidecar), else refused.
Per-expert deltas from `reference.lora` (``stride_e`` unless the
sidecar says ``contiguous_r``). Every adapter tensor must be applied and every planned delta counted, else MergeError.

Sidecar ``moe_compat.json`` (optional; other fields are ignored), either impl.peft_integration's format 1::

    {"format": 1, "lora_B_convention": "stride_e",
     "adapters": {"default": {"<module path>:<param>": {"orientation": "swapped", ...}, ...}}, ...}

or the short form ``{"orientation": "swapped" | {"gate_up_proj": ..., "<module>.<param>": ...},
"lora_B_convention": "stride_e" | "contiguous_r"}``. A recorded orientation is passed to detect_orientation as the
swap flag, so it must also agree with the shapes when they are unambiguous.

Writing: shard by shard in the base's shard layout, tensor by tensor (`impl.checkpoint.write_shard`), into a temporary
directory ``.<out>.partial-<pid>-<hex>`` next to ``out_dir`` renamed to ``out_dir`` at the end; on any exception the
temporary directory is removed (a killed process cannot clean up: the next merge into the same ``out_dir`` removes
partial dirs whose process is gone). The source checkpoint and adapter are only read.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from impl.checkpoint import (
    DTYPE_NAMES,
    INDEX_NAME,
    PER_EXPERT_RE,
    Checkpoint,
    ExpertGroup,
    FP8CheckpointError,
    FP8Entry,
    OutSpec,
    TensorReader,
    check_against_config,
    discover_fp8,
    expand_scale_rows,
    find_expert_groups,
    fp8_companion_keys,
    open_checkpoint,
    write_shard,
)
from reference.fp8 import dequantize_fp8, requantize_fp8_block
from reference.layout import GPT_OSS, LayoutDecision, LayoutError, Orientation, detect_orientation, peft_swaps
from reference.lora import CONVENTIONS, STRIDE_E, delta_weight, expert_factors

MERGED_16BIT = "merged_16bit"
FP8_METHOD = "fp8"
METHODS = (MERGED_16BIT, FP8_METHOD)
SIDECAR = "moe_compat.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PROVENANCE = "moe_compat_merge.json"
COPY_PATTERNS = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)  # fmt: skip
EXPERT_PARAMS = {"gate_up_proj": "gate_up", "down_proj": "down"}
_ADAPTER_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_MERGEABLE_QUANT = (None, "fp8", "compressed-tensors", "fbgemm_fp8")
_PACKED_SUFFIXES = ("_blocks", ".weight_packed", ".qweight")  # mxfp4, compressed-tensors int packing, GPTQ/AWQ
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


class MergeError(RuntimeError):
    """A merge that cannot be done correctly (bad adapter, base/adapter mismatch, unapplied tensors, ...)."""


class AdapterError(MergeError):
    """An adapter directory or config the merge does not support, or whose tensors contradict its config."""


# --- adapter -------------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """A PEFT LoRA adapter: config, tensors keyed as saved, and its modules.

    modules: ``{unwrapped module path: {depth: (lora_A key, lora_B key)}}``, depth = number of ``.base_layer``
    infixes (0 = outermost wrapper).
    """

    root: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    modules: dict[str, dict[int, tuple[str, str]]]
    sidecar: dict | None

    @property
    def peft_version(self) -> str | None:
        return self.config.get("peft_version")

    @property
    def convention(self) -> str:
        conv = (self.sidecar or {}).get("lora_B_convention", STRIDE_E)
        if conv not in CONVENTIONS:
            raise AdapterError(f"{self.root / SIDECAR}: lora_B_convention {conv!r} is not one of {CONVENTIONS}")
        return conv


def load_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter dir; refuses DoRA, LoRA bias, fan_in_fan_out, modules_to_save and unknown tensors."""
    from safetensors.torch import load_file

    root = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (root / name).is_file():
            raise AdapterError(
                f"{root}: {name} not found (a PEFT adapter dir has {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
            )
    config = json.loads((root / ADAPTER_CONFIG).read_text())
    _check_adapter_config(root, config)
    sidecar = json.loads((root / SIDECAR).read_text()) if (root / SIDECAR).is_file() else None
    tensors = load_file(str(root / ADAPTER_WEIGHTS))
    modules: dict[str, dict[int, dict[str, str]]] = {}
    bad = []
    for key in tensors:
        m = _ADAPTER_KEY_RE.match(key)
        if m is None:
            bad.append(key)
            continue
        module, depth = m["module"], 0
        while module.endswith(".base_layer"):
            module, depth = module.removesuffix(".base_layer"), depth + 1
        modules.setdefault(module, {}).setdefault(depth, {})[m["ab"]] = key
    if bad:
        raise AdapterError(
            f"{root / ADAPTER_WEIGHTS}: tensors that are not LoRA A/B weights cannot be merged: {sorted(bad)[:5]} "
            "(DoRA magnitudes, LoRA biases, embedding LoRA and modules_to_save are not supported)"
        )
    pairs: dict[str, dict[int, tuple[str, str]]] = {}
    for module, levels in modules.items():
        for depth, ab in levels.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(
                    f"{root}: module {module!r} (depth {depth}) has lora_{list(ab)} but not both A and B"
                )
            pairs.setdefault(module, {})[depth] = (ab["A"], ab["B"])
    return Adapter(root, config, tensors, pairs, sidecar)


def _check_adapter_config(root: Path, config: dict) -> None:
    checks = [
        (config.get("peft_type") == "LORA", f"peft_type {config.get('peft_type')!r} (only LORA)"),
        (not config.get("use_dora"), "use_dora=True (DoRA magnitudes are not merged)"),
        (not config.get("lora_bias"), "lora_bias=True (LoRA bias is not merged)"),
        (not config.get("fan_in_fan_out"), "fan_in_fan_out=True (Conv1D weights)"),
        (not config.get("modules_to_save"), f"modules_to_save={config.get('modules_to_save')}"),
        (not config.get("trainable_token_indices"), "trainable_token_indices"),
        (not config.get("layer_replication"), "layer_replication"),
    ]
    bad = [why for ok, why in checks if not ok]
    if bad:
        raise AdapterError(f"{root / ADAPTER_CONFIG}: unsupported adapter settings: {bad}")


def _pattern_value(patterns: dict, current_key: str, default):
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)`` wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", current_key):
            return value
    return default


def _scaling(adapter: Adapter, current_key: str, rank: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with use_rslora); r from rank_pattern/r must equal the rank in the shapes."""
    cfg = adapter.config
    r_cfg = int(_pattern_value(cfg.get("rank_pattern"), current_key, cfg["r"]))
    if r_cfg != rank:
        raise AdapterError(
            f"{adapter.root}: {current_key}: rank from the factor shapes is {rank} but adapter_config says r={r_cfg}"
        )
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), current_key, cfg["lora_alpha"]))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


# --- plan ------------------------------------------------------------------------------------------------------


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
        scaling = _scaling(adapter, current_key, decision.rank)
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
    side = _sidecar_orientation(adapter, f"{module}.{pname}", pname)
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


def _sidecar_orientation(adapter: Adapter, current_key: str, pname: str) -> Orientation | None:
    """The orientation the sidecar records for ``<module>.<param>`` (None: no sidecar or no entry for it)."""
    side = adapter.sidecar or {}
    if "adapters" in side:
        o = _sidecar_targets(adapter).get(current_key)
    else:
        o = side.get("orientation")
        if isinstance(o, dict):
            o = o.get(current_key, o.get(pname))
    if o is None:
        return None
    try:
        value = Orientation(o)
    except ValueError as err:
        raise AdapterError(f"{adapter.root / SIDECAR}: orientation {o!r} for {current_key}: {err}") from err
    if value is Orientation.UNKNOWN:
        raise AdapterError(f"{adapter.root / SIDECAR}: orientation 'unknown' for {current_key} cannot be merged")
    return value


def _sidecar_targets(adapter: Adapter) -> dict[str, str]:
    """impl.peft_integration's sidecar (``format`` 1): ``adapters[name]["<module path>:<param>"]["orientation"]``.

    The saved adapter is PEFT's "default" (or the only one); module paths lose a leading ``base_model.model.`` and
    trailing ``.base_layer`` infixes, giving ``<module>.<param>`` as in PEFT's rank_pattern keys."""
    side = adapter.sidecar
    if side.get("format") != 1:
        raise AdapterError(f"{adapter.root / SIDECAR}: unknown sidecar format {side.get('format')!r} (expected 1)")
    adapters = side["adapters"]
    name = "default" if "default" in adapters else (next(iter(adapters)) if len(adapters) == 1 else None)
    if name is None:
        raise AdapterError(f"{adapter.root / SIDECAR}: several adapters {sorted(adapters)} and none is 'default'")
    out = {}
    for target, info in adapters[name].items():
        path, _, param = target.rpartition(":")
        path = path.removeprefix("base_model.model.")
        while path.endswith(".base_layer"):
            path = path.removesuffix(".base_layer")
        out[f"{path}.{param}"] = info["orientation"]
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
    return LinearLora(A, B, _scaling(adapter, module, A.shape[0]), (ka, kb)), key


# --- execution -------------------------------------------------------------------------------------------------


@dataclass
class MergeReport:
    """What a merge did. expert_deltas: (expert, disk tensor) deltas applied (a fused 3-D tensor counts E);
    linear_deltas: 2-D LoRA deltas applied; dropped: keys not written (FP8 companions in merged_16bit)."""

    out_dir: str
    method: str
    expert_deltas: int
    linear_deltas: int
    shards: list[str]
    dropped: list[str]
    requantized_scales: list[str]
    seconds: float


class _Merger:
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
        return self._finite(key, t.to(torch.float32) + self._delta(key)).to(t.dtype)

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
            return w.to(self.out_dtype)
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


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = MERGED_16BIT,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeReport:
    """Merge the adapter into the base checkpoint and write ``out_dir`` atomically (see module docstring).

    dtype: output dtype of dequantized FP8 weights in merged_16bit (other weights keep their dtype).
    overwrite: replace an existing ``out_dir`` (never the base or adapter dir). progress: one line per shard to stderr.
    """
    t0 = time.monotonic()
    base, adapter_root, out = Path(base_dir).resolve(), Path(adapter_dir).resolve(), Path(out_dir).resolve()
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; expected one of {METHODS}")
    _check_paths(base, adapter_root, out, overwrite)
    ckpt = open_checkpoint(base)
    _refuse_unsupported_quant(ckpt)
    adapter = load_adapter(adapter_root)
    plan = plan_merge(ckpt, adapter)
    merger = _Merger(ckpt, plan, method, dtype)
    if method == FP8_METHOD and not merger.fp8:
        raise MergeError(f"{base}: method 'fp8' needs an FP8 base checkpoint; it has no float8_e4m3fn weights")
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        shards = _write_shards(ckpt, merger, tmp, progress)
        _check_applied(plan, merger)
        _write_side_files(ckpt, adapter, method, tmp, plan, merger)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dropped = sorted(k for k in ckpt.tensors if merger.dropped(k))
    rescaled = sorted(k for k in merger.scale_units if merger._scale_changes(k))
    n_exp = sum(_expert_count(ref) for k in merger.applied for ref in plan.targets[k] if _is_expert_target(plan, k))
    n_lin = sum(n for k, n in merger.applied.items() if not _is_expert_target(plan, k))
    return MergeReport(str(out), method, n_exp, n_lin, shards, dropped, rescaled, time.monotonic() - t0)


def _expert_count(ref: DeltaRef) -> int:
    """A fused 3-D delta counts once per expert; a per-expert (or per-expert Linear) delta once."""
    return ref.lora.group.num_experts if isinstance(ref.lora, ExpertLora) and ref.expert is None else 1


def _is_expert_target(plan: MergePlan, key: str) -> bool:
    return isinstance(plan.targets[key][0].lora, ExpertLora) or PER_EXPERT_RE.match(key) is not None


def _check_paths(base: Path, adapter: Path, out: Path, overwrite: bool) -> None:
    for src in (base, adapter):
        if out == src or src in out.parents or out in src.parents:
            raise MergeError(f"output dir {out} must not be, contain or be inside the source {src}")
    if out.exists() and not overwrite:
        raise MergeError(f"output dir {out} exists; pass overwrite=True (--overwrite) to replace it")


def _refuse_unsupported_quant(ckpt: Checkpoint) -> None:
    """Only 16-bit and FP8 (finegrained ``fp8`` / compressed-tensors float / fbgemm) checkpoints are merged."""
    bnb = [k for k in ckpt.tensors if k.endswith(_BNB_SUFFIXES)]
    if ckpt.quant_method == "bitsandbytes" or bnb:
        raise MergeError(
            f"{ckpt.root}: a bitsandbytes-serialized checkpoint ({bnb[:2] or ckpt.quant_method}); NF4 is an in-memory "
            "format for QLoRA: merge onto the 16-bit base checkpoint the NF4 model was loaded from"
        )
    packed = [k for k in ckpt.tensors if k.endswith(_PACKED_SUFFIXES)]
    if ckpt.quant_method not in _MERGEABLE_QUANT or packed:
        raise MergeError(
            f"{ckpt.root}: quant_method {ckpt.quant_method!r} / packed tensors {packed[:2]} are not supported; "
            f"mergeable: 16-bit or FP8 e4m3 ({sorted(m for m in _MERGEABLE_QUANT if m)})"
        )


def _write_shards(ckpt: Checkpoint, merger: _Merger, tmp: Path, progress: bool) -> list[str]:
    weight_map, total, written = {}, 0, []
    for i, shard in enumerate(ckpt.shards):
        t = time.monotonic()
        specs = [merger.spec(k) for k in ckpt.keys_in(shard) if not merger.dropped(k)]
        if not specs:  # e.g. a shard that held only FP8 scales, all dropped by merged_16bit
            if progress:
                print(
                    f"[moe-compat-merge] shard {i + 1}/{len(ckpt.shards)} {shard}: nothing left, not written",
                    file=sys.stderr,
                )
            continue
        written.append(shard)
        try:
            nbytes = write_shard(tmp / shard, specs, merger.produce, {"format": "pt"})
        finally:
            merger.end_shard()
        total += nbytes
        weight_map.update({s.key: shard for s in specs})
        if progress:
            print(
                f"[moe-compat-merge] shard {i + 1}/{len(ckpt.shards)} {shard}: {len(specs)} tensors, "
                f"{nbytes / 2**20:.1f} MiB, {time.monotonic() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    if ckpt.indexed:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return written


def _check_applied(plan: MergePlan, merger: _Merger) -> None:
    """Every planned delta applied exactly once (a dropped or doubly written key would show here)."""
    wrong = {
        k: (merger.applied.get(k, 0), len(v)) for k, v in plan.targets.items() if merger.applied.get(k, 0) != len(v)
    }
    if wrong:
        raise MergeError(
            f"deltas applied != planned for {len(wrong)} tensors (applied, planned): {dict(list(wrong.items())[:5])}"
        )


def _write_side_files(ckpt: Checkpoint, adapter: Adapter, method: str, tmp: Path, plan: MergePlan, merger) -> None:
    if (ckpt.root / "config.json").is_file():
        config = dict(ckpt.config)
        if method == MERGED_16BIT:
            config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in COPY_PATTERNS:
        if (ckpt.root / name).is_file():
            shutil.copy2(ckpt.root / name, tmp / name)
    provenance = {
        "method": method,
        "base": str(ckpt.root),
        "adapter": str(adapter.root),
        "peft_version": adapter.peft_version,
        "lora_B_convention": adapter.convention,
        "orientations": {
            f"{lo.group.module_path}.{lo.param}_proj": lo.decision.orientation.value for lo in plan.expert_loras
        },
        "deltas_applied": sum(merger.applied.values()),
    }
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def _remove_stale_partials(out: Path) -> list[Path]:
    """Remove ``.<out>.partial-<pid>-<hex>`` dirs left by a merge process that no longer runs (killed: no cleanup
    handler runs on SIGKILL). Dirs of live processes are kept. Returns the removed paths."""
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.partial-(\d+)-[0-9a-f]{{8}}$")
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m[1])):
            shutil.rmtree(p)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir to ``out``; an existing ``out`` (overwrite) is moved aside first, then removed."""
    old = None
    if out.exists():
        if not overwrite:
            raise MergeError(f"output dir {out} appeared during the merge; not replacing it")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)
