"""moe-compat optimized implementation: quantized MoE experts with per-expert LoRA for transformers 4.57 / 5.x + PEFT.

Public entry points (one per concern):

- loading:  `load_model(source, cfg)` (checkpoint dir or in-memory model), `quantize_experts(model, cfg)`,
            `attach_fp8_experts(model, fp8_ckpt_dir)` (pre-quantized FP8 checkpoint, bit for bit),
            configs `NF4Config`, `FP8Config`, `DenseConfig`; `storage_bytes(module)` (real bytes);
- forward:  `QuantizedExperts` (the module swapped in), `FP8Linear` (4.57 ModuleList FP8 experts),
            `register_backend` / `Backend` (grouped GEMM backends);
- PEFT:     `install_peft_hooks()` (done by `quantize_experts`), `save_adapter(peft_model, dir)`,
            `load_adapter(model, dir)` (``PeftModel.from_pretrained`` + orientation decided and checked as the merge
            does, with or without ``moe_compat.json``).

Submodules are imported lazily so `import impl` does not import transformers, PEFT or bitsandbytes.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NF4Config": "impl.quant_experts",
    "FP8Config": "impl.quant_experts",
    "DenseConfig": "impl.quant_experts",
    "QuantizedExperts": "impl.quant_experts",
    "QuantizedExpertsError": "impl.quant_experts",
    "storage_bytes": "impl.quant_experts",
    "load_model": "impl.loading",
    "quantize_experts": "impl.loading",
    "attach_fp8_experts": "impl.loading",
    "QuantReport": "impl.loading",
    "quantize_module_list_fp8": "impl.loading",
    "FP8Linear": "impl.fp8_linear",
    "Backend": "impl.forward",
    "register_backend": "impl.forward",
    "experts_forward": "impl.forward",
    "save_adapter": "impl.peft_integration",
    "load_adapter": "impl.peft_integration",
}


def install_peft_hooks() -> bool:
    """Route PEFT ``ParamWrapper`` over `QuantizedExperts` through impl's forward/merge (see impl.peft_integration)."""
    from impl.peft_integration import install

    return install()


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'impl' has no attribute {name!r}")


__all__ = [*_EXPORTS, "install_peft_hooks"]
