"""Merging per-expert LoRA into base expert weights: fused 3-D, per-expert disk tensors, bf16 / NF4 / FP8 targets.

Every merge is ``W' = W + ΔW`` with ``ΔW [E, d1, d2]`` from `reference.lora.delta_weight` (the adapter's own
orientation and lora_B convention), computed in float64 when any input is float64, else float32, and rounded to the
target format once at the end.

Per-expert disk tensors (transformers 5.x ``save_pretrained`` for Qwen3-MoE / Mixtral, and 4.x checkpoints) are
``{prefix}experts.{e}.{gate}.weight [I, H]``, ``{up} [I, H]``, ``{down} [H, I]`` with names ``gate_proj/up_proj/down_proj``
(scheme ``gate_up_down``) or ``w1/w3/w2`` (scheme ``w1_w3_w2``). The fused ``gate_up [E, 2I, H]`` holds gate in rows
``[0, I)`` and up in rows ``[I, 2I)``; ``down [E, H, I]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from reference.fp8 import UE8M0_DTYPE, dequantize_fp8, requantize_fp8_block
from reference.lora import LoraFactors, delta_weight
from reference.nf4 import NF4State, dequantize_nf4, quantize_nf4

GATE_UP_DOWN = "gate_up_down"
W1_W3_W2 = "w1_w3_w2"
SCHEMES = {GATE_UP_DOWN: ("gate_proj", "up_proj", "down_proj"), W1_W3_W2: ("w1", "w3", "w2")}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (merges never accumulate in 16-bit)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def factors_delta(factors: LoraFactors, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """``ΔW [E, d1, d2]`` of ``factors`` computed in ``dtype`` (the factors are cast up first, not the product)."""
    return delta_weight(
        factors.lora_A.to(dtype),
        factors.lora_B.to(dtype),
        num_experts,
        factors.scaling,
        orientation=factors.orientation,
        convention=factors.convention,
    )


def _check_same_shape(what: str, w: torch.Tensor | torch.Size, delta: torch.Tensor) -> None:
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w)
    if shape != tuple(delta.shape):
        raise ValueError(f"{what}: base shape {shape} != LoRA delta shape {tuple(delta.shape)}")


def merge_fused(param: torch.Tensor, factors: LoraFactors, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``param [E, d1, d2] + ΔW [E, d1, d2]``, rounded once to ``out_dtype`` (default ``param.dtype``).

    Works for any fused layout (fused_linear ``[E, 2I, H]`` / ``[E, H, I]``, gpt_oss ``[E, H, 2I]`` / ``[E, I, H]``) in
    either orientation, because ΔW has the parameter's own shape. A bf16 merge (``param`` or ``out_dtype`` bf16)
    adds in fp32 and rounds once, unlike PEFT's ``param.data += ΔW.to(bf16)`` which rounds ΔW first.
    """
    if param.dtype not in FLOAT_DTYPES:
        raise TypeError(f"merge_fused needs a float param, got {param.dtype}; use merge_into_nf4 / merge_into_fp8")
    if param.ndim != 3:
        raise ValueError(f"merge_fused needs a 3-D expert param [E, d1, d2], got {tuple(param.shape)}")
    cd = compute_dtype(param, factors.lora_A, factors.lora_B)
    delta = factors_delta(factors, param.shape[0], cd)
    _check_same_shape("merge_fused", param, delta)
    return (param.to(cd) + delta).to(out_dtype or param.dtype)


def per_expert_key(prefix: str, e: int, name: str) -> str:
    """``{prefix}experts.{e}.{name}.weight``, e.g. ``model.layers.0.mlp.experts.3.gate_proj.weight``."""
    return f"{prefix}experts.{e}.{name}.weight"


def _scheme(scheme: str) -> tuple[str, str, str]:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown per-expert naming scheme {scheme!r}; expected one of {tuple(SCHEMES)}")
    return SCHEMES[scheme]


