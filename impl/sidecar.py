"""The ``moe_compat.json`` sidecar of an adapter directory: what it records about the adapter's expert LoRA.

Two forms are read. impl.peft_integration's format 1 (written by `impl.save_adapter`)::

    {"format": 1, "lora_B_convention": "stride_e", "peft_version": "0.21.2", "transformers_version": "5.24.0",
     "adapters": {"default": {"<PEFT module path>:<param>": {"orientation": "swapped", "lora_A_shape": [...],
                  "lora_B_shape": [...], "param_shape": [...], "num_experts": E, "is_transposed": false, ...}}}}

and the short form ``{"orientation": "swapped" | {"gate_up_proj": ..., "<module>.<param>": ...},
"lora_B_convention": "stride_e" | "contiguous_r"}``.

`read_sidecar` validates either form and normalizes it to a `Sidecar`: per target ``<module>.<param>`` (the
unwrapped module path, as in PEFT's ``rank_pattern`` keys) what it records. What it records is one source of the
orientation decision (`reference.layout.decide_orientation`), never trusted over the others.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from impl.checkpoint import read_json
from impl.errors import AdapterError
from reference.lora import CONVENTIONS, STRIDE_E

SIDECAR = "moe_compat.json"
SIDECAR_FORMAT = 1
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class SidecarTarget:
    """What a sidecar records for one ``<module>.<param>`` (None: not recorded)."""

    orientation: str | None
    lora_A_shape: tuple[int, ...] | None = None
    lora_B_shape: tuple[int, ...] | None = None
    param_shape: tuple[int, ...] | None = None
    is_transposed: bool | None = None


@dataclass(frozen=True)
class Sidecar:
    """A validated sidecar. ``targets``: ``<module>.<param>`` -> `SidecarTarget` (format 1); ``by_param``: short-form
    orientations by ``<module>.<param>``, by parameter name (``"gate_up_proj"``) or for every parameter (``"*"``)."""

    path: Path
    convention: str
    peft_version: str | None
    transformers_version: str | None
    targets: dict[str, SidecarTarget] = field(default_factory=dict)
    by_param: dict[str, str] = field(default_factory=dict)

    def target(self, module: str, param: str) -> SidecarTarget | None:
        """What is recorded for ``param`` of experts ``module`` (unwrapped path, e.g. ``model.layers.0.mlp.experts``)."""
        found = self.targets.get(f"{module}.{param}")
        if found is not None:
            return found
        by = self.by_param
        o = by.get(f"{module}.{param}", by.get(param, by.get("*")))
        return None if o is None else SidecarTarget(o)


def target_key(peft_path: str, param: str) -> str:
    """A format-1 target ``"<PEFT module path>:<param>"`` as ``<module>.<param>``: the leading ``base_model.model.``
    and every ``.base_layer`` (nested wrappers) removed."""
    path = peft_path.removeprefix(_PEFT_PREFIX)
    while ".base_layer" in path:
        head, _, tail = path.rpartition(".base_layer")
        path = head + tail
    return f"{path}.{param}"


def read_sidecar(adapter_dir: str | Path) -> Sidecar | None:
    """The validated sidecar of ``adapter_dir``, or None when there is none. Raises AdapterError naming the file and
    the field for anything it cannot read as one of the two forms."""
    path = Path(adapter_dir) / SIDECAR
    if not path.is_file():
        return None
    raw = read_json(path, AdapterError)
    convention = raw.get("lora_B_convention", STRIDE_E)
    if convention not in CONVENTIONS:
        raise AdapterError(f"{path}: lora_B_convention {convention!r} is not one of {CONVENTIONS}")
    versions = {k: raw.get(k) for k in ("peft_version", "transformers_version")}
    for k, v in versions.items():
        if v is not None and not isinstance(v, str):
            raise AdapterError(f"{path}: {k} must be a string, got {v!r}")
    if "adapters" in raw or "format" in raw:
        targets, by_param = _format_1(path, raw), {}
    else:
        targets, by_param = {}, _short_form(path, raw.get("orientation"))
    return Sidecar(path, convention, versions["peft_version"], versions["transformers_version"], targets, by_param)


def _format_1(path: Path, raw: dict) -> dict[str, SidecarTarget]:
    if raw.get("format") != SIDECAR_FORMAT:
        raise AdapterError(f"{path}: unknown sidecar format {raw.get('format')!r} (expected {SIDECAR_FORMAT})")
    adapters = raw.get("adapters")
    if not isinstance(adapters, dict) or not all(isinstance(v, dict) for v in adapters.values()):
        raise AdapterError(f"{path}: 'adapters' must map adapter names to objects of targets")
    name = "default" if "default" in adapters else (next(iter(adapters)) if len(adapters) == 1 else None)
    if name is None:
        raise AdapterError(f"{path}: several adapters {sorted(adapters)} and none is 'default'")
    out = {}
    for target, info in adapters[name].items():
        peft_path, sep, param = target.rpartition(":")
        if not sep or not peft_path or not param or not isinstance(info, dict):
            raise AdapterError(f"{path}: target {target!r} is not '<module path>:<param>' with an object")
        o = info.get("orientation")
        if not isinstance(o, str):
            raise AdapterError(f"{path}: target {target!r} has no orientation string (got {o!r})")
        t = info.get("is_transposed")
        if t is not None and not isinstance(t, bool):
            raise AdapterError(f"{path}: target {target!r}: is_transposed must be true/false/null, got {t!r}")
        shapes = {k: _shape(path, target, k, info.get(k)) for k in ("lora_A_shape", "lora_B_shape", "param_shape")}
        out[target_key(peft_path, param)] = SidecarTarget(o, is_transposed=t, **shapes)
    return out


def _shape(path: Path, target: str, name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise AdapterError(f"{path}: target {target!r}: {name} must be a list of integers, got {value!r}")
    return tuple(value)


def _short_form(path: Path, o) -> dict[str, str]:
    if o is None:
        return {}
    if isinstance(o, str):
        return {"*": o}
    if isinstance(o, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in o.items()):
        return dict(o)
    raise AdapterError(f"{path}: 'orientation' must be a string or an object of strings, got {o!r}")


def write_sidecar(adapter_dir: str | Path, content: dict) -> Path:
    """Write ``content`` as ``adapter_dir/moe_compat.json`` atomically (temporary file, fsync, rename)."""
    path = Path(adapter_dir) / SIDECAR
    tmp = path.with_name(f".{SIDECAR}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
