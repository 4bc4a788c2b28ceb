"""The grouped GEMM entry point of the Triton kernels, and the rules that pick a kernel and a LoRA path.

- `grouped_mm`: ``x @ W_e.T`` (or ``x @ W_e``, trans) per expert with an optional LoRA epilogue. NF4 forwards with at
  most DECODE_MAX_ROWS_PER_EXPERT mean rows per expert go to the split-K decode kernel (`impl.ops.nf4_decode`,
  `nf4_decode_route`), everything else to the K-loop kernel (`impl.ops.kloop`).
- `grouped_lora_mm`: base + LoRA ``(y, mid)``, with ``mid = x @ D_e`` computed inside the base K loop (fused) or by a
  separate narrow launch (unfused; `lora_path` says which and why). ``MOE_OPS_LORA_FUSED`` (default "0" = unfused;
  "1" = fused): the unfused launches measured cheaper (reports/bench/NOTES.md, "LoRA overhead").
"""

from __future__ import annotations

import os

import torch

from impl.ops.formats import FMT_BF16, FMT_NF4, GroupedWeight, check_operands, interpret_mode
from impl.ops.kloop import TileConfig, kloop_mm, launch_config, lora_unfusable_reason, uses_act_prequant
from impl.ops.nf4_decode import nf4_decode_mm

DECODE_MAX_ROWS_PER_EXPERT = 16
DECODE_REASON = "nf4 decode kernel (impl.ops.nf4_decode) for <= 16 mean rows per expert"


def nf4_decode_route(weight: GroupedWeight, trans: bool, rows: int, config: TileConfig | None) -> bool:
    """True where `grouped_mm` hands an NF4 forward to `impl.ops.nf4_decode.nf4_decode_mm` (default tiles only): at
    most DECODE_MAX_ROWS_PER_EXPERT mean rows per expert, where it measured faster than the K-loop kernel at every
    token count (reports/bench/NOTES.md, "NF4 decode kernel")."""
    if weight.fmt != FMT_NF4 or trans or config is not None or rows == 0:
        return False
    return rows / weight.num_experts <= DECODE_MAX_ROWS_PER_EXPERT


def grouped_mm(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    *,
    trans: bool = False,
    lora_in: torch.Tensor | None = None,
    lora_out: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_down: torch.Tensor | None = None,
    lora_mid: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
    dot_fp32: bool | None = None,
    act_prequant: bool | None = None,
) -> torch.Tensor:
    """Grouped ``x @ W_e.T`` (``trans=False``: x [S, C] -> [S, R]) or ``x @ W_e`` (``trans=True``: x [S, R] -> [S, C]).

    offsets: int32 [E] END offsets on x's device (``offsets[-1] <= S``; rows past it are left unwritten).
    LoRA epilogue ``y[m] += lora_scale * mid[m] @ lora_out[e]`` with lora_out [E, r, out] (any strides), where

    - unfused: ``mid = lora_in`` [S, r], given;
    - fused (``lora_down`` [E, K, r], any strides; ``lora_mid`` [S, r] in x's dtype, written): ``mid = x @ lora_down[e]``
      accumulated in fp32 in the base K loop from the same x tiles, rounded to x's dtype, stored into ``lora_mid``
      and used in the epilogue (so exactly what the unfused path would load). Raises where `lora_unfusable_reason`
      says the launch cannot fuse (use `grouped_lora_mm`, which picks the unfused path by that rule).

    Output dtype: x's dtype (bf16/fp16/fp32). ``dot_fp32`` defaults to True under TRITON_INTERPRET=1.
    fp8_block: ``act_prequant`` quantizes x (1x128) in a separate pass first (default: when the mean rows per expert
    exceed 16, where quantizing in every N tile would cost more than one extra pass over x).
    """
    S, _ = check_operands(x, weight, offsets, trans)
    if dot_fp32 is None:
        dot_fp32 = interpret_mode()
    if nf4_decode_route(weight, trans, S, config):  # it validates its own arguments
        if lora_down is not None:
            raise ValueError(f"fused LoRA not supported for weight {weight.fmt} {weight.shape}, x {tuple(x.shape)}, "
                             f"trans={trans}: {DECODE_REASON}")
        return nf4_decode_mm(x, weight, offsets, lora_in=lora_in, lora_out=lora_out, lora_scale=lora_scale, out=out,
                             dot_fp32=dot_fp32)
    return kloop_mm(x, weight, offsets, trans=trans, lora_in=lora_in, lora_out=lora_out, lora_scale=lora_scale,
                    lora_down=lora_down, lora_mid=lora_mid, out=out, config=config, dot_fp32=dot_fp32,
                    act_prequant=act_prequant)


