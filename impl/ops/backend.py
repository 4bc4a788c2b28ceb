"""Registers the Triton grouped GEMM as the ``"triton"`` backend of `impl.forward` (explicit only, not in "auto").

    experts_forward(module, hidden, idx, w, backend="triton")

Maps `impl.quant_experts` weights onto `impl.ops.grouped_gemm.GroupedWeight` (cached per weight object and buffer
pointer): dense -> bf16/any-float tiles; NF4 (blocksize 64, ``d2 % 64 == 0``) -> K-loop dequantization, a double-quant
absmax de-nested to fp32 ONCE here (fp32 ``code[codes] * absmax2 + offset``, as bitsandbytes / `reference.nf4`);
FP8 128x128 blocks -> the block-FP8 kernel. ``in_out`` maps to ``trans`` (``y = x @ W[e]`` is the input-gradient form
of the F.linear layout). Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from impl.forward import Backend, register_backend
from impl.ops.grouped_gemm import FMT_BF16, FMT_FP8, FMT_NF4, GroupedWeight, grouped_mm, interpret_mode
from impl.quant_experts import ExpertWeight, _code

_CACHE_ATTR = "_ops_grouped_weight"


def _denest(weight) -> torch.Tensor:
    n_blocks = weight.absmax.numel()
    dyn = _code("dynamic", weight.absmax.device)
    a2 = weight.nested_absmax.to(torch.float32).repeat_interleave(weight.nested_blocksize)[:n_blocks]
    return dyn[weight.absmax.reshape(-1).long()] * a2 + weight.nested_offset.to(torch.float32)


def to_grouped(weight: ExpertWeight) -> GroupedWeight:
    """The kernel's view of an `ExpertWeight` (built once per buffer set; the de-nesting is the only copy made)."""
    key_t = next(iter(weight.buffers()))
    key = (key_t.data_ptr(), key_t.device)
    cached = weight.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    shape = tuple(weight.shape)
    if weight.kind == "dense":
        gw = GroupedWeight(FMT_BF16, shape, weight.weight)
    elif weight.kind == "nf4":
        absmax = _denest(weight) if weight.double_quant else weight.absmax.to(torch.float32).reshape(-1)
        gw = GroupedWeight(FMT_NF4, shape, weight.packed.reshape(-1), absmax.contiguous(),
                           _code("nf4", weight.packed.device))
    elif weight.kind == "fp8":
        gw = GroupedWeight(FMT_FP8, shape, weight.q, weight.scale_inv)
    else:
        raise ValueError(f"triton backend: unknown weight kind {weight.kind!r} {shape}")
    weight.__dict__[_CACHE_ATTR] = (key, gw)
    return gw


def _supports(x: torch.Tensor, weight: ExpertWeight, in_out: bool) -> bool:
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and interpret_mode())):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if weight.kind == "nf4":
        return weight.blocksize == 64 and weight.shape[2] % 64 == 0
    if weight.kind == "fp8":
        return tuple(weight.block) == (128, 128)
    return weight.kind == "dense"


def _linear(x, weight: ExpertWeight, offsets, counts, in_out: bool, dtype) -> torch.Tensor:
    return grouped_mm(x.to(dtype).contiguous(), to_grouped(weight), offsets.to(torch.int32), trans=in_out)


register_backend(Backend("triton", _linear, _supports))
