"""The experts backends and their one registry: what `impl.forward.experts_forward` runs the expert math with.

A backend works on the token-expert pairs sorted by expert (`Routing`) and provides

    cannot_run(x [S, in], weight, in_out) -> None, or why not (str)
    project(x [S, in], weight, routing, in_out, dtype, lora) -> [S, out]   frozen base + LoRA; differentiable in x and
                                                                            the LoRA factors, the base never (no dW)
    gather(x [T, H], routing) -> [S, H];  gate(module, h [S, 2I]) -> [S, I];  combine(y [S, H], w [T, k], routing)
                                                                            -> [T, H] (fp32 accumulation over k)

``in_out`` names the weight's layout: False ``y_e = x_e @ W[e]ᵀ`` (W ``[E, out, in]``, fused_linear), True
``y_e = x_e @ W[e]`` (W ``[E, in, out]``, GPT-OSS). ``lora`` is an `ExpertLoRA` (``y += s·(x @ down_e) @ up_e``) or
None. The registry is filled when `impl` is imported; implementations load on first use (import `impl` stays cheap):

    "triton"      `impl.ops.backend`      Triton kernels: grouped GEMMs with NF4 / FP8-block dequantization in the K
                                          loop, grouped LoRA (base GEMM + LoRA epilogue, dA/dB grouped reductions),
                                          gather / SiLU·up / combine glue. CUDA; on CPU only under TRITON_INTERPRET=1.
    "grouped_mm"  `impl.torch_backend`    ``torch._grouped_mm`` for the base and for LoRA (two grouped GEMMs), weights
                                          dequantized per call; bf16 / fp16 / fp32 (bf16 on CUDA).
    "loop"        `impl.torch_backend`    a per-expert matmul loop, any dtype: the explicit float64 path.

"auto" (`AUTO_ORDER`): on CUDA "triton", then "grouped_mm"; on CPU "grouped_mm". A float64 input on CPU has no grouped
kernel: "auto" raises and names ``backend="loop"``. A backend asked for by name that cannot run raises
`QuantizedExpertsError` naming the backend, the weights' kind and shape, the input dtype and device, whether a LoRA
adapter is attached and the torch version; so does one without LoRA support (``lora=False``) when an adapter is
attached, and one without backward (``backward=False``) when a gradient is needed. Nothing falls back silently.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from impl.storage import ExpertWeight, QuantizedExpertsError

# --- what a backend is given ---------------------------------------------------------------------------------------


@dataclass
class Routing:
    """The ``T·k`` token-expert pairs of ``top_k_index [T, k]``, sorted by expert (stable)."""

    order: torch.Tensor  # [S] int64: flat pair index t·k + j of each sorted row
    token_idx: torch.Tensor  # [S] int64: token of each sorted row (order // k)
    expert_ids: torch.Tensor  # [S] int64: expert of each sorted row
    offsets: torch.Tensor  # [E] int32 END offsets (rows of expert e: offsets[e-1] <= m < offsets[e])
    inv: torch.Tensor  # [S] int64: sorted row of each pair (inv[order[i]] = i)
    k: int

    def counts(self) -> list[int]:
        """Rows per expert on the host (a device sync: only the loop backend needs it)."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).tolist()


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """Sort the pairs of ``top_k_index [T, k]`` by expert, without a host sync (CUDA-graph capturable): counts by
    ``scatter_add_`` (an out-of-range id fails there, loudly; `check_expert_ids` gives the readable error first)."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1).to(torch.int64)
    expert_ids, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return Routing(order, order // k, expert_ids, torch.cumsum(counts, 0).to(torch.int32), inv, k)


def check_expert_ids(top_k_index: torch.Tensor, num_experts: int) -> None:
    """Raise if an expert id lies outside ``[0, E)`` (e.g. an expert-parallel sentinel). A host sync, so it is skipped
    while a CUDA graph is captured; `route`'s ``scatter_add_`` still fails on such an id there (device assert)."""
    if top_k_index.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if not top_k_index.numel():
        return
    lo, hi = torch.stack(torch.aminmax(top_k_index.reshape(-1).to(torch.int64))).tolist()  # one sync
    if lo < 0 or hi >= num_experts:
        raise QuantizedExpertsError(
            f"expert ids out of range [0, {num_experts}): min {lo}, max {hi} (expert-parallel sentinels are not "
            "supported)"
        )


@dataclass(frozen=True)
class ExpertLoRA:
    """Per-expert LoRA factors in the layer's input -> output sense: ``Δy_e = scaling · (x_e @ down[e]) @ up[e]``.

    down ``[E, in, r]``, up ``[E, r, out]``: views of PEFT's factors (gradients reach them), built by
    `impl.forward.expert_lora` from the orientation `reference.layout` decided.
    """

    down: torch.Tensor
    up: torch.Tensor
    scaling: float


# --- the interface ------------------------------------------------------------------------------------------------


