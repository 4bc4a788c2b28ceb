"""Expert MLPs for each weight layout, as a vectorised forward and as an obviously-correct per-expert loop.

Inputs of every ``*_experts`` function: ``x [T, H]``, ``idx [T, k]`` (expert of each token slot), ``w [T, k]``
(routing weights); output ``[T, H]`` = ``sum_j w[t, j] · MLP_{idx[t, j]}(x[t])``.

Layouts (names from `reference.layout`):

- fused_linear: ``gate_up [E, 2I, H]``, ``down [E, H, I]`` (F.linear layout, ``y = x @ W[e]ᵀ``);
  gate = rows ``[0, I)``, up = rows ``[I, 2I)``; ``MLP(x) = (act(x Gᵀ) * (x Uᵀ)) Dᵀ``.
- gpt_oss: ``gate_up [E, H, 2I]``, ``gate_up_bias [E, 2I]``, ``down [E, I, H]``, ``down_bias [E, H]`` (``y = x @ W[e]``);
  gate/up interleaved: gate = columns ``0::2``, up = ``1::2``; clamped SwiGLU (`gpt_oss_glu`).
- module_list: per-expert 2-D ``gate [I, H]``, ``up [I, H]``, ``down [H, I]`` (transformers 4.57 nn.Linear).

Precision: the MLP math runs in ``compute_dtype`` (default ``x.dtype``; pass float64 for the spec), the
weighted combine accumulates in ``accum_dtype`` (default: float32, or float64 when computing in float64), and the
result is returned in ``compute_dtype``.

LoRA (fused_linear, gpt_oss): ``lora = {"gate_up": LoraFactors, "down": LoraFactors}`` (either key optional), the
per-expert delta math from `reference.lora`: the vectorised forward adds ``LoraFactors.forward_delta`` to each
projection; the loop adds ``LoraFactors.delta_weight`` to each expert's weight (two independent routes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from reference import dispatch
from reference.layout import FUSED_LINEAR, GPT_OSS
from reference.lora import LoraFactors

LORA_KEYS = ("gate_up", "down")


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x · sigmoid(x)``."""
    return x * torch.sigmoid(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`` (transformers' ``gelu_pytorch_tanh``)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu,
    "swish": silu,
    "gelu_pytorch_tanh": gelu_tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise KeyError(f"activation {name!r} not in the reference; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def gpt_oss_glu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS clamped SwiGLU on interleaved ``gate_up [..., 2I]`` -> ``[..., I]``.

    ``g = min(gate_up[..., 0::2], limit)``, ``u = clamp(gate_up[..., 1::2], -limit, limit)``,
    ``out = (u + 1) · g · sigmoid(alpha · g)``.
    """
    g = gate_up[..., 0::2].clamp(max=limit)
    u = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


def _dtypes(x: torch.Tensor, compute_dtype, accum_dtype) -> tuple[torch.dtype, torch.dtype]:
    cd = compute_dtype or x.dtype
    ad = accum_dtype or (torch.float64 if cd == torch.float64 else torch.float32)
    return cd, ad


def _check_routing(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, num_experts: int) -> None:
    if x.ndim != 2 or idx.ndim != 2 or w.shape != idx.shape or idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"need x [T,H], idx [T,k], w [T,k]; got {tuple(x.shape)}, {tuple(idx.shape)}, {tuple(w.shape)}"
        )
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_experts):
        raise ValueError(f"idx must be in [0, {num_experts}); got min {int(idx.min())}, max {int(idx.max())}")


def _lora(lora: Mapping[str, LoraFactors] | None, dtype: torch.dtype) -> dict[str, LoraFactors]:
    """Validate the lora mapping and cast its factors to the compute dtype."""
    if lora is None:
        return {}
    unknown = set(lora) - set(LORA_KEYS)
    if unknown:
        raise KeyError(f"lora keys must be among {LORA_KEYS}; got unknown {sorted(unknown)}")
    return {
        name: dataclasses.replace(f, lora_A=f.lora_A.to(dtype), lora_B=f.lora_B.to(dtype)) for name, f in lora.items()
    }


# ----------------------------------------------------------------------------------------------------------
# One expert (2-D weights): the definitions every other function must agree with.


def fused_linear_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """One fused_linear expert: ``x [n, H]``, ``gate_up [2I, H]``, ``down [H, I]`` -> ``[n, H]``."""
    inter = down.shape[1]
    gate, up = gate_up[:inter], gate_up[inter:]
    return module_list_mlp(x, gate, up, down, act)


def module_list_mlp(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """One expert from separate weights: ``(act(x Gᵀ) * (x Uᵀ)) Dᵀ``, G/U ``[I, H]``, D ``[H, I]``."""
    return (activation(act)(x @ gate.T) * (x @ up.T)) @ down.T


def gpt_oss_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """One GPT-OSS expert: ``gpt_oss_glu(x W_gu + b_gu) W_d + b_d``; W_gu ``[H, 2I]``, W_d ``[I, H]``."""
    return gpt_oss_glu(x @ gate_up + gate_up_bias, alpha, limit) @ down + down_bias


# ----------------------------------------------------------------------------------------------------------
# The per-expert loop.


def loop_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    num_experts: int,
    accum_dtype: torch.dtype,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] · expert_fn(idx[t, j], x[t])``, one expert at a time (accumulated in accum_dtype).

    ``expert_fn(e, x_e [n, H]) -> [n, H]``; experts with no token are skipped.
    """
    out = torch.zeros(x.shape, dtype=accum_dtype, device=x.device)
    for e in range(num_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = expert_fn(e, x[tok]).to(accum_dtype)
        out.index_add_(0, tok, y * w[tok, slot].to(accum_dtype)[:, None])
    return out


def fused_linear_experts_loop(
    x, idx, w, gate_up, down, act="silu", lora=None, compute_dtype=None, accum_dtype=None
) -> torch.Tensor:
    """Loop form of `fused_linear_experts` (LoRA applied as ``W + ΔW`` per expert)."""
    cd, ad = _dtypes(x, compute_dtype, accum_dtype)
    num_experts = gate_up.shape[0]
    _check_routing(x, idx, w, num_experts)
    gate_up, down = gate_up.to(cd), down.to(cd)
    lo = _lora(lora, cd)
    if "gate_up" in lo:
        gate_up = gate_up + lo["gate_up"].delta_weight(num_experts)
    if "down" in lo:
        down = down + lo["down"].delta_weight(num_experts)
    out = loop_experts(x.to(cd), idx, w, lambda e, xe: fused_linear_mlp(xe, gate_up[e], down[e], act), num_experts, ad)
    return out.to(cd)


def gpt_oss_experts_loop(
    x, idx, w, gate_up, gate_up_bias, down, down_bias, alpha=1.702, limit=7.0, lora=None, compute_dtype=None,
    accum_dtype=None,
) -> torch.Tensor:  # fmt: skip
    """Loop form of `gpt_oss_experts`."""
    cd, ad = _dtypes(x, compute_dtype, accum_dtype)
    num_experts = gate_up.shape[0]
    _check_routing(x, idx, w, num_experts)
    gate_up, gate_up_bias, down, down_bias = (t.to(cd) for t in (gate_up, gate_up_bias, down, down_bias))
    lo = _lora(lora, cd)
    if "gate_up" in lo:
        gate_up = gate_up + lo["gate_up"].delta_weight(num_experts)
    if "down" in lo:
        down = down + lo["down"].delta_weight(num_experts)

    def fn(e, xe):
        return gpt_oss_mlp(xe, gate_up[e], gate_up_bias[e], down[e], down_bias[e], alpha, limit)

    return loop_experts(x.to(cd), idx, w, fn, num_experts, ad).to(cd)


def module_list_experts_loop(
    x, idx, w, gate: Sequence, up: Sequence, down: Sequence, act="silu", compute_dtype=None, accum_dtype=None
) -> torch.Tensor:
    """Loop form of `module_list_experts`."""
    cd, ad = _dtypes(x, compute_dtype, accum_dtype)
    _check_routing(x, idx, w, len(gate))

    def fn(e, xe):
        return module_list_mlp(xe, gate[e].to(cd), up[e].to(cd), down[e].to(cd), act)

    return loop_experts(x.to(cd), idx, w, fn, len(gate), ad).to(cd)


# ----------------------------------------------------------------------------------------------------------
# Vectorised: dispatch (sort by expert), one batched matmul over the S pairs with gathered weights, combine.


def _pairs(x, idx, num_experts, cd):
    d = dispatch.sort_by_expert(idx, num_experts)
    return d, dispatch.gather(x.to(cd), d)


def fused_linear_experts(
    x, idx, w, gate_up, down, act="silu", lora=None, compute_dtype=None, accum_dtype=None
) -> torch.Tensor:
    """fused_linear experts: ``gate_up [E, 2I, H]``, ``down [E, H, I]`` -> ``[T, H]``.

    Per sorted pair row i with expert e: ``h = x_i W_gu[e]ᵀ`` (``[2I]``), ``g, u = h[:I], h[I:]``,
    ``y_i = (act(g) * u) W_d[e]ᵀ``; then `dispatch.combine` with the routing weights.
    """
    cd, ad = _dtypes(x, compute_dtype, accum_dtype)
    num_experts, two_i, _ = gate_up.shape
    _check_routing(x, idx, w, num_experts)
    lo = _lora(lora, cd)
    d, xs = _pairs(x, idx, num_experts, cd)
    eids = d.expert_ids_sorted
    h = torch.einsum("sh,soh->so", xs, gate_up.to(cd)[eids])  # [S, 2I]
    if "gate_up" in lo:
        h = h + lo["gate_up"].forward_delta(xs, eids, num_experts, FUSED_LINEAR)
    g, u = h.split(two_i // 2, dim=-1)
    a = activation(act)(g) * u  # [S, I]
    y = torch.einsum("si,shi->sh", a, down.to(cd)[eids])  # [S, H]
    if "down" in lo:
        y = y + lo["down"].forward_delta(a, eids, num_experts, FUSED_LINEAR)
    return dispatch.combine(y, d, w, x.shape[0], accum_dtype=ad, out_dtype=cd)


def gpt_oss_experts(
    x, idx, w, gate_up, gate_up_bias, down, down_bias, alpha=1.702, limit=7.0, lora=None, compute_dtype=None,
    accum_dtype=None,
) -> torch.Tensor:  # fmt: skip
    """GPT-OSS experts: ``gate_up [E, H, 2I]`` (interleaved), ``gate_up_bias [E, 2I]``, ``down [E, I, H]``,
    ``down_bias [E, H]`` -> ``[T, H]``; per pair ``y_i = gpt_oss_glu(x_i W_gu[e] + b_gu[e]) W_d[e] + b_d[e]``.
    """
    cd, ad = _dtypes(x, compute_dtype, accum_dtype)
    num_experts = gate_up.shape[0]
    _check_routing(x, idx, w, num_experts)
    lo = _lora(lora, cd)
    d, xs = _pairs(x, idx, num_experts, cd)
    eids = d.expert_ids_sorted
    h = torch.einsum("sh,sho->so", xs, gate_up.to(cd)[eids]) + gate_up_bias.to(cd)[eids]  # [S, 2I]
    if "gate_up" in lo:
        h = h + lo["gate_up"].forward_delta(xs, eids, num_experts, GPT_OSS)
    a = gpt_oss_glu(h, alpha, limit)  # [S, I]
    y = torch.einsum("si,sih->sh", a, down.to(cd)[eids]) + down_bias.to(cd)[eids]  # [S, H]
    if "down" in lo:
        y = y + lo["down"].forward_delta(a, eids, num_experts, GPT_OSS)
    return dispatch.combine(y, d, w, x.shape[0], accum_dtype=ad, out_dtype=cd)


def module_list_experts(
    x, idx, w, gate: Sequence, up: Sequence, down: Sequence, act="silu", compute_dtype=None, accum_dtype=None
) -> torch.Tensor:
    """Per-expert 2-D weights (lists of E tensors: gate/up ``[I, H]``, down ``[H, I]``) -> ``[T, H]``.

    Stacked, these are the fused_linear layout with ``gate_up[e] = cat(gate[e], up[e])`` (the 5.x load-time
    converter's ``Concatenate(dim=1)``), which is exactly how this is computed.
    """
    if not (len(gate) == len(up) == len(down)):
        raise ValueError(f"gate/up/down lists differ in length: {len(gate)}, {len(up)}, {len(down)}")
    gate_up = torch.cat([torch.stack(list(gate)), torch.stack(list(up))], dim=1)  # [E, 2I, H]
    return fused_linear_experts(
        x, idx, w, gate_up, torch.stack(list(down)), act, compute_dtype=compute_dtype, accum_dtype=accum_dtype
    )
