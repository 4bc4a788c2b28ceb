"""Per-expert LoRA on 3-D expert parameters: factors, delta weights, forward delta, adapter conversion.

Notation (see `reference.layout`): ``P [E, d1, d2]``, ``lora_A [r·E, a]``, ``lora_B [b, r·E]``, scaling ``s``.

- ``A_e = lora_A[e·r:(e+1)·r]`` (``[r, a]``) in both conventions;
- ``B_e = lora_B[:, e::E]`` (``stride_e``, PEFT: column ``k·E + e`` is rank k of expert e) or
  ``B_e = lora_B[:, e·r:(e+1)·r]`` (``contiguous_r``, Unsloth's older reading); ``B_e`` is ``[b, r]``;
- standard: ``ΔW[e] = s·(B_e A_e)ᵀ`` (``a = d1``, ``b = d2``); swapped: ``ΔW[e] = s·B_e A_e`` (``a = d2``, ``b = d1``).

All functions are float64-capable: they compute in ``torch.promote_types`` of their inputs' dtypes (so float64 in
gives float64 out, and bf16 activations with fp32 factors compute in fp32), never in a lower precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference.layout import Orientation, semantic_orientation

STRIDE_E = "stride_e"
CONTIGUOUS_R = "contiguous_r"
CONVENTIONS = (STRIDE_E, CONTIGUOUS_R)


@dataclass(frozen=True)
class LoraFactors:
    """One PEFT LoRA adapter on one 3-D expert parameter.

    lora_A: ``[r·E, a]``; lora_B: ``[b, r·E]``; scaling: ``s`` (``alpha / r`` or ``alpha / sqrt(r)``);
    orientation: STANDARD / SWAPPED (see `reference.layout`); convention: STRIDE_E or CONTIGUOUS_R.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    orientation: Orientation
    convention: str = STRIDE_E

    def delta_weight(self, num_experts: int) -> torch.Tensor:
        """``ΔW [E, d1, d2]``; see `delta_weight`."""
        return delta_weight(
            self.lora_A,
            self.lora_B,
            num_experts,
            self.scaling,
            orientation=self.orientation,
            convention=self.convention,
        )

    def forward_delta(
        self, x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, expert_layout: str
    ) -> torch.Tensor:
        """``[S, out]`` LoRA contribution for rows ``x [S, in]`` routed to ``expert_ids [S]``; see `lora_forward_delta`."""
        return lora_forward_delta(
            x,
            self.lora_A,
            self.lora_B,
            expert_ids,
            num_experts,
            self.scaling,
            orientation=self.orientation,
            expert_layout=expert_layout,
            convention=self.convention,
        )


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown lora_B convention {convention!r}; expected one of {CONVENTIONS}")


def _check_orientation(orientation: Orientation | str) -> Orientation:
    o = Orientation(orientation)
    if o is Orientation.UNKNOWN:
        raise ValueError("orientation UNKNOWN cannot be applied; resolve it with reference.layout.detect_orientation")
    return o


def expert_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int, convention: str = STRIDE_E
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split PEFT factors per expert: ``lora_A [r·E, a]`` -> ``A [E, r, a]``, ``lora_B [b, r·E]`` -> ``B [E, b, r]``.

    ``A[e] = lora_A[e·r:(e+1)·r]``; ``B[e] = lora_B[:, e::E]`` (stride_e) or ``lora_B[:, e·r:(e+1)·r]`` (contiguous_r).
    """
    _check_convention(convention)
    E = int(num_experts)
    if lora_A.ndim != 2 or lora_B.ndim != 2:
        raise ValueError(f"lora_A and lora_B must be 2-D, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    rE, a = lora_A.shape
    b, rE_b = lora_B.shape
    if E < 1 or rE != rE_b or rE < E or rE % E != 0:
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)} rows and lora_B {tuple(lora_B.shape)} cols must both be r·E with r >= 1, E={E}"
        )
    r = rE // E
    A = lora_A.reshape(E, r, a)
    if convention == STRIDE_E:
        B = lora_B.reshape(b, r, E).permute(2, 0, 1)  # column k·E + e -> B[e, :, k]
    else:
        B = lora_B.reshape(b, E, r).permute(1, 0, 2)  # column e·r + k -> B[e, :, k]
    return A, B


def pack_factors(A: torch.Tensor, B: torch.Tensor, convention: str = STRIDE_E) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `expert_factors`: ``A [E, r, a]``, ``B [E, b, r]`` -> ``lora_A [r·E, a]``, ``lora_B [b, r·E]``."""
    _check_convention(convention)
    E, r, a = A.shape
    E_b, b, r_b = B.shape
    if (E, r) != (E_b, r_b):
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} disagree on (E, r)")
    lora_A = A.reshape(E * r, a)
    if convention == STRIDE_E:
        lora_B = B.permute(1, 2, 0).reshape(b, r * E)
    else:
        lora_B = B.permute(1, 0, 2).reshape(b, E * r)
    return lora_A.contiguous(), lora_B.contiguous()