def lora_fused_default() -> bool:
    """``MOE_OPS_LORA_FUSED`` (read at every call, so one process can A/B both): "0" (default, measured faster: see the
    module docstring) unfused, "1" fused."""
    v = os.environ.get("MOE_OPS_LORA_FUSED", "0")
    if v not in ("0", "1"):
        raise ValueError(f"MOE_OPS_LORA_FUSED must be '0' or '1', got {v!r}")
    return v == "1"


def lora_path(x: torch.Tensor, weight: GroupedWeight, *, trans: bool = False, fused: bool | None = None,
              config: TileConfig | None = None, act_prequant: bool | None = None) -> str:
    """"fused" or "unfused: <why>": the path `grouped_lora_mm` takes for these arguments."""
    if not (lora_fused_default() if fused is None else fused):
        return "unfused: requested (fused=False / MOE_OPS_LORA_FUSED=0)"
    E, R, C = weight.shape
    S = x.shape[0]
    cfg = launch_config(weight.fmt, trans, S, E, C if trans else R, True, config)
    why = lora_unfusable_reason(weight, trans, cfg, uses_act_prequant(weight, S, act_prequant))
    if why is None and nf4_decode_route(weight, trans, S, config):
        why = DECODE_REASON
    return "fused" if why is None else f"unfused: {why}"


def grouped_lora_mm(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    lora_scale: float,
    *,
    trans: bool = False,
    fused: bool | None = None,
    config: TileConfig | None = None,
    dot_fp32: bool | None = None,
    act_prequant: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mid)`` with ``mid = x @ D_e`` [S, r] (x's dtype) and ``y = base(x) + lora_scale * mid @ U_e``.

    base(x) as `grouped_mm` (``x @ W_e.T``, or ``x @ W_e`` when trans); ``lora_down`` D [E, K, r], ``lora_up``
    U [E, r, out] (any strides). Forward of a LoRA layer: D_e = A_e.T, U_e = B_e.T, mid = xa; its input gradient
    (trans): D_e = B_e, U_e = A_e, mid = dy @ B_e.

    fused (`lora_fused_default`, env ``MOE_OPS_LORA_FUSED``, off by default): ONE launch, mid accumulated in the base
    K loop.
    Where `lora_unfusable_reason` names a reason (pre-quantized fp8 x, nf4 swap-AB), or fused=False, two launches:
    ``mid = grouped_mm(x, D.T)`` (a second read of x), then the base GEMM with the epilogue loading mid.
    """
    path = lora_path(x, weight, trans=trans, fused=fused, config=config, act_prequant=act_prequant)
    if path == "fused":
        mid = torch.empty((x.shape[0], lora_down.shape[-1]), dtype=x.dtype, device=x.device)
        y = grouped_mm(x, weight, offsets, trans=trans, lora_down=lora_down, lora_mid=mid, lora_out=lora_up,
                       lora_scale=lora_scale, config=config, dot_fp32=dot_fp32, act_prequant=act_prequant)
    else:
        d_t = lora_down.transpose(1, 2)
        mid = grouped_mm(x, GroupedWeight(FMT_BF16, tuple(d_t.shape), d_t), offsets, dot_fp32=dot_fp32)
        y = grouped_mm(x, weight, offsets, trans=trans, lora_in=mid, lora_out=lora_up, lora_scale=lora_scale,
                       config=config, dot_fp32=dot_fp32, act_prequant=act_prequant)
    return y, mid
