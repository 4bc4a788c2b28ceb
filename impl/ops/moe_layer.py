"""A whole fused_linear MoE expert layer (Qwen3-MoE / Mixtral style) on top of a grouped linear.

``x [T, H]``, routing ``idx [T, k]`` / ``w [T, k]``, ``gate_up [E, 2I, H]`` (gate rows first), ``down [E, H, I]``::

    sort pairs by expert (stable) -> x_s = x[token_idx] -> h = linear(x_s, gate_up) [S, 2I]
    -> a = silu(h[:, :I]) * h[:, I:] -> y = linear(a, down) [S, H] -> out[t] += w[t, j] * y  (fp32) -> [T, H]

``linear`` is `impl.ops.grouped_lora.grouped_linear` (Triton, any weight format) or a baseline with the same signature
(`impl.ops.baselines`). The same dispatch/combine code is used for every variant so that layer timings differ only in
the expert GEMMs. Semantics match `reference.experts.fused_linear_experts` (with LoRA: PEFT stride-E, swapped).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from impl.ops.combine import combine, inverse_order
from impl.ops.formats import GroupedWeight
from impl.ops.glue import gather_rows, silu_mul
from impl.ops.grouped_lora import grouped_linear

Linear = Callable[..., torch.Tensor]


def sort_pairs(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``idx [T, k]`` -> (order [S] int64 pair ids sorted by expert (stable), token_idx [S], offsets int32 [E])."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add instead of bincount: no host sync, so the layer can be captured in a CUDA graph
    counts = torch.zeros(num_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat.long(),
                                                                                      torch.ones_like(flat, dtype=torch.int64))
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return order, order // idx.shape[1], offsets


def moe_layer(
    x: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    gate_up: GroupedWeight,
    down: GroupedWeight,
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
    linear: Linear = grouped_linear,
    glue: str = "fast",
) -> torch.Tensor:
    """``[T, H]`` in x's dtype. lora: {"gate_up": (lora_A, lora_B, scaling), "down": (...)} (either key optional).

    glue: "fast" (`impl.ops.glue.gather_rows`, `silu_mul`, `impl.ops.combine`: Triton, no atomics, no fp32
    intermediates) or "stock" (``x[token_idx]``, ``F.silu(g) * u``, ``index_add_`` of fp32 products, as
    transformers' grouped_mm experts and the baseline measurements do).
    """
    if glue not in ("fast", "stock"):
        raise ValueError(f"glue must be 'fast' or 'stock', got {glue!r}")
    E, two_i, H = gate_up.shape
    if down.shape != (E, H, two_i // 2):
        raise ValueError(f"down {down.shape} does not match gate_up {gate_up.shape}: need {(E, H, two_i // 2)}")
    if x.dim() != 2 or x.shape[1] != H or idx.shape != w.shape or idx.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} / idx {tuple(idx.shape)} / w {tuple(w.shape)} do not match H={H}")
    lora = lora or {}
    order, token_idx, offsets = sort_pairs(idx, E)
    if glue == "fast":
        inv = inverse_order(order)
        xs = gather_rows(x, token_idx, inv, idx.shape[1])
        h = linear(xs, gate_up, offsets, *lora.get("gate_up", (None, None, 1.0)))
        a = silu_mul(h)
        y = linear(a, down, offsets, *lora.get("down", (None, None, 1.0)))
        return combine(y, w, order, token_idx, inv).to(x.dtype)
    xs = x[token_idx]
    h = linear(xs, gate_up, offsets, *lora.get("gate_up", (None, None, 1.0)))
    g, u = h.split(two_i // 2, dim=-1)
    a = F.silu(g) * u
    y = linear(a, down, offsets, *lora.get("down", (None, None, 1.0)))
    ws = w.reshape(-1)[order].to(torch.float32)
    out = torch.zeros((x.shape[0], H), dtype=torch.float32, device=x.device)
    out = out.index_add(0, token_idx, y.to(torch.float32) * ws[:, None])
    return out.to(x.dtype)
