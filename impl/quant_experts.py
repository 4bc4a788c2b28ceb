"""Quantized storage for fused 3-D MoE expert weights, and the `QuantizedExperts` module that holds it.

A fused experts module (transformers 5.x ``*Experts``, or GPT-OSS in any version) has ``gate_up_proj`` and
``down_proj`` as 3-D ``nn.Parameter``s ``[E, d1, d2]`` (plus biases for GPT-OSS). `QuantizedExperts` replaces it:

- each 3-D weight becomes an `ExpertWeight` submodule named ``<param>_q`` holding the quantized storage as buffers:
  `DenseWeight` (the frozen tensor itself, kind "dense"), `NF4Weight` (bitsandbytes nf4: packed uint8
  ``[(n+1)//2, 1]`` + absmax, optionally double-quantized, kind "nf4"), `FP8Weight` (e4m3fn ``[E, d1, d2]`` + fp32
  ``scale_inv [E, ceil(d1/bm), ceil(d2/bn)]``, `reference.fp8` semantics, kind "fp8");
- ``gate_up_proj`` / ``down_proj`` stay as zero-storage *shape carriers*: ``nn.Parameter(zeros(()).expand(E, d1, d2),
  requires_grad=False)`` in the compute dtype, on the storage's device. PEFT's ``ParamWrapper`` reads their shape,
  dtype and device (adapter shapes, placement, casting); nothing reads their values. The forward reads only the
  storage (`impl.forward`).

Invariants checked here: carriers never enter ``state_dict`` (a hook drops them, so no zeros can be saved as
weights); ``.to()`` / ``.cuda()`` move storage without changing its dtype (fp8/uint8/fp32 scales stay as they are) and
re-create the carriers on the new device (an expanded tensor would otherwise be materialised by the copy).
``get_memory_footprint`` of transformers counts a carrier at its full logical size; use `impl.storage_bytes`
for the real bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reference import fp8 as ref_fp8

DENSE = "dense"
NF4 = "nf4"
FP8 = "fp8"
KINDS = (DENSE, NF4, FP8)
WEIGHT_NAMES = ("gate_up_proj", "down_proj")
BIAS_NAMES = ("gate_up_proj_bias", "down_proj_bias")
# Non-tensor attributes copied from the original experts module (transformers' decorator flags, sizes, activation).
COPIED_ATTRS = (
    "config", "num_experts", "hidden_dim", "hidden_size", "intermediate_dim", "intermediate_size", "expert_dim",
    "act_fn", "alpha", "limit", "has_gate", "has_bias", "is_transposed", "is_concatenated",
    "has_post_expert_norm", "_is_expert_parallel",
)  # fmt: skip


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


# --- storage ---------------------------------------------------------------------------------------------------


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
    the nested 8-bit dynamic map ``[256]`` are constants shared per device (`_code`), not stored per weight. Dequantization goes through bitsandbytes with a FLAT state shape ``(n,)`` and a reshape:
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
        _check_code("nf4", state.code)
        if state.nested:
            _check_code("dynamic", state.state2.code)
            self.register_buffer("nested_absmax", state.state2.absmax.clone())
            self.register_buffer("nested_offset", torch.as_tensor(state.offset, dtype=torch.float32))
            self.nested_blocksize = int(state.state2.blocksize)

    def quant_state(self, dtype: torch.dtype):
        """A bitsandbytes ``QuantState`` for these buffers, with the flat shape ``(n,)``."""
        from bitsandbytes.functional import QuantState

        state2 = None
        offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=_code("dynamic", self.packed.device),
                                blocksize=self.nested_blocksize, dtype=torch.float32)  # fmt: skip
            offset = self.nested_offset
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size([self.shape.numel()]),
            code=_code("nf4", self.packed.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.packed, self.quant_state(dtype)).reshape(self.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}, double_quant={self.double_quant}"


_CODES: dict[tuple[str, str], torch.Tensor] = {}


def _code(name: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' constant code table ("nf4" [16] or "dynamic" [256], fp32) on ``device`` (cached)."""
    key = (name, str(device))
    if key not in _CODES:
        import bitsandbytes.functional as bnbf

        t = bnbf.get_4bit_type("nf4", device="cpu") if name == "nf4" else bnbf.create_dynamic_map()
        _CODES[key] = t.to(device=device, dtype=torch.float32)
    return _CODES[key]


