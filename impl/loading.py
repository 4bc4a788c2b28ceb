"""Loading MoE models with quantized experts.

- transformers 5.x (fused 3-D experts, every family) and GPT-OSS on 4.57: `quantize_experts` swaps each experts
  module for a `QuantizedExperts` (NF4 / FP8 / dense storage). The router and everything else is untouched; the
  model's own routing feeds the new experts module. This is a module swap, not an ``ALL_EXPERTS_FUNCTIONS``
  registration: the swapped module's forward does not depend on ``config._experts_implementation``, the decorator
  flags of any 5.x release (5.0 has no ``has_gate``, 5.7 adds ``is_concatenated``...), or the experts interface
  existing at all (4.57 GPT-OSS), so one code path covers 4.57.6 and 5.0–5.24.
- transformers 4.57 per-expert ``ModuleList`` experts: NF4 through transformers' own ``BitsAndBytesConfig``
  (`bnb_config_for`), which turns every expert ``nn.Linear`` into ``bnb.nn.Linear4bit`` while keeping routers, the
  lm head and other listed modules in high precision. 4.57 replaces ``llm_int8_skip_modules``' defaults when a list is
  given, so ``lm_head`` is always included here; its matching is by child name / ``key + "."`` substring, so the
  router names below never match ``gate_proj``. FP8 (`quantize_module_list_fp8`): every routed expert ``nn.Linear``
  becomes an `impl.fp8_linear.FP8Linear` (block-wise e4m3 codes + fp32 ``weight_scale_inv``, zero-storage ``weight``
  carrier), so PEFT's ``target_modules`` LoRA wraps it as a ``lora.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from impl import compat
from impl.quant_experts import QuantizedExperts, is_fused_experts
from impl.storage import (
    FP8,
    NF4,
    WEIGHT_NAMES,
    FP8Config,
    FP8Weight,
    NF4Config,
    QuantConfig,
    QuantizedExpertsError,
    storage_bytes,
)

# Child names of routers / router-like gates that must stay high precision (4.57 substring/child-name semantics).
ROUTER_SKIP = ("lm_head", "gate", "router", "shared_expert_gate")
# Projection names of one routed expert in 4.57 ModuleList experts (Mixtral: w1 gate, w3 up, w2 down).
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj", "w1", "w3", "w2")


@dataclass
class QuantReport:
    """What `quantize_experts` did: module paths swapped and real storage bytes before / after.

    ``bytes_*``: whole experts modules (GPT-OSS biases stay in the compute dtype); ``weight_bytes_*``: the 3-D
    expert weights only (what quantization applies to). ``ratio`` is the weight ratio.
    """

    kind: str
    modules: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.weight_bytes_before / max(self.weight_bytes_after, 1)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def guard_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` raise: transformers would write the quantized storage under keys it cannot
    reload, and a later ``from_pretrained`` would re-initialise the experts at random (a warning, not an error)."""
    save = getattr(model, "save_pretrained", None)
    if save is None or getattr(save, "_moe_compat_guard", False):
        return

    def save_pretrained(*args, **kwargs):
        raise QuantizedExpertsError(
            f"{type(model).__name__} holds in-memory quantized experts (impl.QuantizedExperts); transformers cannot "
            "save or reload them. Save the LoRA adapter with impl.save_adapter, or merge it onto the original "
            "checkpoint with impl.merge.merge_adapter (moe-compat-merge)."
        )

    save_pretrained._moe_compat_guard = True
    model.save_pretrained = save_pretrained


def quantize_experts(model: nn.Module, cfg: QuantConfig, *, backend: str = "auto") -> QuantReport:
    """Replace every fused experts module of ``model`` by a `QuantizedExperts` (in place); returns a `QuantReport`.

    Raises if the model has no fused experts (e.g. 4.57 ModuleList experts: use `load_model` / `bnb_config_for`), or
    if PEFT adapters are already attached (quantize first, then ``get_peft_model``).
    """
    from impl.peft_integration import install

    install()
    targets = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    if any(hasattr(m, "base_layer") for _, m in model.named_modules() if not isinstance(m, QuantizedExperts)
           and hasattr(m, "lora_A")):  # fmt: skip
        raise QuantizedExpertsError("quantize the experts before attaching PEFT adapters (found lora layers)")
    if not targets:
        raise QuantizedExpertsError(
            f"{type(model).__name__} has no fused 3-D experts (gate_up_proj/down_proj) to quantize; for transformers "
            "4.57 ModuleList experts use impl.load_model (bitsandbytes Linear4bit)"
        )
    report = QuantReport(cfg.kind)
    for path, m in targets:
        _swap_in(model, path, m, partial(QuantizedExperts, m, cfg, backend=backend), report)
    guard_save(model)
    return report


