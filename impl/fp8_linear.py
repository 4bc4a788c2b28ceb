"""Block-wise FP8 (e4m3fn) per-expert ``nn.Linear`` for transformers 4.57 ModuleList experts.

`FP8Linear` subclasses ``nn.Linear`` so PEFT's ``target_modules`` LoRA dispatches to ``lora.Linear`` over it. It holds

- ``q`` float8_e4m3fn ``[out, in]`` and ``weight_scale_inv`` fp32 ``[ceil(out/bm), ceil(in/bn)]`` from
  ``reference.fp8.quantize_fp8_block`` (``w ≈ q.float() * scale_inv`` per ``bm x bn`` tile, ceil grid);
- ``weight``: a zero-storage shape carrier (`impl.storage.shape_carrier`, one element, stride 0) in the compute dtype,
  so PEFT reads ``in_features`` / ``out_features``, dtype and device from it; nothing reads its values.

forward(x [..., in]) -> [..., out] = ``F.linear(x, dequantize_fp8(q, scale_inv, block).to(x.dtype), bias)``; the
dequantized weight is a fresh tensor per call (never cached, never trainable).

Merging a LoRA adapter into an FP8Linear base in memory is not supported: PEFT's ``lora.Linear.merge`` would add the
delta to the carrier. `impl.peft_integration.install` makes ``lora.Linear.merge`` raise `QuantizedExpertsError`
naming the module for an FP8Linear base. Merge on disk instead (`impl.merge.merge_adapter`, which dequantizes / requantizes FP8 checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from impl.storage import shape_carrier
from reference import fp8 as ref_fp8


class FP8Linear(nn.Linear):
    """Frozen block-FP8 linear layer; see the module docstring for the storage and the forward."""

    def __init__(self, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                 bias: torch.Tensor | None, compute_dtype: torch.dtype):  # fmt: skip
        nn.Module.__init__(self)
        if q.dtype != ref_fp8.FP8_DTYPE or q.ndim != 2:
            raise ref_fp8.FP8FormatError(f"FP8Linear needs 2-D float8_e4m3fn codes, got {q.dtype} {tuple(q.shape)}")
        out_f, in_f = q.shape
        bm, bn = (int(b) for b in block)
        grid = (-(-out_f // bm), -(-in_f // bn))
        if tuple(scale_inv.shape) != grid:
            raise ref_fp8.FP8FormatError(
                f"FP8Linear: weight_scale_inv {tuple(scale_inv.shape)} is not the ceil grid {grid} of weight "
                f"{(out_f, in_f)} for block {(bm, bn)}"
            )
        self.in_features, self.out_features, self.block = in_f, out_f, (bm, bn)
        self.compute_dtype = compute_dtype
        self.register_buffer("q", q.contiguous())
        self.register_buffer("weight_scale_inv", scale_inv.to(torch.float32).contiguous())
        self.weight = shape_carrier(torch.Size((out_f, in_f)), compute_dtype, q.device)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.register_state_dict_post_hook(_drop_carrier)
        from impl.peft_integration import install

        install()  # PEFT's lora.Linear.merge must refuse this base (no-op without PEFT)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int], compute_dtype: torch.dtype) -> FP8Linear:
        """Quantize ``linear.weight [out, in]`` with ``reference.fp8.quantize_fp8_block`` (the one definition)."""
        q, s = ref_fp8.quantize_fp8_block(linear.weight.detach(), block)
        return cls(q, s, block, linear.bias, compute_dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (``reference.fp8.dequantize_fp8``; a fresh tensor)."""
        return ref_fp8.dequantize_fp8(self.q, self.weight_scale_inv, self.block).to(dtype)

    def nbytes(self) -> int:
        """Bytes really held: e4m3 codes + fp32 scales (+ bias); the carrier's one element is not counted."""
        held = [self.q, self.weight_scale_inv] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        """Move buffers and bias to the new device (codes / scales keep their dtype); re-create the carrier."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.q.device))
        for name in ("q", "weight_scale_inv"):
            self._buffers[name] = self._buffers[name].to(probe.device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().to(probe.device, self.compute_dtype), requires_grad=False)
        self.weight = shape_carrier(torch.Size((self.out_features, self.in_features)), self.compute_dtype, probe.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"compute_dtype={self.compute_dtype}, bias={self.bias is not None}")  # fmt: skip


def _drop_carrier(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "weight", None)


__all__ = ["FP8Linear"]