def _check_code(name: str, code: torch.Tensor) -> None:
    if not torch.equal(code.float().cpu(), _code(name, torch.device("cpu"))):
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


# --- the experts module ----------------------------------------------------------------------------------------


def _carrier(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """Zero-storage stand-in for a 3-D weight: shape/dtype/device only (one element of storage, stride 0)."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(*shape), requires_grad=False)


def is_fused_experts(module: nn.Module) -> bool:
    """A module owning 3-D ``gate_up_proj`` and ``down_proj`` parameters (transformers 5.x / GPT-OSS experts)."""
    params = dict(module.named_parameters(recurse=False))
    return all(n in params and params[n].ndim == 3 for n in WEIGHT_NAMES)


class QuantizedExperts(nn.Module):
    """Drop-in replacement of a fused experts module whose 3-D weights live in `ExpertWeight` storage.

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], same contract as transformers
    5.x ``*Experts.forward`` (GPT-OSS: ``router_indices``, ``routing_weights``). The computation is
    `impl.forward.experts_forward`; LoRA from PEFT ``ParamWrapper``s around this module is applied there (see
    `impl.peft_integration`). Attributes of the original (``config``, ``is_transposed``, ``has_bias``, ``act_fn``,
    GPT-OSS ``alpha``/``limit`` ...) are kept; ``_apply_gate`` is the original class's.
    """

    def __init__(
        self,
        original: nn.Module,
        cfg: QuantConfig,
        *,
        backend: str = "auto",
        weights: dict[str, ExpertWeight] | None = None,
    ):
        super().__init__()
        if torch.nn.utils.parametrize.is_parametrized(original):
            raise QuantizedExpertsError(
                f"{type(original).__name__} is parametrized ({list(original.parametrizations)}); quantize the experts "
                "before attaching PEFT adapters"
            )
        if not is_fused_experts(original):
            raise QuantizedExpertsError(
                f"{type(original).__name__} has no 3-D gate_up_proj/down_proj parameters; only fused experts "
                "(transformers >= 5.0, or GPT-OSS) can be wrapped"
            )
        for name in COPIED_ATTRS:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.original_class = type(original)
        self.is_transposed = is_transposed_layout(original)
        self.has_gate = bool(getattr(original, "has_gate", True))
        self.quant_config = cfg
        self.compute_dtype = cfg.compute_dtype
        self.backend = backend
        self._lora: dict[str, list] = {n: [] for n in WEIGHT_NAMES}
        gate = getattr(type(original), "_apply_gate", None)  # 5.x: the class's own, or the decorator's default
        if gate is None:  # 4.57 GPT-OSS inlines its clamped SwiGLU in forward
            gate = _gpt_oss_gate if self.is_transposed else _default_apply_gate
        self._gate_fn = gate
        device = original.gate_up_proj.device
        for name in WEIGHT_NAMES:
            p = getattr(original, name)
            w = make_weight(p.data, cfg) if weights is None else weights[name]
            if w.shape != p.shape:
                raise QuantizedExpertsError(
                    f"{type(original).__name__}.{name}: given storage has shape {tuple(w.shape)}, the module "
                    f"{tuple(p.shape)}"
                )
            self.add_module(f"{name}_q", w.to(device))
            setattr(self, name, _carrier(p.shape, cfg.compute_dtype, device))
        for name in BIAS_NAMES:
            b = getattr(original, name, None)
            if b is not None:
                setattr(self, name, nn.Parameter(b.detach().to(cfg.compute_dtype), requires_grad=False))
        self.has_bias = all(getattr(self, n, None) is not None for n in BIAS_NAMES)
        self.register_state_dict_post_hook(_drop_carriers)
        from impl.peft_integration import install

        install()  # PEFT wrappers around this module must take impl's LoRA path (no-op without PEFT)

    # -- storage access --
    def storage(self, name: str) -> ExpertWeight:
        """The `ExpertWeight` behind ``gate_up_proj`` / ``down_proj``."""
        return getattr(self, f"{name}_q")

    def bias(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_bias", None)

    @property
    def kind(self) -> str:
        return self.storage("gate_up_proj").kind

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, gate_up)

    def _apply(self, fn, recurse=True):
        """Move storage (dtype kept) and biases; re-create the carriers on the new device / compute dtype."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.gate_up_proj.device))
        carriers = {n: self._parameters.pop(n) for n in WEIGHT_NAMES}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, p in carriers.items():
                self._parameters[n] = p
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        for n in WEIGHT_NAMES:
            self._parameters[n] = _carrier(carriers[n].shape, self.compute_dtype, probe.device)
        return self

    def forward(
        self, hidden_states, top_k_index=None, top_k_weights=None, *, router_indices=None, routing_weights=None
    ):
        """5.x: ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``; GPT-OSS passes ``router_indices`` /
        ``routing_weights`` (4.57: dense ``[T, E]`` weights and ``hidden [B, S, H]``). Output has the input's shape."""
        from impl.forward import experts_forward

        if router_indices is not None or routing_weights is not None:
            if top_k_index is not None or top_k_weights is not None:
                raise TypeError("pass either top_k_index/top_k_weights or router_indices/routing_weights, not both")
            top_k_index, top_k_weights = router_indices, routing_weights
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"original={self.original_class.__name__}, kind={self.kind}, compute_dtype={self.compute_dtype}, "
            f"is_transposed={self.is_transposed}, has_bias={self.has_bias}, backend={self.backend!r}"
        )


