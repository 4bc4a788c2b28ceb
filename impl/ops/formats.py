"""Weight formats of the Triton expert kernels, and the host-side helpers every kernel module shares.

`GroupedWeight`: expert weights of logical shape ``[E, R, C]`` (F.linear layout: R = out features, C = in features):

- ``bf16`` (FMT_BF16): ``W [E, R, C]`` (any strides, any float dtype);
- ``nf4`` (FMT_NF4): bitsandbytes NF4 of the flattened ``[E, R, C]`` tensor: ``packed`` uint8 ``[E·R·C/2]`` (first
  element in the HIGH nibble), fp32 ``absmax [E·R·C/64]`` (blocksize 64; a double-quantized absmax is de-nested ONCE
  at load time, `impl.storage.NF4Weight.absmax_fp32`), the 16-entry ``code``. Needs ``C % 64 == 0`` (every block
  lies in one row);
- ``fp8_block`` (FMT_FP8): e4m3 ``q [E, R, C]`` and fp32 ``scale_inv [E, ceil(R/128), ceil(C/128)]`` (dequant
  multiplier); the activation is quantized per row and per 128 reduction columns (1x128, ``scale = max(amax/448,
  1e-12)``), as ``reference.fp8.quantize_fp8_block(x, block=(1, 128))`` does.

Imports: torch only. Every other module of `impl.ops` imports from here (formats <- jit helpers <- kernels <- dispatch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FMT_BF16 = "bf16"
FMT_NF4 = "nf4"
FMT_FP8 = "fp8_block"
FMT_ID = {FMT_BF16: 0, FMT_NF4: 1, FMT_FP8: 2}  # the kernels' WFMT constexpr
NF4_BLOCK = 64
FP8_BLOCK = 128
E4M3_MAX = 448.0
FP8_EPS = 1e-12


@dataclass
class GroupedWeight:
    """Expert weights of logical shape ``[E, R, C]`` (F.linear layout: R = out features, C = in features).

    fmt: FMT_BF16 (data = W), FMT_NF4 (data = packed uint8 flat, scale = fp32 absmax flat, code = fp32 [16]) or
    FMT_FP8 (data = e4m3 [E, R, C], scale = fp32 scale_inv [E, ceil(R/128), ceil(C/128)]).
    """

    fmt: str
    shape: tuple[int, int, int]
    data: torch.Tensor
    scale: torch.Tensor | None = None
    code: torch.Tensor | None = None

    def __post_init__(self) -> None:
        E, R, C = self.shape
        if self.fmt == FMT_BF16:
            if tuple(self.data.shape) != (E, R, C):
                raise ValueError(f"bf16 weight: data shape {tuple(self.data.shape)} != {self.shape}")
        elif self.fmt == FMT_NF4:
            n = E * R * C
            if C % NF4_BLOCK:
                raise ValueError(f"nf4 weight {self.shape}: C={C} must be a multiple of the blocksize {NF4_BLOCK}")
            if self.data.dtype != torch.uint8 or self.data.numel() != n // 2:
                raise ValueError(f"nf4 packed must be uint8 with {n // 2} bytes, got {self.data.dtype} {self.data.numel()}")
            if self.scale is None or self.scale.dtype != torch.float32 or self.scale.numel() != n // NF4_BLOCK:
                raise ValueError(f"nf4 absmax must be fp32 with {n // NF4_BLOCK} entries (de-nested), got "
                                 f"{None if self.scale is None else (self.scale.dtype, self.scale.numel())}")
            if self.code is None or self.code.numel() != 16 or self.code.dtype != torch.float32:
                raise ValueError("nf4 code must be fp32 [16]")
        elif self.fmt == FMT_FP8:
            if self.data.dtype != torch.float8_e4m3fn or tuple(self.data.shape) != (E, R, C):
                raise ValueError(f"fp8 weight must be float8_e4m3fn {self.shape}, got {self.data.dtype} {tuple(self.data.shape)}")
            grid = (E, -(-R // FP8_BLOCK), -(-C // FP8_BLOCK))
            if self.scale is None or tuple(self.scale.shape) != grid or self.scale.dtype != torch.float32:
                raise ValueError(f"fp8 scale_inv must be fp32 {grid}, got "
                                 f"{None if self.scale is None else (self.scale.dtype, tuple(self.scale.shape))}")
        else:
            raise ValueError(f"unknown weight format {self.fmt!r}; expected one of {sorted(FMT_ID)}")

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n


def check_operands(x: torch.Tensor, weight: GroupedWeight, offsets: torch.Tensor, trans: bool) -> tuple[int, int]:
    """Validate a grouped GEMM's operands; returns (S, N). x [S, K] bf16/fp16/fp32 with K = R (``trans``) or C,
    offsets int32 [E] on x's device (as is the weight)."""
    E, R, C = weight.shape
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [S, K], got shape {tuple(x.shape)}")
    nout, want_k = (C, R) if trans else (R, C)
    if x.shape[1] != want_k:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {weight.shape} (trans={trans}): need K={want_k}")
    if offsets.dtype != torch.int32 or offsets.shape != (E,):
        raise ValueError(f"offsets must be int32 [E={E}], got {offsets.dtype} {tuple(offsets.shape)}")
    if offsets.device != x.device or weight.data.device != x.device:
        raise ValueError(f"offsets on {offsets.device}, weight on {weight.data.device}, x on {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x dtype {x.dtype} not supported (bf16/fp16/fp32)")
    return x.shape[0], nout


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def interpret_mode() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``); kernels then take fp32 dots."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
