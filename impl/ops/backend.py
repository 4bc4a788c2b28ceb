"""The "triton" experts backend (`impl.backends`; "auto" picks it on CUDA): the model runs the benchmarked kernels.

- project: `impl.ops.grouped_lora.grouped_lora_linear`: frozen base + grouped LoRA as one autograd function (base
  GEMM with the LoRA epilogue, dX GEMM, dA / dB grouped reductions; NF4 decode kernel at <= 16 rows per expert);
- glue: `impl.ops.glue.gather_rows` (atomic-free backward), `impl.ops.glue.silu_mul` where the module's gate is
  exactly ``silu(g) * u`` on concatenated halves (``QuantizedExperts.silu_glu``), else the module's own gate;
  `impl.ops.combine.combine` (gather-combine in fp32, no atomics).

`impl.storage` weights map onto `impl.ops.formats.GroupedWeight` (built once per weight object and buffer pointer):
dense -> bf16 tiles (any float dtype); NF4 (blocksize 64, ``d2 % 64 == 0``) -> K-loop dequantization, a
double-quant absmax de-nested to fp32 ONCE here (`NF4Weight.absmax_fp32`); FP8 128x128 blocks -> the block-FP8
kernel. ``in_out`` maps to ``trans`` (``y = x @ W[e]``, GPT-OSS's layout). Runs on CUDA, or on CPU under
TRITON_INTERPRET=1 (then only by explicit request: "auto" keeps CPU on "grouped_mm").
"""

from __future__ import annotations

import torch

from impl.backends import Backend, ExpertLoRA, Routing
from impl.ops.combine import combine
from impl.ops.formats import FMT_BF16, FMT_FP8, FMT_NF4, GroupedWeight, interpret_mode
from impl.ops.glue import gather_rows, silu_mul
from impl.ops.grouped_lora import grouped_lora_linear
from impl.storage import DENSE, FP8, NF4, ExpertWeight, code_table

_CACHE_ATTR = "_ops_grouped_weight"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def to_grouped(weight: ExpertWeight) -> GroupedWeight:
    """The kernels' view of an `ExpertWeight` (built once per buffer set; the NF4 de-nesting is the only copy made)."""
    key_t = next(iter(weight.buffers()))
    key = (key_t.data_ptr(), key_t.device)
    cached = weight.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    shape = tuple(weight.shape)
    if weight.kind == DENSE:
        gw = GroupedWeight(FMT_BF16, shape, weight.weight)
    elif weight.kind == NF4:
        gw = GroupedWeight(FMT_NF4, shape, weight.packed.reshape(-1), weight.absmax_fp32().contiguous(),
                           code_table("nf4", weight.packed.device))
    elif weight.kind == FP8:
        gw = GroupedWeight(FMT_FP8, shape, weight.q, weight.scale_inv)
    else:
        raise ValueError(f"triton backend: unknown weight kind {weight.kind!r} {shape}")
    weight.__dict__[_CACHE_ATTR] = (key, gw)
    return gw


class TritonBackend(Backend):
    name = "triton"

    def cannot_run(self, x: torch.Tensor, weight: ExpertWeight, in_out: bool) -> str | None:
        if not (x.device.type == "cuda" or (x.device.type == "cpu" and interpret_mode())):
            return f"the Triton kernels run on CUDA (on CPU only under TRITON_INTERPRET=1), not on {x.device}"
        if x.dtype not in DTYPES:
            return f"the Triton kernels take {[str(d) for d in DTYPES]} activations, not {x.dtype}"
        if weight.kind == NF4 and (weight.blocksize != 64 or weight.shape[2] % 64):
            return (f"the NF4 kernels need blocksize 64 and a last dim % 64 == 0, got blocksize {weight.blocksize}, "
                    f"shape {tuple(weight.shape)}")  # fmt: skip
        if weight.kind == FP8 and tuple(weight.block) != (128, 128):
            return f"the FP8 kernel needs 128x128 blocks, got {weight.block}"
        if weight.kind not in (DENSE, NF4, FP8):
            return f"no Triton kernel for weight kind {weight.kind!r}"
        return None

    def project(self, x, weight, routing: Routing, in_out: bool, dtype, lora: ExpertLoRA | None) -> torch.Tensor:
        x = x.to(dtype).contiguous()
        gw = to_grouped(weight)
        if lora is None:
            return grouped_lora_linear(x, gw, routing.offsets, trans=in_out)
        return grouped_lora_linear(x, gw, routing.offsets, lora.down, lora.up, lora.scaling, trans=in_out)

    def gather(self, x, routing: Routing) -> torch.Tensor:
        return gather_rows(x, routing.token_idx, routing.inv, routing.k)

    def gate(self, module, h: torch.Tensor) -> torch.Tensor:
        return silu_mul(h) if module.silu_glu else module._apply_gate(h)

    def combine(self, y, w, routing: Routing) -> torch.Tensor:
        return combine(y, w, routing.order, routing.token_idx, routing.inv)


TRITON = TritonBackend()

__all__ = ["TritonBackend", "TRITON", "to_grouped"]
