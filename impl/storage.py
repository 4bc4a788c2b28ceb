"""Storage of fused 3-D MoE expert weights ``[E, d1, d2]``: NF4 / FP8 / dense, requantization, shape carriers.

- `ExpertWeight` and its kinds: `DenseWeight` (the frozen tensor, kind "dense"), `NF4Weight` (bitsandbytes nf4 of the
  flattened weight: packed uint8 ``[(n+1)//2, 1]`` + absmax, optionally double-quantized, kind "nf4"), `FP8Weight`
  (e4m3fn ``[E, d1, d2]`` + fp32 ``scale_inv [E, ceil(d1/bm), ceil(d2/bn)]``, `reference.fp8` semantics, kind "fp8").
  ``dequantize(dtype)`` returns a fresh ``[E, d1, d2]`` (never cached); buffers keep their dtype under ``.to(dtype)``.
- `make_weight` (quantize per a config), `requantize_like` (same kind and parameters, e.g. after a merge).
- `shape_carrier`: a zero-storage ``nn.Parameter`` (one element expanded, stride 0) that stands where a weight was,
  so PEFT can read shape, dtype and device; nothing reads its values.
- The NF4 code tables (`code_table`: "nf4" [16], "dynamic" [256]) are `reference.nf4`'s constants, which
  tests/oracles/test_bnb_nf4.py checks bit for bit against bitsandbytes; quantizing through bitsandbytes re-checks them
  (`check_code`). The forward kernels read them from here, so running NF4 experts needs no bitsandbytes.

Everything else in `impl` imports storage from here; this module imports only torch and `reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reference import fp8 as ref_fp8
from reference import nf4 as ref_nf4

DENSE = "dense"
NF4 = "nf4"
FP8 = "fp8"
KINDS = (DENSE, NF4, FP8)
WEIGHT_NAMES = ("gate_up_proj", "down_proj")
BIAS_NAMES = ("gate_up_proj_bias", "down_proj_bias")


class QuantizedExpertsError(RuntimeError):
    """A quantized-experts operation that cannot be done without changing numerics or dropping LoRA."""


@dataclass(frozen=True)
class NF4Config:
    """bitsandbytes nf4 for expert weights: blocks of ``blocksize`` consecutive elements of the flattened param."""

    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.bfloat16
    kind: str = NF4


@dataclass(frozen=True)
class FP8Config:
    """Block-wise e4m3fn for expert weights (``reference.fp8.quantize_fp8_block``, ceil grid over the last two dims)."""

    block: tuple[int, int] = (128, 128)
    compute_dtype: torch.dtype = torch.bfloat16
    kind: str = FP8


@dataclass(frozen=True)
class DenseConfig:
    """No quantization: the weight is kept frozen in ``dtype`` (the bf16 baseline running the same forward)."""

    compute_dtype: torch.dtype = torch.bfloat16
    kind: str = DENSE


QuantConfig = NF4Config | FP8Config | DenseConfig


class ExpertWeight(nn.Module):
    """Storage of one 3-D expert weight ``[E, d1, d2]``. Subclasses hold buffers and implement `dequantize`.

    Buffers keep their dtype under ``Module.to(dtype)``/``.half()``: only the device follows (see `_apply`).
    """

    kind: str = ""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = torch.Size(shape)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The full weight ``[E, d1, d2]`` in ``dtype`` (a fresh tensor; never cached)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the stored buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, device=self.device))
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = buf.to(probe.device)
        return self

    def extra_repr(self) -> str:
        return f"kind={self.kind}, shape={tuple(self.shape)}, bytes={self.nbytes()}"


class DenseWeight(ExpertWeight):
    """A frozen high-precision weight (kind "dense")."""

    kind = DENSE

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape)
        self.register_buffer("weight", weight.detach().contiguous())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)


class NF4Weight(ExpertWeight):
    """bitsandbytes nf4 of the flattened weight (kind "nf4").

    Buffers: ``packed`` uint8 ``[(n+1)//2, 1]``; ``absmax`` fp32 ``[n_blocks]`` or, with double quant, uint8 codes
    plus ``nested_absmax`` fp32 ``[ceil(n_blocks/256)]`` and ``nested_offset`` fp32 ``[]``. The nf4 map ``[16]`` and
    the nested 8-bit dynamic map ``[256]`` are constants shared per device (`code_table`), not stored per weight. Dequantization goes through bitsandbytes with a FLAT state shape ``(n,)`` and a reshape:
    bitsandbytes 0.50.2's native CPU kernel is wrong for a >= 2-D shape whose last dim is not a multiple of the
    blocksize (tests/impl/test_quant_experts.py pins this).
    """

    kind = NF4

    def __init__(self, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
        import bitsandbytes.functional as bnbf

        super().__init__(weight.shape)
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.orig_dtype = weight.dtype
        packed, state = bnbf.quantize_4bit(
            weight.detach().contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
        )
        # clones: bitsandbytes may return views of larger allocations; storage must hold only its own bytes
        self.register_buffer("packed", packed.clone())
        self.register_buffer("absmax", state.absmax.clone())
        check_code("nf4", state.code)
        if state.nested:
            check_code("dynamic", state.state2.code)
            self.register_buffer("nested_absmax", state.state2.absmax.clone())
            self.register_buffer("nested_offset", torch.as_tensor(state.offset, dtype=torch.float32))
            self.nested_blocksize = int(state.state2.blocksize)

    def quant_state(self, dtype: torch.dtype):
        """A bitsandbytes ``QuantState`` for these buffers, with the flat shape ``(n,)``."""
        from bitsandbytes.functional import QuantState

        state2 = None
        offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=code_table("dynamic", self.packed.device),
                                blocksize=self.nested_blocksize, dtype=torch.float32)  # fmt: skip
            offset = self.nested_offset
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size([self.shape.numel()]),
            code=code_table("nf4", self.packed.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    @classmethod
    def from_state(cls, packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   orig_dtype: torch.dtype = torch.bfloat16) -> NF4Weight:  # fmt: skip
        """Storage from codes already quantized elsewhere (no double quant): ``packed`` uint8 with ``ceil(n/2)``
        bytes (high nibble first), fp32 ``absmax`` ``[ceil(n/blocksize)]``; e.g. `reference.nf4.quantize_nf4` or
        `impl.ops.quant.quantize_nf4_experts` (bit-identical to bitsandbytes, so no bitsandbytes is needed). The
        tensors are held as given (no copy)."""
        shape = torch.Size(shape)
        n = shape.numel()
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise QuantizedExpertsError(f"NF4 packed codes for {tuple(shape)}: need uint8 with {(n + 1) // 2} "
                                        f"bytes, got {packed.dtype} {packed.numel()}")  # fmt: skip
        if absmax.numel() != -(-n // blocksize):
            raise QuantizedExpertsError(f"NF4 absmax for {tuple(shape)}, blocksize {blocksize}: need "
                                        f"{-(-n // blocksize)} entries, got {absmax.numel()}")  # fmt: skip
        self = cls.__new__(cls)
        ExpertWeight.__init__(self, shape)
        self.blocksize, self.double_quant, self.orig_dtype = int(blocksize), False, orig_dtype
        self.register_buffer("packed", packed.reshape(-1, 1))  # as given: no copy
        self.register_buffer("absmax", absmax.to(torch.float32).reshape(-1))
        return self

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.packed, self.quant_state(dtype)).reshape(self.shape)

    def absmax_fp32(self) -> torch.Tensor:
        """fp32 ``[n_blocks]`` absmax; double quant de-nested as bitsandbytes does (fp32 ``dynamic[codes] *
        nested_absmax[j // nested_blocksize] + offset``, `reference.nf4.absmax_of`). A fresh tensor when nested."""
        if not self.double_quant:
            return self.absmax.to(torch.float32).reshape(-1)
        n_blocks = self.absmax.numel()
        nested = self.nested_absmax.to(torch.float32).repeat_interleave(self.nested_blocksize)[:n_blocks]
        dyn = code_table("dynamic", self.absmax.device)
        return dyn[self.absmax.reshape(-1).long()] * nested + self.nested_offset.to(torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}, double_quant={self.double_quant}"


_CODES: dict[tuple[str, str], torch.Tensor] = {}


def code_table(name: str, device: torch.device | str) -> torch.Tensor:
    """The constant code table "nf4" (``reference.nf4.NF4_CODE`` [16]) or "dynamic" (``reference.nf4.dynamic_map()``
    [256], the double-quant absmax code), fp32 on ``device`` (cached per device)."""
    key = (name, str(torch.device(device)))
    if key not in _CODES:
        if name == "nf4":
            t = ref_nf4.NF4_CODE
        elif name == "dynamic":
            t = ref_nf4.dynamic_map(signed=True)
        else:
            raise ValueError(f"unknown code table {name!r}; expected 'nf4' or 'dynamic'")
        _CODES[key] = t.to(device=device, dtype=torch.float32)
    return _CODES[key]


def check_code(name: str, code: torch.Tensor) -> None:
    """Raise if ``code`` (e.g. the table bitsandbytes quantized with) differs from `code_table` ``name``."""
    if not torch.equal(code.float().cpu(), code_table(name, "cpu")):
        raise QuantizedExpertsError(f"bitsandbytes returned a {name} code table that differs from the constant one")


class FP8Weight(ExpertWeight):
    """Block-wise e4m3fn (kind "fp8"): ``q [E, d1, d2]`` float8_e4m3fn and ``scale_inv [E, ceil(d1/bm), ceil(d2/bn)]``.

    ``w = q.float() * scale_inv`` broadcast per ``bm x bn`` tile (``scale_inv`` is the dequant multiplier).
    """

    kind = FP8

    def __init__(self, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
        super().__init__(q.shape)
        if q.dtype != torch.float8_e4m3fn:
            raise ref_fp8.FP8FormatError(f"FP8Weight needs float8_e4m3fn codes, got {q.dtype} {tuple(q.shape)}")
        E, d1, d2 = q.shape
        bm, bn = (int(b) for b in block)
        grid = (E, -(-d1 // bm), -(-d2 // bn))
        if tuple(scale_inv.shape) != grid:
            raise ref_fp8.FP8FormatError(
                f"scale_inv {tuple(scale_inv.shape)} is not the ceil grid {grid} of weight {tuple(q.shape)} for block "
                f"{(bm, bn)}"
            )
        self.block = (bm, bn)
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale_inv", scale_inv.to(torch.float32).contiguous())

    @classmethod
    def quantize(cls, weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> FP8Weight:
        """Quantize ``weight [E, d1, d2]`` with ``reference.fp8.quantize_fp8_block`` (the one definition)."""
        q, scale_inv = ref_fp8.quantize_fp8_block(weight.detach(), block)
        return cls(q, scale_inv, block)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        E, d1, d2 = self.shape
        bm, bn = self.block
        gr, gc = self.scale_inv.shape[1:]
        s = self.scale_inv
        if d1 % bm == 0 and d2 % bn == 0:  # exact tiling: broadcast a view, no repeat
            w = self.q.to(torch.float32).view(E, gr, bm, gc, bn) * s.view(E, gr, 1, gc, 1)
            return w.view(E, d1, d2).to(dtype)
        s = s.repeat_interleave(bm, dim=1)[:, :d1].repeat_interleave(bn, dim=2)[:, :, :d2]
        return (self.q.to(torch.float32) * s).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}"


def make_weight(weight: torch.Tensor, cfg: QuantConfig) -> ExpertWeight:
    """Quantize one 3-D expert weight per ``cfg``."""
    if weight.ndim != 3:
        raise QuantizedExpertsError(f"expert weights must be 3-D [E, d1, d2], got {tuple(weight.shape)}")
    if cfg.kind == NF4:
        return NF4Weight(weight, cfg.blocksize, cfg.double_quant)
    if cfg.kind == FP8:
        return FP8Weight.quantize(weight, cfg.block)
    if cfg.kind == DENSE:
        return DenseWeight(weight.to(cfg.compute_dtype))
    raise QuantizedExpertsError(f"unknown quantization kind {cfg.kind!r}; expected one of {KINDS}")





def requantize_like(store: ExpertWeight, merged: torch.Tensor) -> ExpertWeight:
    """New storage of the same kind and parameters as ``store`` holding ``merged [E, d1, d2]`` (fp32)."""
    if store.kind == NF4:
        return NF4Weight(merged, store.blocksize, store.double_quant)
    if store.kind == FP8:
        return FP8Weight.quantize(merged, store.block)
    if store.kind == DENSE:
        return DenseWeight(merged.to(store.weight.dtype))
    raise QuantizedExpertsError(f"cannot requantize storage kind {store.kind!r}")


def shape_carrier(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """Zero-storage stand-in for a weight: shape/dtype/device only (one element of storage, stride 0)."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(*shape), requires_grad=False)


def storage_bytes(module: nn.Module) -> int:
    """Real bytes held by ``module``'s parameters and buffers, counting each storage once.

    A shape carrier (expanded from one element) counts as its one element; a Params4bit counts its packed bytes.
    """
    seen: dict[tuple, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        key = (t.device.type, t.device.index, st.data_ptr())
        seen[key] = max(seen.get(key, 0), st.nbytes())
    return sum(seen.values())


__all__ = [
    "DENSE", "NF4", "FP8", "KINDS", "WEIGHT_NAMES", "BIAS_NAMES", "QuantizedExpertsError", "NF4Config", "FP8Config",
    "DenseConfig", "QuantConfig", "ExpertWeight", "DenseWeight", "NF4Weight", "FP8Weight", "make_weight",
    "requantize_like", "shape_carrier", "code_table", "check_code", "storage_bytes",
]  # fmt: skip