def _default_apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' default gate for concatenated experts: ``act(gate) * up`` with gate = first half."""
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


def _gpt_oss_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS interleaved clamped SwiGLU (`reference.experts.gpt_oss_glu`) with the module's alpha / limit."""
    from reference.experts import gpt_oss_glu

    return gpt_oss_glu(gate_up, float(self.alpha), float(self.limit))


def _compat_layout(original: nn.Module) -> str | None:
    """Expert layout of ``original``'s class per `impl.compat` (None when the class is not a known experts class)."""
    import transformers

    from impl import compat

    v = transformers.__version__
    for fam in compat.FAMILIES:
        if compat.family_available(fam, v) and compat.experts_class_name(fam, v) == type(original).__name__:
            return compat.expert_layout(fam, v)
    return None


def is_transposed_layout(original: nn.Module) -> bool:
    """Whether ``original``'s 3-D weights are ``(E, in, out)`` (GPT-OSS) rather than ``(E, out, in)``.

    transformers 5.x sets ``is_transposed`` on decorated classes; 4.57 GPT-OSS has no attribute, so the layout
    comes from `impl.compat`. Both present and disagreeing, or neither available, raises.
    """
    attr = getattr(original, "is_transposed", None)
    layout = _compat_layout(original)
    if attr is not None:
        if layout is not None and (layout == "gpt_oss") != bool(attr):
            raise QuantizedExpertsError(
                f"{type(original).__name__}.is_transposed={attr} contradicts impl.compat's layout {layout!r}"
            )
        return bool(attr)
    if layout is None:
        raise QuantizedExpertsError(
            f"{type(original).__name__} has no is_transposed attribute and is not a known experts class: cannot tell "
            "(E, out, in) from (E, in, out)"
        )
    return layout == "gpt_oss"


def _drop_carriers(module, state_dict, prefix, local_metadata):
    for n in WEIGHT_NAMES:
        state_dict.pop(prefix + n, None)


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


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every fused or quantized experts module in ``model`` (PEFT wrappers peeled)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedExperts) or (is_fused_experts(m) and not _is_peft_wrapper(m)):
            out.append((name, m))
    return out


def _is_peft_wrapper(m: nn.Module) -> bool:
    return hasattr(m, "base_layer") and hasattr(m, "lora_A")


__all__ = [
    "DENSE", "NF4", "FP8", "KINDS", "NF4Config", "FP8Config", "DenseConfig", "QuantConfig", "ExpertWeight",
    "DenseWeight", "NF4Weight", "FP8Weight", "QuantizedExperts", "QuantizedExpertsError", "make_weight",
    "storage_bytes", "expert_modules", "is_fused_experts",
]  # fmt: skip