def fuse_per_expert(
    tensors: Mapping[str, torch.Tensor], num_experts: int, scheme: str, prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``gate/up [I, H]``, ``down [H, I]`` -> ``gate_up [E, 2I, H]`` (gate rows first), ``down [E, H, I]``."""
    g, u, d = _scheme(scheme)
    gate_up, down = [], []
    for e in range(num_experts):
        keys = [per_expert_key(prefix, e, n) for n in (g, u, d)]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise KeyError(f"per-expert tensors missing {missing} (scheme {scheme}, E={num_experts})")
        gate, up, dn = (tensors[k] for k in keys)
        if gate.shape != up.shape or dn.shape != gate.shape[::-1]:
            raise ValueError(f"expert {e}: gate {tuple(gate.shape)}, up {tuple(up.shape)} must be [I, H], down [H, I]")
        gate_up.append(torch.cat([gate, up], dim=0))
        down.append(dn)
    return torch.stack(gate_up), torch.stack(down)


def split_fused(gate_up: torch.Tensor, down: torch.Tensor, scheme: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Inverse of `fuse_per_expert`: ``gate = gate_up[e, :I]``, ``up = gate_up[e, I:]``, ``down = down[e]``."""
    g, u, d = _scheme(scheme)
    E, two_i, H = gate_up.shape
    if two_i % 2 or down.shape != (E, H, two_i // 2):
        raise ValueError(f"gate_up {tuple(gate_up.shape)} must be [E, 2I, H] and down {tuple(down.shape)} [E, H, I]")
    I = two_i // 2
    out = {}
    for e in range(E):
        out[per_expert_key(prefix, e, g)] = gate_up[e, :I]
        out[per_expert_key(prefix, e, u)] = gate_up[e, I:]
        out[per_expert_key(prefix, e, d)] = down[e]
    return out


def merge_per_expert(
    tensors: Mapping[str, torch.Tensor],
    factors: Mapping[str, LoraFactors],
    num_experts: int,
    scheme: str,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Merge adapters trained on the fused ``gate_up [E, 2I, H]`` / ``down [E, H, I]`` (fused_linear, PEFT
    ``experts.base_layer.lora_*`` / ``experts.lora_*``) into per-expert disk tensors.

    ``factors``: ``{"gate_up": LoraFactors, "down": LoraFactors}`` (either may be absent). For expert e:
    ``gate += ΔW_gu[e, :I]``, ``up += ΔW_gu[e, I:]``, ``down += ΔW_d[e]``, each in float32/float64 and cast back to the
    tensor's dtype. Keys other than this layer's expert tensors pass through unchanged.
    """
    unknown = set(factors) - {"gate_up", "down"}
    if unknown:
        raise ValueError(f"factors keys must be 'gate_up' and/or 'down', got extra {sorted(unknown)}")
    g, u, d = _scheme(scheme)
    gate_up, down = fuse_per_expert(tensors, num_experts, scheme, prefix)
    out = dict(tensors)
    parts = []
    if "gate_up" in factors:
        cd = compute_dtype(gate_up, factors["gate_up"].lora_A)
        delta = factors_delta(factors["gate_up"], num_experts, cd)
        _check_same_shape(f"{prefix}experts gate_up (fused_linear [E, 2I, H])", gate_up, delta)
        I = gate_up.shape[1] // 2
        parts += [(g, delta[:, :I]), (u, delta[:, I:])]
    if "down" in factors:
        cd = compute_dtype(down, factors["down"].lora_A)
        delta = factors_delta(factors["down"], num_experts, cd)
        _check_same_shape(f"{prefix}experts down (fused_linear [E, H, I])", down, delta)
        parts.append((d, delta))
    for name, delta in parts:
        for e in range(num_experts):
            key = per_expert_key(prefix, e, name)
            w = tensors[key]
            out[key] = (w.to(delta.dtype) + delta[e]).to(w.dtype)
    return out


def merge_into_nf4(packed: torch.Tensor, state: NF4State, delta: torch.Tensor) -> tuple[torch.Tensor, NF4State]:
    """NF4 merge: ``W = dequantize_nf4(packed, state)``; ``requant(W + ΔW)`` with the same blocksize and double-quant
    setting (new absmax, since the block maxima change); the state keeps the original ``dtype``.

    ``delta`` has ``state.shape`` (e.g. ``[E, d1, d2]`` from `factors_delta`). The sum is formed in float64 when
    ``delta`` is float64, else float32; quantize_nf4 rounds it to fp32 (NF4's own arithmetic) before coding.
    """
    cd = compute_dtype(delta)
    w = dequantize_nf4(packed, state, dtype=cd)
    _check_same_shape("merge_into_nf4", w, delta)
    new_packed, new_state = quantize_nf4(
        w + delta.to(cd), blocksize=state.blocksize, double_quant=state.nested is not None
    )
    return new_packed, dataclasses.replace(new_state, dtype=state.dtype)


def _fp8_merged(q: torch.Tensor, scale_inv: torch.Tensor, delta: torch.Tensor, block: tuple[int, int] | None):
    cd = compute_dtype(delta)
    w = dequantize_fp8(q, scale_inv, block, dtype=cd)
    _check_same_shape("FP8 merge", w, delta)
    return w + delta.to(cd)


def merge_into_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, delta: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 merge: ``W = q · scale_inv`` (broadcast per ``block``), then ``requantize_fp8_block(W + ΔW, block)``:
    (q' e4m3fn ``[..., R, C]``, scale_inv' ``[..., ceil(R/bm), ceil(C/bn)]``) with NEW scales from the merged block
    maxima, in the same scale format (UE8M0 stays UE8M0). ``delta`` has ``q``'s shape (``[E, d1, d2]`` for experts).
    """
    w = _fp8_merged(q, scale_inv, delta, block)
    ue8m0 = UE8M0_DTYPE is not None and scale_inv.dtype == UE8M0_DTYPE
    return requantize_fp8_block(w, block, ue8m0=ue8m0)


def merge_fp8_to_bf16(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    delta: torch.Tensor,
    block: tuple[int, int] | None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """16-bit merge of an FP8 base: ``round_{out_dtype}(q · scale_inv + ΔW)``, the sum in fp32 (float64 if ΔW is)."""
    return _fp8_merged(q, scale_inv, delta, block).to(out_dtype)
