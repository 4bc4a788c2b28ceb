"""The torch experts backends ("grouped_mm", "loop"; `impl.backends`): weights dequantized per call, no Triton.

- "grouped_mm": the base ``y = x @ W[e]ᵀ`` (or ``x @ W[e]``) as ONE ``torch._grouped_mm`` (``F.grouped_mm``) over all
  experts, and LoRA as two more: ``xa = x @ down[e]`` then ``Δy = s·xa @ up[e]`` (no per-expert Python loop).
  ``torch._grouped_mm`` needs every row stride to be a multiple of 16 bytes: a dimension that is not (e.g. a LoRA rank
  of 2, or I = 20 in bf16) is zero-padded to one that is, which is exact (zero rows/columns add nothing) and sliced
  off the result. Its CPU kernel has no float64: that is the "loop" backend's, by explicit request. On CPU, bf16 /
  fp16 operands (the weight already rounded to the compute dtype) are multiplied in fp32 and the product rounded
  back: the same arithmetic as the half-precision kernel (exact products, fp32 accumulation, one rounding of the
  result), which on CPU measured 5-40x slower than fp32 at the test suite's sizes.
- "loop": one ``torch.mm`` per expert with rows, for the base and for LoRA; any dtype and device.

The base weight is frozen and stored quantized: `FrozenExpertsLinear` saves no dense copy for backward (only the
offsets); backward dequantizes again for dX. LoRA runs in the factors' dtype (PEFT keeps them in fp32) under autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from impl.backends import Backend, ExpertLoRA, Routing
from impl.storage import ExpertWeight

GROUPED_MM_DTYPES = {"cpu": (torch.bfloat16, torch.float16, torch.float32), "cuda": (torch.bfloat16,)}
_ALIGN_BYTES = 16  # torch._grouped_mm: row strides in multiples of 16 bytes

# linear(x [S, in], weight, routing, in_out, dtype) -> [S, out]: the frozen base GEMM of one backend
LinearFn = Callable[[torch.Tensor, ExpertWeight, Routing, bool, torch.dtype], torch.Tensor]


class FrozenExpertsLinear(torch.autograd.Function):
    """``y = linear(x, W)`` with W frozen and stored quantized: saves nothing of W; backward re-dequantizes for dX."""

    @staticmethod
    def forward(ctx, x, weight: ExpertWeight, routing: Routing, in_out: bool, dtype, linear: LinearFn):
        ctx.weight, ctx.routing, ctx.in_out, ctx.dtype, ctx.linear = weight, routing, in_out, dtype, linear
        ctx.x_dtype = x.dtype
        return linear(x, weight, routing, in_out, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gx = ctx.linear(grad_out.contiguous(), ctx.weight, ctx.routing, not ctx.in_out, ctx.dtype)
        return gx.to(ctx.x_dtype), None, None, None, None, None


class TorchBackend(Backend):
    """Frozen base through `FrozenExpertsLinear` around `linear`, plus `lora_delta`, both subclass-defined."""

    def linear(self, x, weight: ExpertWeight, routing: Routing, in_out: bool, dtype) -> torch.Tensor:
        raise NotImplementedError

    def lora_delta(self, x: torch.Tensor, lora: ExpertLoRA, routing: Routing) -> torch.Tensor:
        raise NotImplementedError

    def project(self, x, weight, routing, in_out, dtype, lora):
        x = x.to(dtype)
        if x.requires_grad and torch.is_grad_enabled():
            y = FrozenExpertsLinear.apply(x, weight, routing, in_out, dtype, self.linear)
        else:
            y = self.linear(x, weight, routing, in_out, dtype)
        if lora is None:
            return y
        d = self.lora_delta(x, lora, routing)
        return (y.to(d.dtype) + d).to(dtype)


# --- grouped_mm -------------------------------------------------------------------------------------------------------


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: ``torch._grouped_mm``'s backward rejects the stride-0
    gradient that e.g. ``.sum()`` produces (torch 2.13 CPU: "Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _operand_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``torch._grouped_mm`` multiplies ``t`` in: fp32 for bf16 / fp16 on CPU (module docstring)."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


def _pad_to(n: int, element_size: int) -> int:
    step = _ALIGN_BYTES // element_size
    return -(-n // step) * step


def grouped_mm_aligned(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``a [S, K]`` @ ``b [E, K, N]`` per expert group (``offsets`` int32 END offsets) -> ``[S, N]`` via
    ``torch._grouped_mm``; K and N zero-padded to 16-byte rows where they are not (exact), N sliced back. ``b`` may be
    any view (e.g. PEFT's stride-E factors, batch stride 1): it is made contiguous unless each expert's matrix is
    already row- or column-major with the experts outermost."""
    if not (b.is_contiguous() or b.transpose(-2, -1).is_contiguous()):
        b = b.contiguous()
    K, N = b.shape[1], b.shape[2]
    kp, np_ = _pad_to(K, a.element_size()), _pad_to(N, a.element_size())
    if kp != K:
        a, b = F.pad(a, (0, kp - K)), F.pad(b, (0, 0, 0, kp - K))
    if np_ != N:
        b = F.pad(b, (0, np_ - N))
    y = _grouped_mm_fn()(a, b, offs=offsets)
    if torch.is_grad_enabled() and y.requires_grad:
        y = _ContiguousGrad.apply(y)
    return y if np_ == N else y[:, :N]


