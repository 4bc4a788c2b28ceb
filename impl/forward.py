"""The one experts forward: what `QuantizedExperts.forward` runs and what bench/bench_moe.py times ("model_entry").

    experts_forward(module, hidden [T, H], top_k_index [T, k], top_k_weights [T, k], backend="auto") -> [T, H]

Steps (S = T·k token-expert pairs), each through the backend `impl.backends.select_backend` picks for this call:
1. dispatch (`impl.backends.route`): stable sort of the flat expert ids -> order, token rows, int32 END offsets [E];
2. gather the token rows ``x_g = x[token_idx]``;
3. up: ``h = base(x_g, W_up) (+ bias[e], GPT-OSS) + s·(x_g @ down_e) @ up_e`` (`ExpertLoRA` from the PEFT factors
   attached by `impl.peft_integration`; orientation decided there by `reference.layout`, factors split per expert by
   `reference.lora.expert_factors`). The base is frozen and stored quantized; nothing dense of it is kept for backward;
4. gate: SiLU·up (the Triton backend's fused kernel where the module's gate is exactly that) or the module's own
   ``_apply_gate`` (concatenated ``act(g)*u``, GPT-OSS clamped SwiGLU);
5. down likewise; 6. combine: multiply by the routing weights and sum the k slots of each token in fp32, cast to the
   input dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from impl.backends import Backend, ExpertLoRA, Routing, check_expert_ids, route, select_backend
from impl.storage import WEIGHT_NAMES, QuantizedExpertsError
from reference.layout import FUSED_LINEAR, GPT_OSS, semantic_orientation
from reference.lora import expert_factors

# --- LoRA -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """One active PEFT adapter on one 3-D expert weight: raw PEFT factors, scaling and decided orientation."""

    lora_A: torch.Tensor  # [r·E, a]
    lora_B: torch.Tensor  # [b, r·E]
    scaling: float
    orientation: str  # reference.layout.Orientation value
    convention: str  # reference.lora STRIDE_E / CONTIGUOUS_R


@contextlib.contextmanager
def lora_attached(module, name: str, specs: list[LoraSpec]) -> Iterator[None]:
    """Attach ``specs`` to ``module``'s ``name`` weight for the duration of the block (PEFT's wrapper forward, the
    benchmark); a second attachment while one is active raises (re-entrant call)."""
    if module._lora[name]:
        raise QuantizedExpertsError(
            f"LoRA already attached to {name} of {module.original_class.__name__} (re-entrant call)"
        )
    module._lora[name] = specs
    try:
        yield
    finally:
        module._lora[name] = []


def expert_lora(
    specs: list[LoraSpec], num_experts: int, layout: str, in_features: int, out_features: int | None = None
) -> ExpertLoRA | None:
    """The adapters of one weight as ``Δy_e = s·(x_e @ down_e) @ up_e`` (down ``[E, in, r]``, up ``[E, r, out]``).

    If the orientation is the layout's semantic one, lora_A spans the input (``down = A_eᵀ``, ``up = B_eᵀ``);
    otherwise lora_B does (``down = B_e``, ``up = A_e``). Several active adapters are stacked along the rank, each
    ``up`` multiplied by its scaling (exactly the sum of their deltas). Factors whose input side does not have
    ``in_features`` or (where given) whose output side does not have ``out_features`` raise: LoRA is never dropped
    silently, and a delta never fails later as a bare broadcasting error.
    """
    if not specs:
        return None
    downs, ups = [], []
    for spec in specs:
        A, B = expert_factors(spec.lora_A, spec.lora_B, num_experts, spec.convention)  # [E, r, a], [E, b, r]
        if spec.orientation == semantic_orientation(layout).value:
            down, up = A.transpose(1, 2), B.transpose(1, 2)
        else:
            down, up = B, A
        if down.shape[1] != in_features:
            raise QuantizedExpertsError(
                f"LoRA factors lora_A {tuple(spec.lora_A.shape)}, lora_B {tuple(spec.lora_B.shape)} "
                f"({spec.orientation}, layout {layout}) expect {down.shape[1]} input features, rows have {in_features}"
            )
        if out_features is not None and up.shape[2] != out_features:
            raise QuantizedExpertsError(
                f"LoRA factors lora_A {tuple(spec.lora_A.shape)}, lora_B {tuple(spec.lora_B.shape)} "
                f"({spec.orientation}, layout {layout}) give {up.shape[2]} output features, the weight has "
                f"{out_features}"
            )
        downs.append(down)
        ups.append(up)
    if len(specs) == 1:
        return ExpertLoRA(downs[0], ups[0], specs[0].scaling)
    dtype = downs[0].dtype
    return ExpertLoRA(torch.cat([d.to(dtype) for d in downs], dim=2),
                      torch.cat([u.to(dtype) * s.scaling for u, s in zip(ups, specs)], dim=1), 1.0)  # fmt: skip


# --- the forward --------------------------------------------------------------------------------------------------


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


def _project(module, b: Backend, name: str, x_g, routing: Routing) -> torch.Tensor:
    weight = module.storage(name)
    dtype = module.compute_dtype
    out_features = weight.shape[2] if module.is_transposed else weight.shape[1]  # [E, in, out] / [E, out, in]
    lora = expert_lora(module._lora[name], module.num_experts, _layout(module), x_g.shape[1], out_features)
    y = b.project(x_g, weight, routing, module.is_transposed, dtype, lora)
    bias = module.bias(name)
    if bias is not None:
        y = y + bias.to(dtype)[routing.expert_ids]
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
    weights = [module.storage(n) for n in WEIGHT_NAMES]
    has_lora = any(module._lora[n] for n in WEIGHT_NAMES)
    grad = torch.is_grad_enabled() and (x.requires_grad or has_lora)
    probe = x[:0].to(module.compute_dtype)
    b = select_backend(backend, probe, weights, module.is_transposed, lora=has_lora, grad=grad)
    check_expert_ids(idx, module.num_experts)
    routing = route(idx, module.num_experts)
    x_g = b.gather(x, routing)
    h = _project(module, b, WEIGHT_NAMES[0], x_g, routing)
    h = b.gate(module, h)
    y = _project(module, b, WEIGHT_NAMES[1], h, routing)
    return b.combine(y, w, routing).to(hidden_states.dtype).reshape(shape)


__all__ = ["LoraSpec", "lora_attached", "expert_lora", "experts_forward"]