def _swap_in(model: nn.Module, path: str, original: nn.Module, make: Callable[[], QuantizedExperts],
             report: QuantReport) -> None:  # fmt: skip
    """Replace the experts module at ``path`` by ``make()`` (a QuantizedExperts) and account bytes in ``report``.

    The original's bytes are read before ``make()`` runs, since building the quantized module may release them.
    """
    report.bytes_before += storage_bytes(original)
    report.weight_bytes_before += sum(
        getattr(original, n).numel() * getattr(original, n).element_size() for n in WEIGHT_NAMES
    )
    q = make()
    parent, child = _parent(model, path)
    setattr(parent, child, q)
    report.modules.append(path)
    report.bytes_after += storage_bytes(q)
    report.weight_bytes_after += sum(q.storage(n).nbytes() for n in WEIGHT_NAMES)


def bnb_config_for(model_or_config, cfg: NF4Config, extra_skip: tuple[str, ...] = ()):
    """transformers ``BitsAndBytesConfig`` (nf4) that keeps routers, gates of shared experts and lm_head unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=cfg.compute_dtype,
        llm_int8_skip_modules=list(ROUTER_SKIP + tuple(extra_skip)),
    )


def _is_module_list_moe(model: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) and name.endswith("experts") for name, m in model.named_modules())


def load_model(source, cfg: QuantConfig, *, backend: str = "auto", dtype: torch.dtype | None = None, **kwargs):
    """An MoE model with quantized experts, from a checkpoint directory or an in-memory model.

    - fused experts (5.x, GPT-OSS): ``from_pretrained(source, dtype=compute dtype)`` (or the given model), then
      `quantize_experts`. Returns ``(model, QuantReport)``.
    - 4.57 ModuleList experts with NF4: ``from_pretrained(source, quantization_config=bnb_config_for(...))``. An
      in-memory model must be saved first (pass its directory). Returns ``(model, QuantReport("nf4"))`` (empty).
    - 4.57 ModuleList experts with FP8 (directory or in-memory model): ``from_pretrained(source, dtype)``, then
      `quantize_module_list_fp8` (each routed expert Linear becomes an `impl.fp8_linear.FP8Linear`).
    """
    import transformers

    dtype = dtype or cfg.compute_dtype
    if isinstance(source, nn.Module):
        model = source
        if _is_module_list_moe(model) and not any(is_fused_experts(m) for m in model.modules()):
            if cfg.kind == FP8:
                return model, quantize_module_list_fp8(model, cfg)
            raise QuantizedExpertsError(
                f"in-memory {type(model).__name__} has ModuleList experts (transformers "
                f"{transformers.__version__}); save it and pass the directory so bitsandbytes quantizes at load"
            )
        return model, quantize_experts(model, cfg, backend=backend)
    config = transformers.AutoConfig.from_pretrained(source)
    family = compat.family_of_model_type(config.model_type)
    if compat.expert_layout(family, transformers.__version__) == "module_list":
        if cfg.kind == FP8:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
            return model, quantize_module_list_fp8(model, cfg)
        if cfg.kind != NF4:
            raise QuantizedExpertsError(
                f"{cfg.kind} experts for {family} on transformers {transformers.__version__} (ModuleList experts) are "
                "not supported: use NF4Config or FP8Config, or transformers >= 5.0"
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, quantization_config=bnb_config_for(config, cfg), **kwargs
        )
        return model, QuantReport(NF4)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, quantize_experts(model, cfg, backend=backend)


def _routed_expert_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(path, Linear)`` of every routed expert's projection: children ``EXPERT_PROJ`` of the members of each
    ``...experts`` ``nn.ModuleList`` (shared experts, routers and attention are not in such a list)."""
    out = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.ModuleList) and name.rpartition(".")[2] == "experts"):
            continue
        for e, expert in enumerate(m):
            projs = [(p, getattr(expert, p)) for p in EXPERT_PROJ if isinstance(getattr(expert, p, None), nn.Linear)]
            if len(projs) != 3:
                raise QuantizedExpertsError(
                    f"{name}.{e} ({type(expert).__name__}) has projections {[p for p, _ in projs]}; expected 3 of "
                    f"{EXPERT_PROJ} as nn.Linear"
                )
            out += [(f"{name}.{e}.{p}", lin) for p, lin in projs]
    return out


