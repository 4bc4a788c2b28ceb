"""`QuantizedExperts`: the module swapped in for a fused experts module, holding its 3-D weights in `impl.storage`.

A fused experts module (transformers 5.x ``*Experts``, or GPT-OSS in any version) has ``gate_up_proj`` and
``down_proj`` as 3-D ``nn.Parameter``s ``[E, d1, d2]`` (plus biases for GPT-OSS). `QuantizedExperts` replaces it:

- each 3-D weight becomes an `impl.storage.ExpertWeight` submodule named ``<param>_q`` (dense / NF4 / FP8 buffers);
- ``gate_up_proj`` / ``down_proj`` stay as zero-storage shape carriers (`impl.storage.shape_carrier`) in the compute
  dtype, on the storage's device. PEFT's ``ParamWrapper`` reads their shape, dtype and device (adapter shapes,
  placement, casting); nothing reads their values. The forward (`impl.forward.experts_forward`) reads the storage.

Invariants checked here: carriers never enter ``state_dict`` (a hook drops them, so no zeros can be saved as
weights); ``.to()`` / ``.cuda()`` move storage without changing its dtype (fp8/uint8/fp32 scales stay as they are) and
re-create the carriers on the new device (an expanded tensor would otherwise be materialised by the copy).
``get_memory_footprint`` of transformers counts a carrier at its full logical size; use `impl.storage_bytes`
for the real bytes.

Import direction: storage <- forward <- quant_experts. The one upward call is the PEFT hook install in
`QuantizedExperts.__init__` (`impl.peft_integration.install`, a function-level import: peft_integration needs this
class for its isinstance checks).
"""

from __future__ import annotations

import torch
from torch import nn

from impl.forward import experts_forward
from impl.storage import (
    BIAS_NAMES,
    WEIGHT_NAMES,
    ExpertWeight,
    QuantConfig,
    QuantizedExpertsError,
    make_weight,
    shape_carrier,
)

# Non-tensor attributes copied from the original experts module (transformers' decorator flags, sizes, activation).
COPIED_ATTRS = (
    "config", "num_experts", "hidden_dim", "hidden_size", "intermediate_dim", "intermediate_size", "expert_dim",
    "act_fn", "alpha", "limit", "has_gate", "has_bias", "is_transposed", "is_concatenated",
    "has_post_expert_norm", "_is_expert_parallel",
)  # fmt: skip


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
        if getattr(original, "has_post_expert_norm", False):
            raise QuantizedExpertsError(
                f"{type(original).__name__} applies a post-expert norm (has_post_expert_norm=True), which "
                "impl.forward does not run; wrapping it would drop the norm"
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
        self.silu_glu = _is_silu_glu(original, gate, self.is_transposed)
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
            setattr(self, name, shape_carrier(p.shape, cfg.compute_dtype, device))
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
            self._parameters[n] = shape_carrier(carriers[n].shape, self.compute_dtype, probe.device)
        return self

    def forward(
        self, hidden_states, top_k_index=None, top_k_weights=None, *, router_indices=None, routing_weights=None
    ):
        """5.x: ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``; GPT-OSS passes ``router_indices`` /
        ``routing_weights`` (4.57: dense ``[T, E]`` weights and ``hidden [B, S, H]``). Output has the input's shape."""
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


def _is_silu_glu(original: nn.Module, gate_fn, is_transposed: bool) -> bool:
    """Whether the gate is ``silu(h[:, :I]) * h[:, I:]``, the op of the fused glue kernel (`impl.ops.glue.silu_mul`):
    concatenated [gate; up] halves, the default gate function (transformers' ``_default_apply_gate`` or ours) and a
    SiLU activation (``nn.SiLU`` or transformers' ``SiLUActivation``). Anything else keeps the module's own gate."""
    if is_transposed or not getattr(original, "has_gate", True) or not getattr(original, "is_concatenated", True):
        return False
    default_gate = gate_fn is _default_apply_gate or (
        getattr(gate_fn, "__module__", None) == "transformers.integrations.moe"
        and getattr(gate_fn, "__name__", None) == "_default_apply_gate"
    )
    act = type(getattr(original, "act_fn", None))
    silu = issubclass(act, nn.SiLU) or (act.__module__, act.__name__) == ("transformers.activations", "SiLUActivation")
    return default_gate and silu


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



def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every fused or quantized experts module in ``model`` (PEFT wrappers peeled)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedExperts) or (is_fused_experts(m) and not _is_peft_wrapper(m)):
            out.append((name, m))
    return out


def _is_peft_wrapper(m: nn.Module) -> bool:
    return hasattr(m, "base_layer") and hasattr(m, "lora_A")


__all__ = ["QuantizedExperts", "expert_modules", "is_fused_experts", "is_transposed_layout"]