class GroupedMMBackend(TorchBackend):
    name = "grouped_mm"

    def cannot_run(self, x, weight, in_out):
        if _grouped_mm_fn() is None:
            return f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm"
        dtypes = GROUPED_MM_DTYPES.get(x.device.type)
        if dtypes is None:
            return f"torch._grouped_mm is not used on {x.device.type}"
        if x.dtype not in dtypes:
            return f"torch._grouped_mm on {x.device.type} takes {[str(d) for d in dtypes]}, not {x.dtype}"
        if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
            return f"torch._grouped_mm needs CUDA compute capability >= 8.0, {x.device} has less"
        return None

    def linear(self, x, weight, routing, in_out, dtype):
        W = weight.dequantize(dtype)
        x = x.to(dtype)
        op = _operand_dtype(x)
        W = (W if in_out else W.transpose(-2, -1)).to(op)
        return grouped_mm_aligned(x.to(op), W, routing.offsets).to(dtype)

    def lora_delta(self, x, lora, routing):
        op = _operand_dtype(lora.down)
        xs = x.to(lora.down.dtype).to(op)
        r = lora.down.shape[-1]
        rp = _pad_to(r, xs.element_size())  # the rank is the N of the first GEMM and the K of the second
        down, up = lora.down.to(op), lora.up.to(lora.down.dtype).to(op)
        if rp != r:
            down, up = F.pad(down, (0, rp - r)), F.pad(up, (0, 0, 0, rp - r))
        xa = grouped_mm_aligned(xs, down, routing.offsets)
        return (grouped_mm_aligned(xa, up, routing.offsets) * lora.scaling).to(lora.down.dtype)


# --- loop -------------------------------------------------------------------------------------------------------------


class LoopBackend(TorchBackend):
    """One matmul per expert with rows: any dtype (float64 included) and device, and slow; explicit only."""

    name = "loop"

    def cannot_run(self, x, weight, in_out):
        return None

    def linear(self, x, weight, routing, in_out, dtype):
        W = weight.dequantize(dtype)
        x = x.to(dtype)
        out = x.new_empty(x.shape[0], W.shape[2] if in_out else W.shape[1])
        start = 0
        for e, n in enumerate(routing.counts()):
            if n:
                torch.mm(x[start : start + n], W[e] if in_out else W[e].T, out=out[start : start + n])
            start += n
        return out

    def lora_delta(self, x, lora, routing):
        xs = x.to(lora.down.dtype)
        up = lora.up.to(lora.down.dtype)
        parts, start = [], 0
        for e, n in enumerate(routing.counts()):
            if n:
                parts.append((xs[start : start + n] @ lora.down[e]) @ up[e])
            start += n
        d = torch.cat(parts) if parts else xs.new_zeros(0, up.shape[-1])
        return d * lora.scaling


GROUPED_MM = GroupedMMBackend()
LOOP = LoopBackend()

__all__ = ["FrozenExpertsLinear", "TorchBackend", "GroupedMMBackend", "LoopBackend", "GROUPED_MM", "LOOP",
           "grouped_mm_aligned"]  # fmt: skip
