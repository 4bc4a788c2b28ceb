"""Token dispatch: group the S = T·k (token, slot) pairs by expert, and combine expert outputs back to tokens.

Pair ``p = t·k + j`` is token t's j-th routing slot, going to expert ``idx[t, j]``. Sorting pairs by expert
(stable, so within an expert pairs stay in (token, slot) order) gives contiguous per-expert row blocks; block e
is rows ``[offsets[e-1], offsets[e])`` with ``offsets[-1] := 0``. ``offsets`` are int32 inclusive-cumsum END
offsets with no leading 0: the ``offs=`` convention of ``torch._grouped_mm`` / ``F.grouped_mm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dispatch:
    """Pairs sorted by expert.

    order [S] int64: pair index ``t·k + j`` of each sorted row; expert_ids_sorted [S] int64;
    token_idx [S] = order // k; slot_idx [S] = order % k; counts [E] int64 rows per expert;
    offsets [E] int32 END offsets (``cumsum(counts)``).
    """

    order: torch.Tensor
    expert_ids_sorted: torch.Tensor
    token_idx: torch.Tensor
    slot_idx: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    num_experts: int
    top_k: int


def sort_by_expert(idx: torch.Tensor, num_experts: int) -> Dispatch:
    """``idx [T, k]`` (expert id of each token slot, any integer dtype) -> `Dispatch` with S = T·k rows."""
    if idx.ndim != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must be an integer [T, k] tensor, got {idx.dtype} {tuple(idx.shape)}")
    flat = idx.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}); got min {int(flat.min())}, max {int(flat.max())}")
    k = idx.shape[1]
    expert_ids_sorted, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return Dispatch(
        order=order,
        expert_ids_sorted=expert_ids_sorted,
        token_idx=order // k,
        slot_idx=order % k,
        counts=counts,
        offsets=torch.cumsum(counts, dim=0).to(torch.int32),
        num_experts=num_experts,
        top_k=k,
    )


def gather(x: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """``x [T, H]`` -> ``x_sorted [S, H]``, row i = ``x[d.token_idx[i]]``."""
    return x[d.token_idx]


def combine(
    y_sorted: torch.Tensor,
    d: Dispatch,
    weights: torch.Tensor,
    num_tokens: int,
    accum_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted sum back to tokens: ``out[t] = sum_j weights[t, j] · y[row of pair (t, j)]``.

    y_sorted ``[S, H]``, weights ``[T, k]`` -> ``[num_tokens, H]``. The products and the sum over the k slots
    (in slot order 0..k-1) are done in ``accum_dtype`` (fp32 like grouped_mm, or the model dtype like eager
    ``index_add_``; default: float32, float64 for float64 rows, never lower than the input); the result is cast
    to ``out_dtype`` (default ``y_sorted.dtype``).
    """
    if accum_dtype is None:
        accum_dtype = torch.promote_types(y_sorted.dtype, torch.float32)
    S, H = y_sorted.shape
    if weights.shape != (num_tokens, d.top_k) or S != num_tokens * d.top_k:
        raise ValueError(
            f"weights {tuple(weights.shape)} / y_sorted {tuple(y_sorted.shape)} do not match "
            f"T={num_tokens}, k={d.top_k} (S must be T·k)"
        )
    w_sorted = weights[d.token_idx, d.slot_idx].to(accum_dtype)
    contrib = y_sorted.to(accum_dtype) * w_sorted[:, None]
    by_pair = torch.empty_like(contrib)
    by_pair[d.order] = contrib  # undo the sort: row p = t·k + j
    out = by_pair.view(num_tokens, d.top_k, H).sum(dim=1)
    return out.to(out_dtype or y_sorted.dtype)
