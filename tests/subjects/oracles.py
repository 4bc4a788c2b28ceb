"""What a subject is compared with: the reference (the spec) and, where one exists, the real upstream code.

`reference(case, call)` computes the expected answer with `reference/` in float64 from the full context;
`upstream(case, call)` computes the same quantity with the installed upstream package (PEFT's own
``get_delta_weight`` / ``merge_and_unload``, transformers' FP8 dequant, bitsandbytes' NF4) or returns None when there
is none. A reference that disagrees with upstream on the same input is moe-compat's bug (or a known upstream bug, see
dependency_bugs.py), decided before the subject is looked at.
"""

from __future__ import annotations

import torch

from harness.subjects.interface import (
    ForwardCall,
    FP8Call,
    FP8RequantCall,
    FusedMergeCall,
    LoraInput,
    NF4Call,
    Op,
    PerExpertMergeCall,
    RhsCall,
)
from reference import nf4 as ref_nf4
from reference.fp8 import UE8M0_DTYPE, dequantize_fp8, requantize_fp8_block
from reference.layout import GPT_OSS, Orientation, SiblingFactors, decide_orientation
from reference.lora import STRIDE_E, LoraFactors, lora_forward_delta
from reference.merge import GATE_UP_DOWN, merge_fused, merge_per_expert
from tests.subjects.cases import Case

F64 = torch.float64


class UpstreamError(RuntimeError):
    """The upstream code raised on this input (reported with the exception; may be a known dependency bug)."""


# --- orientation -------------------------------------------------------------------------------------------------
# ORIENTATION ORACLE: reference.layout.decide_orientation with every source the context holds (the parameter's and
# the sibling's shapes, the live swap flag, the PEFT version rule with is_transposed, the transformers version). It
# raises when sources disagree: on a real PEFT adapter that is moe-compat's bug (the check fails).


def reference_orientation(lora: LoraInput) -> Orientation:
    ctx = lora.context
    sibling = None
    if lora.peft is not None:
        other = "down" if ctx.param == "gate_up" else "gate_up"
        w = lora.peft.wrappers[f"{other}_proj"]
        sibling = SiblingFactors(f"{other}_proj", ctx.sibling_shape, tuple(w.lora_A["default"].weight.shape),
                                 tuple(w.lora_B["default"].weight.shape))  # fmt: skip
    d = decide_orientation(ctx.param_shape, lora.lora_A.shape, lora.lora_B.shape, lora.num_experts,
                           module=lora.peft.module_path if lora.peft else None, param=f"{ctx.param}_proj",
                           layout=ctx.layout, sibling=sibling, did_swap=ctx.did_swap,
                           is_transposed=bool(ctx.is_transposed),  # absent attribute = False, as PEFT reads it
                           peft_version=ctx.peft_version,
                           transformers_version=ctx.transformers_version)  # fmt: skip
    return d.orientation


def peft_orientation(lora: LoraInput) -> Orientation:
    """What the real PEFT did: its wrapper's ``_did_swap_in_out_features`` (absent before 0.19: never swapped)."""
    w = lora.peft.wrappers[f"{lora.context.param}_proj"]
    return Orientation.SWAPPED if getattr(w, "_did_swap_in_out_features", False) else Orientation.STANDARD


def _factors(lora: LoraInput) -> LoraFactors:
    return LoraFactors(lora.lora_A.to(F64), lora.lora_B.to(F64), lora.scaling, reference_orientation(lora),
                       lora.context.lora_B_convention)  # fmt: skip


