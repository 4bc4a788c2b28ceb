"""Helpers shared by tests/impl: tiny zoo models, quant configs per kind, reference experts on dequantized weights."""

from __future__ import annotations

import dataclasses
import math

import torch

from impl.quant_experts import QuantizedExperts
from impl.storage import DenseConfig, FP8Config, NF4Config
from reference import experts as ref_experts
from reference.layout import peft_swaps
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


PEFT_RULES = ("0.18.1", "0.19.0", "0.21.2")  # one release per swap rule of reference.layout.peft_swaps


def contradicting_peft_versions(live_swaps: bool, is_transposed: tuple[bool, ...]) -> list[str]:
    """PEFT releases whose rule names the other orientation than ``live_swaps`` for every ``is_transposed`` value a
    reader may assume (both when the checkpoint does not tell it): a peft_version that must be refused."""
    return [v for v in PEFT_RULES if {peft_swaps(v, 3, t) for t in is_transposed} == {not live_swaps}]


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


def tiny(family: str, variant: str = "2i_ne_h", dtype=torch.float32, seed: int = 0, **overrides):
    """A zoo model with experts / routers re-randomised to unit-ish scale (init std 0.02 would make LoRA invisible);
    ``overrides`` go to the config (e.g. ``num_experts``)."""
    model = zoo.build_model(family, variant, seed=seed, dtype=dtype, **overrides)
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


def ctx_tensors(out: torch.Tensor) -> list[torch.Tensor]:
    """The tensors custom autograd Functions in the graph of ``out`` keep as ``ctx`` attributes (not through
    ``save_for_backward``, so ``saved_tensors_hooks`` does not see them)."""
    held = []
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for v in getattr(node, "__dict__", {}).values():  # custom Function: the node is its ctx
            if dataclasses.is_dataclass(v):  # e.g. a GroupedWeight or Routing kept on ctx
                v = [getattr(v, f.name) for f in dataclasses.fields(v)]
            held += [t for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
        todo += [n for n, _ in node.next_functions]
    return held


def held_for_backward(forward, root=lambda out: out) -> tuple[object, list[torch.Tensor]]:
    """``(out, tensors kept for its backward)``: ``forward()`` runs under ``saved_tensors_hooks`` (every saved tensor),
    then the graph of ``root(out)`` (a tensor, e.g. ``out.loss``) is walked for custom-Function ``ctx`` tensors."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = forward()
    return out, saved + ctx_tensors(root(out))


def dense_copies(tensors: list[torch.Tensor], q: QuantizedExperts) -> list[tuple]:
    """The floating-point tensors among ``tensors`` that could be a dequantized expert weight of ``q``: the dense
    shape ``[E, d1, d2]`` (or its transpose) of a weight, or at least as many elements as the smaller weight. (FP8
    storage itself is ``[E, d1, d2]`` e4m3 codes: storage, not a dequantized copy.)"""
    shapes = {tuple(q.storage(n).shape) for n in ("gate_up_proj", "down_proj")}
    shapes |= {(e, b, a) for e, a, b in shapes}
    smallest = min(q.storage(n).shape.numel() for n in ("gate_up_proj", "down_proj"))
    dense = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    return [(tuple(t.shape), t.dtype) for t in tensors
            if t.dtype in dense and (tuple(t.shape) in shapes or t.numel() >= smallest)]  # fmt: skip
