"""Experts forward for `QuantizedExperts`: routing dispatch, frozen quantized grouped GEMMs, per-expert LoRA, combine.

    experts_forward(module, hidden [T, H], top_k_index [T, k], top_k_weights [T, k], backend="auto") -> [T, H]

Steps (S = T·k token–expert pairs):
1. dispatch: stable sort of the flat expert ids; ``token_idx [S]``, ``counts [E]``, ``offsets [E]`` (int32 END offsets);
2. up: ``h = x_g · W_up[e]`` through a backend (weights dequantized inside a custom autograd Function that saves no
   dense weight: backward re-dequantizes for dX; the base is frozen, so there is no dW), ``+ bias[e]`` (GPT-OSS),
   ``+ LoRA`` (``s·x·first_e·second_e``, factors from the PEFT wrapper, orientation from `reference.layout`);
3. ``module._apply_gate`` (the original class's gate: concatenated ``act(g)*u`` or GPT-OSS clamped SwiGLU);
4. down likewise; 5. multiply by the routing weights and sum the k slots per token in fp32, cast to the input dtype.

Backends (`BACKENDS`, `register_backend`): "grouped_mm" (``F.grouped_mm`` / ``torch._grouped_mm``) and "loop" (a
per-expert matmul loop). `impl/ops` registers Triton backends here. "auto" picks grouped_mm when the torch build,
device, dtype and 16-byte stride alignment allow it, else loop; an explicitly requested backend that cannot run
raises. A backend with ``lora=False`` raises when a LoRA adapter is attached; one with ``backward=False`` raises when
a gradient is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from impl.quant_experts import WEIGHT_NAMES, ExpertWeight, QuantizedExpertsError
from reference.layout import FUSED_LINEAR, GPT_OSS, semantic_orientation
from reference.lora import expert_factors

# --- backends --------------------------------------------------------------------------------------------------

# linear(x [S, in], weight: ExpertWeight, offsets [E] int32, counts list[int], in_out: bool, dtype) -> [S, out]
# in_out=True: y_e = x_e @ W[e] (W[e] is [in, out]); in_out=False: y_e = x_e @ W[e]ᵀ (W[e] is [out, in]).
LinearFn = Callable[[torch.Tensor, ExpertWeight, torch.Tensor, list, bool, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """A grouped expert GEMM. ``supports(x, weight, in_out)`` says whether it can run this call.

    lora: its output may have the separately computed LoRA delta added (False for a kernel that fuses the whole
    expert MLP without LoRA). backward: `linear` is also used for dX in backward (with ``in_out`` flipped).
    """

    name: str
    linear: LinearFn
    supports: Callable[[torch.Tensor, ExpertWeight, bool], bool]
    lora: bool = True
    backward: bool = True


BACKENDS: dict[str, Backend] = {}
AUTO_ORDER: list[str] = []


def register_backend(backend: Backend, *, auto_priority: int | None = None) -> None:
    """Add (or replace) a backend. ``auto_priority`` inserts it into the "auto" order (0 = tried first)."""
    BACKENDS[backend.name] = backend
    if backend.name in AUTO_ORDER:
        AUTO_ORDER.remove(backend.name)
    if auto_priority is not None:
        AUTO_ORDER.insert(auto_priority, backend.name)


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def _aligned(*dims_bytes: int) -> bool:
    return all(d % 16 == 0 for d in dims_bytes)


def _grouped_mm_supports(x: torch.Tensor, weight: ExpertWeight, in_out: bool) -> bool:
    if _grouped_mm_fn() is None:
        return False
    _, d1, d2 = weight.shape
    es = x.element_size()
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return x.dtype == torch.bfloat16 and major >= 8 and _aligned(d1 * es, d2 * es)
    if x.device.type == "cpu":
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32) and _aligned(d1 * es, d2 * es)
    return False


def _grouped_mm_linear(x, weight: ExpertWeight, offsets, counts, in_out: bool, dtype) -> torch.Tensor:
    W = weight.dequantize(dtype)
    W = W if in_out else W.transpose(-2, -1)
    return _grouped_mm_fn()(x.to(dtype), W, offs=offsets)


def _loop_linear(x, weight: ExpertWeight, offsets, counts, in_out: bool, dtype) -> torch.Tensor:
    W = weight.dequantize(dtype)
    x = x.to(dtype)
    out_dim = W.shape[2] if in_out else W.shape[1]
    out = x.new_empty(x.shape[0], out_dim)
    start = 0
    for e, n in enumerate(counts):
        if n:
            w = W[e] if in_out else W[e].T
            torch.mm(x[start : start + n], w, out=out[start : start + n])
        start += n
    return out


register_backend(Backend("grouped_mm", _grouped_mm_linear, _grouped_mm_supports), auto_priority=0)
register_backend(Backend("loop", _loop_linear, lambda x, w, io: True), auto_priority=1)


def select_backend(name: str, x: torch.Tensor, weight: ExpertWeight, in_out: bool) -> Backend:
    """The backend for one call: ``name`` (must support it, else raises) or the first "auto" one that does."""
    if name != "auto":
        if name not in BACKENDS:
            raise QuantizedExpertsError(f"unknown experts backend {name!r}; registered: {sorted(BACKENDS)}")
        b = BACKENDS[name]
        if not b.supports(x, weight, in_out):
            raise QuantizedExpertsError(
                f"experts backend {name!r} cannot run weight kind {weight.kind} {tuple(weight.shape)} with input "
                f"{x.dtype} on {x.device} (torch {torch.__version__}); choose another backend or 'auto'"
            )
        return b
    for n in AUTO_ORDER:
        if BACKENDS[n].supports(x, weight, in_out):
            return BACKENDS[n]
    raise QuantizedExpertsError(f"no experts backend supports {weight.kind} {tuple(weight.shape)} {x.dtype} {x.device}")


# --- frozen quantized grouped linear ---------------------------------------------------------------------------


class FrozenExpertsLinear(torch.autograd.Function):
    """``y = grouped(x, W)`` with W frozen and stored quantized: saves only offsets; backward re-dequantizes for dX."""

    @staticmethod
    def forward(ctx, x, offsets, weight, counts, in_out, dtype, backend):
        ctx.weight, ctx.counts, ctx.in_out, ctx.dtype, ctx.backend = weight, counts, in_out, dtype, backend
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(offsets)
        return backend.linear(x, weight, offsets, counts, in_out, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (offsets,) = ctx.saved_tensors
        b: Backend = ctx.backend
        if not b.backward:
            raise QuantizedExpertsError(f"experts backend {b.name!r} has no backward; it cannot be used for training")
        gx = b.linear(grad_out.contiguous(), ctx.weight, offsets, ctx.counts, not ctx.in_out, ctx.dtype)
        return gx.to(ctx.x_dtype), None, None, None, None, None, None


def frozen_linear(x, weight: ExpertWeight, offsets, counts, in_out: bool, dtype, backend_name: str) -> torch.Tensor:
    """Frozen grouped GEMM of the sorted rows ``x [S, in]`` -> ``[S, out]`` in ``dtype``."""
    b = select_backend(backend_name, x, weight, in_out)
    if x.requires_grad and torch.is_grad_enabled():
        return FrozenExpertsLinear.apply(x, offsets, weight, counts, in_out, dtype, b)
    return b.linear(x, weight, offsets, counts, in_out, dtype)


# --- LoRA -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """One active PEFT adapter on one 3-D expert weight: raw PEFT factors, scaling and decided orientation."""

    lora_A: torch.Tensor  # [r·E, a]
    lora_B: torch.Tensor  # [b, r·E]
    scaling: float
    orientation: str  # reference.layout.Orientation value
    convention: str  # reference.lora STRIDE_E / CONTIGUOUS_R


def lora_delta(x: torch.Tensor, specs: list[LoraSpec], counts: list[int], num_experts: int, layout: str):
    """Sum over adapters of ``s·x_e·first_e·second_e`` for the expert-sorted rows ``x [S, in]`` -> ``[S, out]``.

    Per-expert factors from `reference.lora.expert_factors` (stride-E ``lora_B``). If the orientation is the
    layout's semantic one, lora_A spans the input (``first = A_eᵀ``, ``second = B_eᵀ``); otherwise lora_B does
    (``first = B_e``, ``second = A_e``). Computed in the factors' dtype; experts without rows get no work (their
    factors get zero gradient).
    """
    total = None
    for spec in specs:
        A, B = expert_factors(spec.lora_A, spec.lora_B, num_experts, spec.convention)  # [E, r, a], [E, b, r]
        if spec.orientation == semantic_orientation(layout).value:
            first, second = A.transpose(1, 2), B.transpose(1, 2)
        else:
            first, second = B, A
        if first.shape[1] != x.shape[1]:
            raise QuantizedExpertsError(
                f"LoRA factors lora_A {tuple(spec.lora_A.shape)}, lora_B {tuple(spec.lora_B.shape)} "
                f"({spec.orientation}, layout {layout}) expect {first.shape[1]} input features, rows have {x.shape[1]}"
            )
        xs = x.to(first.dtype)
        parts, start = [], 0
        for e, n in enumerate(counts):
            if n:
                parts.append((xs[start : start + n] @ first[e]) @ second[e])
            start += n
        d = torch.cat(parts) * spec.scaling if parts else xs.new_zeros(0, second.shape[-1])
        total = d if total is None else total + d
    return total


# --- the forward --------------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """Dispatch of ``top_k_index [T, k]``: pairs sorted by expert (stable)."""

    perm: torch.Tensor  # [S] flat pair index of each sorted row
    token_idx: torch.Tensor  # [S]
    expert_ids: torch.Tensor  # [S] sorted
    counts: list[int]  # [E]
    offsets: torch.Tensor  # [E] int32 END offsets


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    flat = top_k_index.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise QuantizedExpertsError(
            f"expert ids out of range [0, {num_experts}): min {int(flat.min())}, max {int(flat.max())} "
            "(expert-parallel sentinels are not supported)"
        )
    expert_ids, perm = torch.sort(flat, stable=True)
    counts_t = torch.bincount(flat, minlength=num_experts)
    k = top_k_index.shape[-1]
    return Routing(perm, perm // k, expert_ids, counts_t.tolist(), torch.cumsum(counts_t, 0).to(torch.int32))


def _routing_args(module, hidden, top_k_index, top_k_weights):
    """Normalise the call: 4.57 GPT-OSS passes dense ``routing_weights [T, E]`` and ``hidden [B, S, H]``."""
    T = hidden.reshape(-1, hidden.shape[-1]).shape[0]
    E = module.num_experts
    if top_k_index is None or top_k_weights is None:
        raise TypeError("experts forward needs top_k_index and top_k_weights (router_indices, routing_weights)")
    idx = top_k_index.reshape(T, -1)
    w = top_k_weights.reshape(T, -1)
    if w.shape[1] != idx.shape[1]:
        if w.shape[1] != E:
            raise QuantizedExpertsError(
                f"routing weights {tuple(top_k_weights.shape)} are neither [T, k={idx.shape[1]}] nor dense [T, E={E}]"
            )
        w = w.gather(1, idx.to(torch.int64))
    return idx, w


def _layout(module) -> str:
    return GPT_OSS if module.is_transposed else FUSED_LINEAR


def _project(module, name: str, x_g, routing: Routing, backend: str) -> torch.Tensor:
    weight = module.storage(name)
    dtype = module.compute_dtype
    y = frozen_linear(x_g, weight, routing.offsets, routing.counts, module.is_transposed, dtype, backend)
    bias = module.bias(name)
    if bias is not None:
        y = y + bias.to(dtype)[routing.expert_ids]
    specs = module._lora[name]
    if specs:
        if not select_backend(backend, x_g.to(dtype), weight, module.is_transposed).lora:
            raise QuantizedExpertsError(f"experts backend {backend!r} cannot apply the LoRA adapter attached to {name}")
        d = lora_delta(x_g, specs, routing.counts, module.num_experts, _layout(module))
        y = (y.to(d.dtype) + d).to(dtype)
    return y


def experts_forward(module, hidden_states, top_k_index, top_k_weights, *, backend: str = "auto") -> torch.Tensor:
    """Experts output for ``hidden_states [T, H]`` (or ``[B, S, H]``), same shape and dtype as the input."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise QuantizedExpertsError(
            f"{type(module).__name__} has parametrizations {list(module.parametrizations)}: PEFT's own "
            "ParamWrapper parametrization path reached the quantized experts, which would read the zero-storage "
            "shape carriers and drop LoRA. Install the hooks with impl.peft_integration.install() before "
            "get_peft_model / PeftModel.from_pretrained."
        )
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    idx, w = _routing_args(module, hidden_states, top_k_index, top_k_weights)
    routing = route(idx, module.num_experts)
    x_g = x[routing.token_idx]
    h = _project(module, WEIGHT_NAMES[0], x_g, routing, backend)
    h = module._apply_gate(h)
    y = _project(module, WEIGHT_NAMES[1], h, routing, backend)
    weighted = y.to(torch.float32) * w.reshape(-1)[routing.perm].to(torch.float32).unsqueeze(-1)
    out = torch.empty_like(weighted)
    out = out.index_copy(0, routing.perm, weighted)
    out = out.view(x.shape[0], idx.shape[1], -1).sum(dim=1)
    return out.to(hidden_states.dtype).reshape(shape)
