"""The ``moe_compat.json`` sidecar of an adapter directory: what it records about the adapter's orientation.

Two forms are read: impl.peft_integration's format 1::

    {"format": 1, "lora_B_convention": "stride_e",
     "adapters": {"default": {"<module path>:<param>": {"orientation": "swapped", ...}, ...}}, ...}

and the short form ``{"orientation": "swapped" | {"gate_up_proj": ..., "<module>.<param>": ...},
"lora_B_convention": "stride_e" | "contiguous_r"}``.
"""

from __future__ import annotations

from pathlib import Path

from impl.errors import AdapterError
from reference.layout import Orientation

SIDECAR = "moe_compat.json"


def sidecar_orientation(root: Path, side: dict | None, current_key: str, pname: str) -> Orientation | None:
    """The orientation the sidecar records for ``<module>.<param>`` (None: no sidecar or no entry for it)."""
    side = side or {}
    if "adapters" in side:
        o = _sidecar_targets(root, side).get(current_key)
    else:
        o = side.get("orientation")
        if isinstance(o, dict):
            o = o.get(current_key, o.get(pname))
    if o is None:
        return None
    try:
        value = Orientation(o)
    except ValueError as err:
        raise AdapterError(f"{root / SIDECAR}: orientation {o!r} for {current_key}: {err}") from err
    if value is Orientation.UNKNOWN:
        raise AdapterError(f"{root / SIDECAR}: orientation 'unknown' for {current_key} cannot be merged")
    return value


def _sidecar_targets(root: Path, side: dict) -> dict[str, str]:
    """impl.peft_integration's sidecar (``format`` 1): ``adapters[name]["<module path>:<param>"]["orientation"]``.

    The saved adapter is PEFT's "default" (or the only one); module paths lose a leading ``base_model.model.`` and
    trailing ``.base_layer`` infixes, giving ``<module>.<param>`` as in PEFT's rank_pattern keys."""
    if side.get("format") != 1:
        raise AdapterError(f"{root / SIDECAR}: unknown sidecar format {side.get('format')!r} (expected 1)")
    adapters = side["adapters"]
    name = "default" if "default" in adapters else (next(iter(adapters)) if len(adapters) == 1 else None)
    if name is None:
        raise AdapterError(f"{root / SIDECAR}: several adapters {sorted(adapters)} and none is 'default'")
    out = {}
    for target, info in adapters[name].items():
        path, _, param = target.rpartition(":")
        path = path.removeprefix("base_model.model.")
        while path.endswith(".base_layer"):
            path = path.removesuffix(".base_layer")
        out[f"{path}.{param}"] = info["orientation"]
    return out
