"""A PEFT LoRA adapter directory as the merge reads it: ``adapter_config.json``, ``adapter_model.safetensors`` (keys
parsed into modules and ``.base_layer`` nesting depths), the optional ``moe_compat.json`` sidecar, and PEFT's scaling
(``lora_alpha / r``, rsLoRA, ``rank_pattern`` / ``alpha_pattern``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from impl.errors import AdapterError
from impl.sidecar import SIDECAR
from reference.lora import CONVENTIONS, STRIDE_E

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class Adapter:
    """A PEFT LoRA adapter: config, tensors keyed as saved, and its modules.

    modules: ``{unwrapped module path: {depth: (lora_A key, lora_B key)}}``, depth = number of ``.base_layer``
    infixes (0 = outermost wrapper).
    """

    root: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    modules: dict[str, dict[int, tuple[str, str]]]
    sidecar: dict | None

    @property
    def peft_version(self) -> str | None:
        return self.config.get("peft_version")

    @property
    def convention(self) -> str:
        conv = (self.sidecar or {}).get("lora_B_convention", STRIDE_E)
        if conv not in CONVENTIONS:
            raise AdapterError(f"{self.root / SIDECAR}: lora_B_convention {conv!r} is not one of {CONVENTIONS}")
        return conv


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter dir; refuses DoRA, LoRA bias, fan_in_fan_out, modules_to_save and unknown tensors."""
    from safetensors.torch import load_file

    root = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (root / name).is_file():
            raise AdapterError(
                f"{root}: {name} not found (a PEFT adapter dir has {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
            )
    config = json.loads((root / ADAPTER_CONFIG).read_text())
    _check_adapter_config(root, config)
    sidecar = json.loads((root / SIDECAR).read_text()) if (root / SIDECAR).is_file() else None
    tensors = load_file(str(root / ADAPTER_WEIGHTS))
    modules: dict[str, dict[int, dict[str, str]]] = {}
    bad = []
    for key in tensors:
        m = _ADAPTER_KEY_RE.match(key)
        if m is None:
            bad.append(key)
            continue
        module, depth = m["module"], 0
        while module.endswith(".base_layer"):
            module, depth = module.removesuffix(".base_layer"), depth + 1
        modules.setdefault(module, {}).setdefault(depth, {})[m["ab"]] = key
    if bad:
        raise AdapterError(
            f"{root / ADAPTER_WEIGHTS}: tensors that are not LoRA A/B weights cannot be merged: {sorted(bad)[:5]} "
            "(DoRA magnitudes, LoRA biases, embedding LoRA and modules_to_save are not supported)"
        )
    pairs: dict[str, dict[int, tuple[str, str]]] = {}
    for module, levels in modules.items():
        for depth, ab in levels.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(
                    f"{root}: module {module!r} (depth {depth}) has lora_{list(ab)} but not both A and B"
                )
            pairs.setdefault(module, {})[depth] = (ab["A"], ab["B"])
    return Adapter(root, config, tensors, pairs, sidecar)


def _check_adapter_config(root: Path, config: dict) -> None:
    checks = [
        (config.get("peft_type") == "LORA", f"peft_type {config.get('peft_type')!r} (only LORA)"),
        (not config.get("use_dora"), "use_dora=True (DoRA magnitudes are not merged)"),
        (not config.get("lora_bias"), "lora_bias=True (LoRA bias is not merged)"),
        (not config.get("fan_in_fan_out"), "fan_in_fan_out=True (Conv1D weights)"),
        (not config.get("modules_to_save"), f"modules_to_save={config.get('modules_to_save')}"),
        (not config.get("trainable_token_indices"), "trainable_token_indices"),
        (not config.get("layer_replication"), "layer_replication"),
    ]
    bad = [why for ok, why in checks if not ok]
    if bad:
        raise AdapterError(f"{root / ADAPTER_CONFIG}: unsupported adapter settings: {bad}")


def _pattern_value(patterns: dict, current_key: str, default):
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)`` wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", current_key):
            return value
    return default


def lora_scaling(adapter: Adapter, current_key: str, rank: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with use_rslora); r from rank_pattern/r must equal the rank in the shapes."""
    cfg = adapter.config
    r_cfg = int(_pattern_value(cfg.get("rank_pattern"), current_key, cfg["r"]))
    if r_cfg != rank:
        raise AdapterError(
            f"{adapter.root}: {current_key}: rank from the factor shapes is {rank} but adapter_config says r={r_cfg}"
        )
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), current_key, cfg["lora_alpha"]))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