def quantize_module_list_fp8(model: nn.Module, cfg: FP8Config) -> QuantReport:
    """Replace every routed expert Linear of a 4.57 ModuleList MoE by an `impl.fp8_linear.FP8Linear` (in place).

    Routers, attention, shared experts and lm_head are untouched. Raises when no routed expert Linear exists or
    PEFT adapters are already attached. Returns a `QuantReport` (weight bytes: bf16 weights vs e4m3 codes + scales).
    """
    from impl.fp8_linear import FP8Linear

    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise QuantizedExpertsError("quantize the experts before attaching PEFT adapters (found lora layers)")
    targets = _routed_expert_linears(model)
    if not targets:
        raise QuantizedExpertsError(f"{type(model).__name__} has no ModuleList routed experts to quantize to FP8")
    report = QuantReport(FP8)
    for path, lin in targets:
        before = storage_bytes(lin)
        report.bytes_before += before
        report.weight_bytes_before += lin.weight.numel() * lin.weight.element_size()
        q = FP8Linear.from_linear(lin, cfg.block, cfg.compute_dtype)
        parent, child = _parent(model, path)
        setattr(parent, child, q)
        report.modules.append(path)
        report.bytes_after += q.nbytes()
        report.weight_bytes_after += q.q.nbytes + q.weight_scale_inv.nbytes
    guard_save(model)
    return report


def attach_fp8_experts(model: nn.Module, ckpt_dir, *, compute_dtype: torch.dtype = torch.bfloat16,
                       backend: str = "auto") -> QuantReport:  # fmt: skip
    """Give ``model``'s fused experts the FP8 storage of a pre-quantized checkpoint, bit for bit.

    ``impl.checkpoint.read_fp8_experts`` reads and validates the e4m3 weights and their ``weight_scale_inv`` /
    fused ``*_scale_inv`` grids (per-expert keys are stacked into the fused layout). ``model`` supplies everything
    else (routers, attention...): e.g. the same checkpoint loaded by transformers, which on CPU dequantizes FP8 to
    bf16, or a bf16 twin. Shapes must match; a module path absent from the model raises.
    """
    from impl.checkpoint import read_fp8_experts

    found = read_fp8_experts(ckpt_dir)
    if not found:
        raise QuantizedExpertsError(f"{ckpt_dir} holds no FP8 expert weights")
    report = QuantReport("fp8")
    for path, parts in found.items():
        try:
            m = model.get_submodule(path)
        except AttributeError as e:
            raise QuantizedExpertsError(
                f"checkpoint experts {path!r} are not a module of {type(model).__name__}"
            ) from e
        if not is_fused_experts(m):
            raise QuantizedExpertsError(f"{path} ({type(m).__name__}) is not a fused experts module")
        weights = {f"{n}_proj": FP8Weight(q, s, block) for n, (q, s, block) in parts.items()}
        blocks = {w.block for w in weights.values()}
        if len(blocks) != 1:
            raise QuantizedExpertsError(f"{path}: gate_up / down FP8 blocks differ: {sorted(blocks)}")
        fp8 = FP8Config(block=blocks.pop(), compute_dtype=compute_dtype)
        _swap_in(model, path, m, partial(QuantizedExperts, m, fp8, backend=backend, weights=weights), report)
    guard_save(model)
    return report


__all__ = [
    "QuantReport", "quantize_experts", "quantize_module_list_fp8", "load_model", "attach_fp8_experts",
    "bnb_config_for", "FP8Config", "NF4Config",
]  # fmt: skip
