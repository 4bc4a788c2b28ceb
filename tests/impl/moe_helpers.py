"""Helpers shared by tests/impl: tiny zoo models, quant configs per kind, reference experts on dequantized weights."""

from __future__ import annotations

import math

import torch

from impl.quant_experts import QuantizedExperts
from impl.storage import DenseConfig, FP8Config, NF4Config
from reference import experts as ref_experts
from reference.lora import LoraFactors
from tests.support import zoo

KINDS = ("dense", "nf4", "fp8")
# a family with fused 3-D experts in the installed transformers (4.57: only GPT-OSS)
FUSED_FAMILY = "gpt_oss" if zoo.compat.expert_layout("qwen3_moe", zoo.installed_version()) == "module_list" else "qwen3_moe"
F64 = torch.float64

# Relative Frobenius-error bounds of impl (compute dtype) vs the float64 reference on the SAME (dequantized) weights.
# bf16: each rounding is <= 2^-9 relative (2^-8 spacing); an expert MLP chains ~6 rounded steps (x, two GEMM outputs,
# gate, product, LoRA add) whose errors add in quadrature with random signs: 2^-8 * sqrt(6) ≈ 1e-2; bound 2e-2.
# fp32: 2^-24 per rounding, GEMMs over <= 2I = 512 terms: sqrt(512)*6e-8 ≈ 1.4e-6; bound 1e-5.
REL_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(F64)
    return float((got.to(F64) - ref).norm() / ref.norm().clamp_min(1e-300))


def quant_config(kind: str, compute_dtype: torch.dtype = torch.bfloat16, variant: str = "2i_ne_h"):
    """Config per kind. FP8 uses 128x128 blocks on the fp8 variant, else 16x16 (tiny dims, same code path)."""
    if kind == "nf4":
        return NF4Config(blocksize=64, double_quant=False, compute_dtype=compute_dtype)
    if kind == "fp8":
        block = (128, 128) if variant == "fp8" else (16, 16)
        return FP8Config(block=block, compute_dtype=compute_dtype)
    return DenseConfig(compute_dtype=compute_dtype)


def tiny(family: str, variant: str = "2i_ne_h", dtype=torch.float32, seed: int = 0):
    """A zoo model with experts / routers re-randomised to unit-ish scale (init std 0.02 would make LoRA invisible)."""
    model = zoo.build_model(family, variant, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    for ex in zoo.describe(model)["experts"]:
        with torch.no_grad():
            for _, p in ex.named_parameters(recurse=False):
                fan_in = p.shape[-1] if not getattr(ex, "is_transposed", False) or p.ndim < 3 else p.shape[-2]
                p.copy_((torch.randn(p.shape, generator=g) / math.sqrt(fan_in)).to(p.dtype))
    return model


def routing_inputs(
    E: int, H: int, T: int = 12, k: int = 2, seed: int = 3, dtype=torch.float32, skip: int | None = None
):
    """x [T, H], idx [T, k] (distinct experts per token; expert ``skip`` never chosen), w [T, k] softmax-like."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    pool = [e for e in range(E) if e != skip]
    idx = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(dtype)
    return x, idx, w


def reference_experts(q: QuantizedExperts, x, idx, w, lora: dict[str, LoraFactors] | None = None):
    """reference.experts in float64 on the module's dequantized weights (and biases)."""
    gu = q.storage("gate_up_proj").dequantize(torch.float32).to(F64)
    dn = q.storage("down_proj").dequantize(torch.float32).to(F64)
    if q.is_transposed:
        return ref_experts.gpt_oss_experts(
            x.to(F64), idx, w.to(F64), gu, q.gate_up_proj_bias.to(F64), dn, q.down_proj_bias.to(F64),
            alpha=float(q.alpha), limit=float(q.limit), lora=lora, compute_dtype=F64,
        )  # fmt: skip
    return ref_experts.fused_linear_experts(
        x.to(F64), idx, w.to(F64), gu, dn, act=_act_name(q), lora=lora, compute_dtype=F64
    )


def _act_name(q: QuantizedExperts) -> str:
    cfg = q.config
    for attr in ("hidden_act", "hidden_activation"):
        v = getattr(cfg, attr, None)
        if isinstance(v, str):
            return v
    raise AttributeError(f"no activation name on {type(cfg).__name__}")
