"""MoE routing: which k experts each token goes to, and with what weight.

Every router maps ``logits [T, E]`` (T tokens, E experts) to ``(weights [T, k], idx [T, k])``; ``idx`` is int64.
Math runs in float32, or float64 when the logits are float64 (the spec's precision); weights are returned in
that compute dtype (callers cast to the model dtype, as upstream does, where they need to).

Ties: ``torch.topk`` picks among equal values in an order PyTorch does not specify (on CPU the lower index
usually wins). Nothing here depends on it except *which* of exactly-tied experts is chosen; tests use continuous
random logits, where ties have probability zero. Routers that call topk with ``sorted=True`` return slots in
descending score order; ``canonical_order`` puts any router's output in ascending-expert order for comparison.
"""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (bf16 / fp16 / fp32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_k(k: int, num_experts: int) -> None:
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}], got {k}")


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE / Qwen3-Next / Qwen3.5-MoE / OLMoE / Mixtral.

    ``p = softmax(logits)`` over E; ``w, idx = topk(p, k)`` (descending); if ``renormalize``:
    ``w = w / sum_k(w)`` (Mixtral, Qwen3-Next default, Qwen3.5: always; Qwen3-MoE / OLMoE: ``norm_topk_prob``).
    logits ``[T, E]`` -> weights ``[T, k]`` (compute dtype), idx ``[T, k]`` int64.
    """
    _check_k(k, logits.shape[-1])
    p = torch.softmax(logits.to(compute_dtype(logits)), dim=-1)
    w, idx = torch.topk(p, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def sigmoid_group_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling: float,
    mask_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / GLM4-MoE: sigmoid scores, correction bias, group-limited top-k, routed scaling.

    With ``s = sigmoid(logits)`` and ``c = s + bias`` (``bias [E]``, the ``e_score_correction_bias``):

    1. experts form ``n_group`` contiguous groups of ``G = E / n_group``; a group's score is the sum of its two
       largest ``c`` values;
    2. the ``topk_group`` best groups are kept; every expert of another group gets ``c = mask_value``
       (``0.0`` in transformers <= 5.5, ``-inf`` from 5.6);
    3. ``idx = topk(c, k)``; the weights are ``s[idx]`` (**without** the bias);
    4. if ``renormalize``: ``w = w / (sum_k(w) + 1e-20)``; then ``w = w * routed_scaling``.

    With ``mask_value = 0.0`` a masked expert outranks an allowed expert whose ``c < 0`` (possible only for a
    negative bias); with ``-inf`` it never does. So the two choose the same experts iff the k-th largest ``c``
    among allowed experts is positive (or no expert is masked). Slot order follows ``topk(sorted=True)``
    (upstream uses ``sorted=False``; compare with `canonical_order`).
    """
    num_experts = logits.shape[-1]
    _check_k(k, num_experts)
    if num_experts % n_group != 0 or num_experts // n_group < 2:
        raise ValueError(f"E={num_experts} must split into n_group={n_group} groups of >= 2 experts (top-2 per group)")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    cd = compute_dtype(logits)
    s = torch.sigmoid(logits.to(cd))
    c = s + bias.to(cd)
    group_size = num_experts // n_group
    group_scores = c.view(-1, n_group, group_size).topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
    kept_groups = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
    group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    expert_keep = group_keep.repeat_interleave(group_size, dim=-1)  # [T, E]
    c = c.masked_fill(~expert_keep, mask_value)
    idx = torch.topk(c, k, dim=-1).indices
    w = s.gather(1, idx)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * routed_scaling, idx


def gpt_oss_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: ``top, idx = topk(logits, k)`` on the raw logits (which already include the router bias),
    then ``w = softmax(top)`` over the k values only. Weights sum to 1 without any renormalisation step.
    """
    _check_k(k, logits.shape[-1])
    top, idx = torch.topk(logits.to(compute_dtype(logits)), k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def gemma4_router_logits(x: torch.Tensor, scale: torch.Tensor, proj_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma4 router logits ``[T, E]`` from ``x [T, H]``.

    ``n = x / sqrt(mean_H(x²) + eps)`` (RMSNorm without a learned weight), ``h = n * scale[H] * H**-0.5``,
    ``logits = h @ proj_weight[E, H]ᵀ``.
    """
    cd = compute_dtype(x)
    x = x.to(cd)
    n = x * torch.pow(x.pow(2).mean(dim=-1, keepdim=True) + eps, -0.5)
    h = n * scale.to(cd) * x.shape[-1] ** -0.5
    return h @ proj_weight.to(cd).T


def gemma4_router(
    x: torch.Tensor,
    scale: torch.Tensor,
    proj_weight: torch.Tensor,
    per_expert_scale: torch.Tensor,
    k: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma4: `gemma4_router_logits`, then `softmax_topk` with renormalisation, then
    ``w = w * per_expert_scale[idx]`` (so weights sum to 1 only when per_expert_scale is all ones).
    """
    logits = gemma4_router_logits(x, scale, proj_weight, eps)
    w, idx = softmax_topk(logits, k, renormalize=True)
    return w * per_expert_scale.to(w.dtype)[idx], idx


def canonical_order(weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each token's k slots by ascending expert id: the routing decision without the slot order."""
    idx_sorted, perm = torch.sort(idx, dim=-1)
    return weights.gather(-1, perm), idx_sorted


def dense_weights(weights: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E]`` matrix with ``weights[t, j]`` at column ``idx[t, j]`` and 0 elsewhere (slots summed if repeated)."""
    out = torch.zeros(idx.shape[0], num_experts, dtype=weights.dtype, device=weights.device)
    return out.scatter_add_(1, idx, weights)