def _peft_delta(lora: LoraInput) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` as a ``[E, d1, d2]`` tensor; UpstreamError when its shape is not the param's."""
    w = lora.peft.wrappers[f"{lora.context.param}_proj"]
    try:
        d = w.get_delta_weight("default").detach().to(F64)
    except Exception as exc:  # noqa: BLE001 - reported as the upstream's answer, classified by the caller
        raise UpstreamError(f"PEFT get_delta_weight raised {type(exc).__name__}: {exc}") from exc
    shape = tuple(lora.context.param_shape)
    if tuple(d.shape) != shape:
        if d.ndim == 2 and (1, *d.shape) == shape:
            return d[None]
        raise UpstreamError(f"PEFT get_delta_weight returned shape {tuple(d.shape)} for a param of shape {shape}")
    return d


def _rows_times(x: torch.Tensor, ids: torch.Tensor, dW: torch.Tensor, layout: str) -> torch.Tensor:
    """``x[i] @ dW[e_i]`` (gpt_oss ``[E, in, out]``) or ``x[i] @ dW[e_i]ᵀ`` (``[E, out, in]``)."""
    W = dW[ids] if layout == GPT_OSS else dW[ids].transpose(1, 2)
    return torch.bmm(x.to(F64).unsqueeze(1), W).squeeze(1)


def _peft_merged(lora: LoraInput) -> dict[str, torch.Tensor]:
    """``merge_and_unload`` of the real PeftModel: the merged fused params (fp32)."""
    try:
        model = lora.peft.model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - reported as the upstream's answer, classified by the caller
        raise UpstreamError(f"PEFT merge_and_unload raised {type(exc).__name__}: {exc}") from exc
    experts = model.get_submodule(lora.peft.module_path)
    return {p: getattr(experts, f"{p}_proj").detach().to(F64) for p in ("gate_up", "down")}


# --- per op ------------------------------------------------------------------------------------------------------


def reference(case: Case, call):
    op = case.op
    if op is Op.ORIENTATION:
        return reference_orientation(call)
    if op is Op.LORA_FORWARD:
        c: ForwardCall = call
        f = _factors(c.lora)
        return lora_forward_delta(c.x.to(F64), f.lora_A, f.lora_B, c.expert_ids, c.lora.num_experts, f.scaling,
                                  orientation=f.orientation, expert_layout=c.lora.context.layout,
                                  convention=f.convention)  # fmt: skip
    if op is Op.MERGE_PER_EXPERT:
        c: PerExpertMergeCall = call
        tensors = {k: v.to(F64) for k, v in c.tensors.items()}
        return merge_per_expert(tensors, {p: _factors(lo) for p, lo in c.adapters.items()}, c.num_experts,
                                GATE_UP_DOWN, c.prefix)  # fmt: skip
    if op is Op.MERGE_FUSED:
        c: FusedMergeCall = call
        return {"param": merge_fused(c.param.to(F64), _factors(c.lora))}
    if op in (Op.FP8_DEQUANT, Op.FP8_DEQUANT_EXPERT):
        c: FP8Call = call
        return dequantize_fp8(c.q, c.scale_inv, c.block, dtype=F64)
    if op is Op.FP8_REQUANT:
        c: FP8RequantCall = call
        return requantize_fp8_block(c.w, c.block, ue8m0=UE8M0_DTYPE is not None and c.scale_dtype == UE8M0_DTYPE)
    if op is Op.GROUPED_MM_RHS:
        c: RhsCall = call
        return c.w.clone()
    if op is Op.NF4_DEQUANT:
        c: NF4Call = call
        packed, state = ref_nf4.quantize_nf4(c.weight, c.blocksize)
        return ref_nf4.dequantize_nf4(packed, state, dtype=c.dtype)
    raise ValueError(f"no reference for {op}")


def upstream(case: Case, call):
    """The real upstream's answer for the same input, or None (no upstream computes it). Raises UpstreamError."""
    op = case.op
    lora = getattr(call, "lora", None) or next(iter(getattr(call, "adapters", {}).values()), None)
    if lora is not None and lora.context.lora_B_convention != STRIDE_E:
        return None  # PEFT reads every adapter stride-E: it has no answer for a contiguous-r adapter
    if op is Op.ORIENTATION:
        return peft_orientation(call)
    if op is Op.LORA_FORWARD:
        c: ForwardCall = call
        return _rows_times(c.x, c.expert_ids, _peft_delta(c.lora), c.lora.context.layout)
    if op is Op.MERGE_PER_EXPERT:
        c: PerExpertMergeCall = call
        lora = next(iter(c.adapters.values()))
        before = {p: getattr(lora.peft.experts, f"{p}_proj").detach().to(F64).clone() for p in ("gate_up", "down")}
        after = _peft_merged(lora)
        delta = {p: after[p] - before[p] for p in after}
        out = {k: v.to(F64) for k, v in c.tensors.items()}
        I = delta["gate_up"].shape[1] // 2
        for e in range(c.num_experts):
            key = f"{c.prefix}experts.{e}.{{}}.weight"
            if "gate_up" in c.adapters:
                out[key.format("gate_proj")] = out[key.format("gate_proj")] + delta["gate_up"][e, :I]
                out[key.format("up_proj")] = out[key.format("up_proj")] + delta["gate_up"][e, I:]
            if "down" in c.adapters:
                out[key.format("down_proj")] = out[key.format("down_proj")] + delta["down"][e]
        return out
    if op is Op.MERGE_FUSED:
        c: FusedMergeCall = call
        return {"param": _peft_merged(c.lora)[c.lora.context.param]}
    if op is Op.NF4_DEQUANT:
        import bitsandbytes.functional as bnbf

        c: NF4Call = call
        packed, qs = bnbf.quantize_4bit(c.weight.reshape(-1), blocksize=c.blocksize, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, qs).reshape(c.weight.shape).to(c.dtype)
    return None  # FP8 (transformers' dequant guesses partial grids, see tests/oracles), RHS layout: property checks