class Backend:
    """One implementation of the experts math (module docstring). Subclasses set ``name`` and implement
    `cannot_run` and `project`; the glue defaults are plain torch (the semantics of `reference.dispatch`)."""

    name: str = ""
    lora: bool = True  # can apply a LoRA adapter
    backward: bool = True  # differentiable (dX through the frozen base, dA / dB)

    def cannot_run(self, x: torch.Tensor, weight: ExpertWeight, in_out: bool) -> str | None:
        raise NotImplementedError

    def project(self, x: torch.Tensor, weight: ExpertWeight, routing: Routing, in_out: bool, dtype: torch.dtype,
                lora: ExpertLoRA | None) -> torch.Tensor:  # fmt: skip
        raise NotImplementedError

    def gather(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return x[routing.token_idx]

    def gate(self, module, h: torch.Tensor) -> torch.Tensor:
        return module._apply_gate(h)

    def combine(self, y: torch.Tensor, w: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``out[t] = Σ_j w[t, j] · y[row of (t, j)]`` in fp32 (float64 for float64 y), summed in slot order."""
        acc = torch.promote_types(y.dtype, torch.float32)
        weighted = y.to(acc) * w.reshape(-1)[routing.order].to(acc).unsqueeze(-1)
        out = torch.empty_like(weighted).index_copy(0, routing.order, weighted)
        return out.view(w.shape[0], routing.k, -1).sum(dim=1)

    def __repr__(self) -> str:
        return f"<experts backend {self.name!r}>"


# --- the registry -------------------------------------------------------------------------------------------------

# name -> a Backend, or "module:attribute" to import on first use
BACKENDS: dict[str, Backend | str] = {
    "triton": "impl.ops.backend:TRITON",
    "grouped_mm": "impl.torch_backend:GROUPED_MM",
    "loop": "impl.torch_backend:LOOP",
}
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "grouped_mm"), "cpu": ("grouped_mm",)}
# what a backend that cannot be imported needs (the only import failures turned into a reason)
_OPTIONAL_MODULES = ("triton",)


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``; it is then available by name (not to "auto")."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (imported on first use); raises for an unknown name or a missing dependency."""
    entry = BACKENDS.get(name)
    if entry is None:
        raise QuantizedExpertsError(f"unknown experts backend {name!r}; registered: {sorted(BACKENDS)}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name not in _OPTIONAL_MODULES:
                raise
            raise QuantizedExpertsError(f"experts backend {name!r} needs {e.name}, which is not installed") from e
        BACKENDS[name] = entry
    return entry


def _reason(name: str, x: torch.Tensor, weights: list[ExpertWeight], in_out: bool, lora: bool, grad: bool) -> str | None:
    try:
        b = get_backend(name)
    except QuantizedExpertsError as e:
        return str(e)
    for w in weights:
        why = b.cannot_run(x, w, in_out)
        if why is not None:
            return why
    if lora and not b.lora:
        return f"experts backend {name!r} cannot apply the LoRA adapter attached to the experts"
    if grad and not b.backward:
        return f"experts backend {name!r} has no backward; it cannot be used for training"
    return None


def _describe(x: torch.Tensor, weights: list[ExpertWeight], lora: bool) -> str:
    ws = ", ".join(f"{w.kind} {tuple(w.shape)}" for w in weights)
    return (f"weights [{ws}], input {x.dtype} on {x.device}, {'with' if lora else 'without'} a LoRA adapter "
            f"(torch {torch.__version__})")  # fmt: skip


def select_backend(name: str, x: torch.Tensor, weights: list[ExpertWeight], in_out: bool, *, lora: bool,
                   grad: bool) -> Backend:  # fmt: skip
    """The backend for one experts call: ``name`` if it can run it (else raises), or the first "auto" one that can.

    x: an input in the compute dtype on the experts' device; lora: an adapter is attached; grad: a gradient is needed.
    """
    if name != "auto":
        if name not in BACKENDS:
            raise QuantizedExpertsError(f"unknown experts backend {name!r}; registered: {sorted(BACKENDS)}")
        why = _reason(name, x, weights, in_out, lora, grad)
        if why is not None:
            raise QuantizedExpertsError(f"experts backend {name!r} cannot run {_describe(x, weights, lora)}: {why}")
        return get_backend(name)
    reasons = {}
    for n in AUTO_ORDER.get(x.device.type, ("grouped_mm",)):
        reasons[n] = _reason(n, x, weights, in_out, lora, grad)
        if reasons[n] is None:
            return get_backend(n)
    hint = " Request backend='loop' (per-expert matmuls, any dtype) explicitly." if x.dtype == torch.float64 else ""
    raise QuantizedExpertsError(
        f"no 'auto' experts backend runs {_describe(x, weights, lora)}: "
        + "; ".join(f"{n}: {r}" for n, r in reasons.items()) + "." + hint
    )


__all__ = ["Routing", "route", "check_expert_ids", "ExpertLoRA", "Backend", "BACKENDS", "AUTO_ORDER",
           "register_backend", "get_backend", "select_backend"]  # fmt: skip