def delta_weight(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    num_experts: int,
    scaling: float,
    *,
    orientation: Orientation | str,
    convention: str = STRIDE_E,
) -> torch.Tensor:
    """``ΔW [E, d1, d2]``: standard ``ΔW[e] = s·(B_e A_e)ᵀ`` ([d1=a, d2=b]); swapped ``ΔW[e] = s·B_e A_e`` ([d1=b, d2=a])."""
    o = _check_orientation(orientation)
    A, B = expert_factors(lora_A, lora_B, num_experts, convention)
    cd = torch.promote_types(A.dtype, B.dtype)
    BA = torch.bmm(B.to(cd), A.to(cd))  # [E, b, a]
    if o is Orientation.STANDARD:
        BA = BA.transpose(1, 2)
    return BA * scaling


def expert_ids_from_offsets(offsets: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """``offsets [E]`` (END offsets of expert-sorted rows, int32/int64) -> ``expert_ids [S]`` (int64), S = offsets[-1].

    Rows ``[offsets[e-1], offsets[e])`` belong to expert e (``offsets[-1]`` counts as 0). Offsets must be
    non-decreasing; ``num_rows`` if given must equal ``offsets[-1]``.
    """
    off = offsets.to(torch.int64)
    counts = torch.diff(off, prepend=off.new_zeros(1))
    if (counts < 0).any():
        raise ValueError(f"offsets must be non-decreasing END offsets, got {offsets.tolist()}")
    S = int(off[-1]) if off.numel() else 0
    if num_rows is not None and num_rows != S:
        raise ValueError(f"offsets end at {S} but there are {num_rows} rows")
    return torch.repeat_interleave(torch.arange(off.numel(), device=off.device), counts)


def lora_forward_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor | None,
    num_experts: int,
    scaling: float,
    *,
    orientation: Orientation | str,
    expert_layout: str,
    convention: str = STRIDE_E,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA contribution ``[S, out]`` for rows ``x [S, in]``, row i going to expert ``expert_ids[i]``.

    Equals ``x @ ΔW[e]ᵀ`` for fused_linear / module_list (``W [E, out, in]``, ``y = x Wᵀ``) and ``x @ ΔW[e]`` for
    gpt_oss (``W [E, in, out]``, ``y = x W``), computed from the rank-r factors without forming ΔW:

    - orientation == semantic orientation of the layout (lora_A spans the input): ``s·x·A_eᵀ·B_eᵀ``;
    - the other orientation (lora_B spans the input): ``s·x·B_e·A_e``.

    Give either ``expert_ids [S]`` or ``offsets [E]`` (END offsets of expert-sorted rows; see
    `expert_ids_from_offsets`).
    """
    o = _check_orientation(orientation)
    if (expert_ids is None) == (offsets is None):
        raise ValueError("give exactly one of expert_ids and offsets")
    if offsets is not None:
        expert_ids = expert_ids_from_offsets(offsets, x.shape[0])
    if x.ndim != 2 or expert_ids.shape != (x.shape[0],):
        raise ValueError(f"x must be [S, in] and expert_ids [S]; got {tuple(x.shape)} and {tuple(expert_ids.shape)}")
    A, B = expert_factors(lora_A, lora_B, num_experts, convention)  # [E, r, a], [E, b, r]
    ids = expert_ids.to(torch.int64)
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert_ids out of range [0, {num_experts}): min {int(ids.min())}, max {int(ids.max())}")
    if o is semantic_orientation(expert_layout):
        first, second = A[ids].transpose(1, 2), B[ids].transpose(1, 2)  # [S, a, r], [S, r, b]
    else:
        first, second = B[ids], A[ids]  # [S, b, r], [S, r, a]
    if first.shape[1] != x.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} input features but the {o.value} factors in layout {expert_layout} "
            f"expect {first.shape[1]} (lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)})"
        )
    cd = torch.promote_types(torch.promote_types(x.dtype, first.dtype), second.dtype)
    h = torch.bmm(x.to(cd).unsqueeze(1), first.to(cd))  # [S, 1, r]
    return torch.bmm(h, second.to(cd)).squeeze(1) * scaling


def convert_adapter(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    num_experts: int,
    *,
    src_orientation: Orientation | str,
    dst_orientation: Orientation | str,
    src_convention: str = STRIDE_E,
    dst_convention: str = STRIDE_E,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express an adapter in another orientation / convention with the same ``ΔW [E, d1, d2]`` and scaling.

    Orientation change swaps the factors' roles: ``s·(B_e A_e)ᵀ = s·(A_eᵀ)(B_eᵀ)``, so ``B'_e = A_eᵀ`` and
    ``A'_e = B_eᵀ`` (exact: a transpose, no arithmetic). Convention change re-indexes lora_B's columns.
    """
    so, do = _check_orientation(src_orientation), _check_orientation(dst_orientation)
    A, B = expert_factors(lora_A, lora_B, num_experts, src_convention)  # [E, r, a], [E, b, r]
    if so is not do:
        A, B = B.transpose(1, 2), A.transpose(1, 2)
    return pack_factors(A, B, dst_convention)
