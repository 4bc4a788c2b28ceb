"""A PEFT LoRA adapter directory on disk, as the merge and the live loader read it.

- ``adapter_config.json``: validated (``r``, ``lora_alpha``, ``rank_pattern`` / ``alpha_pattern`` regexes, ...);
  PEFT's scaling ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per-key ``r`` / ``alpha`` by PEFT's
  ``get_pattern_key`` rule.
- ``adapter_model.safetensors``: header validated like a checkpoint shard (`impl.checkpoint.read_header`); keys
  ``base_model.model.<module>[.base_layer]*.lora_{A,B}.weight`` parsed into modules and nesting depths.
- ``moe_compat.json``: `impl.sidecar`.

Expert LoRA (``target_parameters`` on ``gate_up_proj [E, d1, d2]`` / ``down_proj``): `assign_expert_params` tells
which nesting level is which parameter (their dimension sets {2I, H} and {H, I} always differ) and checks ``r·E``
against the config's ``r`` and the base's E; `expert_orientation` hands every orientation source the directory and
the base offer (shapes, the sibling parameter, the sidecar, ``peft_version``) to
`reference.layout.decide_orientation`. The merge and the live loader both call these, so they decide alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from impl.checkpoint import CheckpointError, read_header, read_json
from impl.errors import AdapterError, OrientationError
from impl.sidecar import SIDECAR, Sidecar, read_sidecar
from reference.layout import LayoutError, OrientationDecision, SiblingFactors, decide_orientation
from reference.lora import STRIDE_E

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory.

    shapes: every tensor's shape from the validated header; modules: ``{unwrapped module path: {depth: (lora_A
    key, lora_B key)}}``, depth = number of ``.base_layer`` infixes (0 = outermost wrapper); tensors: loaded only by
    ``read_adapter(..., load=True)``.
    """

    root: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    modules: dict[str, dict[int, tuple[str, str]]]
    sidecar: Sidecar | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def peft_version(self) -> str | None:
        return self.config.get("peft_version")

    @property
    def convention(self) -> str:
        return self.sidecar.convention if self.sidecar else STRIDE_E


def read_adapter(adapter_dir: str | Path, *, merge: bool = True) -> Adapter:
    """Read and validate an adapter directory. ``merge=True`` (the merge) also refuses what cannot be merged
    (DoRA, LoRA bias, fan_in_fan_out, modules_to_save, tensors that are not LoRA A/B, non-float factors, no LoRA
    tensors at all) and loads the tensors; ``merge=False`` (the live loader) reads shapes only."""
    root = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (root / name).is_file():
            raise AdapterError(
                f"{root}: {name} not found (a PEFT adapter dir has {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
            )
    config = read_adapter_config(root)
    if merge:
        _check_mergeable(root, config)
    sidecar = read_sidecar(root)
    if sidecar and sidecar.peft_version and config.get("peft_version") not in (None, sidecar.peft_version):
        raise OrientationError(
            f"{root}: {ADAPTER_CONFIG} says peft_version {config['peft_version']} but {SIDECAR} says "
            f"{sidecar.peft_version}: they describe different saves"
        )
    try:
        header = read_header(root / ADAPTER_WEIGHTS)
    except CheckpointError as err:
        raise AdapterError(str(err)) from err
    shapes = {k: t.shape for k, t in header.items()}
    modules, other = lora_modules(root, shapes)
    if merge:
        _check_mergeable_tensors(root, header, modules, other)
    adapter = Adapter(root, config, shapes, modules, sidecar)
    if merge:
        from safetensors.torch import load_file

        adapter.tensors = load_file(str(root / ADAPTER_WEIGHTS))
    return adapter


def read_adapter_config(root: Path) -> dict:
    """``adapter_config.json`` parsed and type-checked: ``r`` an int >= 1, ``lora_alpha`` a number, patterns objects
    of valid regexes with int / number values, ``peft_version`` a string."""
    path = root / ADAPTER_CONFIG
    config = read_json(path, AdapterError)
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"{path}: missing {key!r} (PEFT's LoraConfig always writes r and lora_alpha)")
    _check_number(path, "r", config["r"], integer=True)
    _check_number(path, "lora_alpha", config["lora_alpha"], integer=False)
    for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{path}: {name} must be an object of pattern -> value, got {patterns!r}")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as err:
                raise AdapterError(f"{path}: {name} key {pattern!r} is not a valid regular expression ({err})") from err
            _check_number(path, f"{name}[{pattern!r}]", value, integer=integer)
    version = config.get("peft_version")
    if version is not None and not isinstance(version, str):
        raise AdapterError(f"{path}: peft_version must be a string, got {version!r}")
    return config


def _check_number(path: Path, name: str, value, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        what = "an integer >= 1" if integer else "a positive finite number"
        raise AdapterError(f"{path}: {name} must be {what}, got {value!r}")


def _check_mergeable(root: Path, config: dict) -> None:
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


def lora_modules(root: Path, keys) -> tuple[dict[str, dict[int, tuple[str, str]]], list[str]]:
    """``({module: {depth: (lora_A key, lora_B key)}}, keys that are not LoRA A/B weights)``; a level with only one
    of A and B raises AdapterError."""
    found: dict[str, dict[int, dict[str, str]]] = {}
    other = []
    for key in keys:
        m = _KEY_RE.match(key)
        if m is None:
            other.append(key)
            continue
        module, depth = m["module"], 0
        while module.endswith(".base_layer"):
            module, depth = module.removesuffix(".base_layer"), depth + 1
        found.setdefault(module, {}).setdefault(depth, {})[m["ab"]] = key
    modules: dict[str, dict[int, tuple[str, str]]] = {}
    for module, levels in found.items():
        for depth, ab in levels.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(
                    f"{root}: module {module!r} (depth {depth}) has lora_{list(ab)} but not both A and B"
                )
            modules.setdefault(module, {})[depth] = (ab["A"], ab["B"])
    return modules, sorted(other)


def _check_mergeable_tensors(root: Path, header: dict, modules: dict, other: list[str]) -> None:
    if other:
        raise AdapterError(
            f"{root / ADAPTER_WEIGHTS}: tensors that are not LoRA A/B weights cannot be merged: {other[:5]} "
            "(DoRA magnitudes, LoRA biases, embedding LoRA and modules_to_save are not supported)"
        )
    if not modules:
        raise AdapterError(
            f"{root / ADAPTER_WEIGHTS}: holds no LoRA tensors (lora_A / lora_B weights); nothing to merge"
        )
    for key, info in header.items():
        if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
            raise AdapterError(
                f"{root / ADAPTER_WEIGHTS}: {key} is {info.dtype} {list(info.shape)}; LoRA factors must be 2-D "
                f"floating point ({', '.join(FLOAT_DTYPES)})"
            )


# --- PEFT's scaling ----------------------------------------------------------------------------------------------


def pattern_value(patterns: dict | None, current_key: str, default):
    """PEFT's ``get_pattern_key``: the first pattern ``p`` (in the config's order) with
    ``re.match(rf"(.*\\.)?({p})$", current_key)`` gives the value; else ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", current_key):
            return value
    return default


def config_rank(config: dict, current_key: str) -> int:
    """The per-expert rank r PEFT gives ``current_key`` (``<module>`` or ``<module>.<param>``): rank_pattern, else r."""
    return int(pattern_value(config.get("rank_pattern"), current_key, config["r"]))


def lora_scaling(adapter: Adapter, current_key: str, rank: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with use_rslora), r and alpha from rank_pattern / alpha_pattern as PEFT
    resolves them for ``current_key``; that r must equal the rank in the factor shapes."""
    cfg = adapter.config
    r_cfg = config_rank(cfg, current_key)
    if r_cfg != rank:
        raise AdapterError(
            f"{adapter.root}: {current_key}: rank from the factor shapes is {rank} but adapter_config says r={r_cfg}"
        )
    alpha = float(pattern_value(cfg.get("alpha_pattern"), current_key, cfg["lora_alpha"]))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


# --- expert LoRA: which parameter, which orientation --------------------------------------------------------------


def assign_expert_params(
    adapter: Adapter, module: str, levels: dict[int, tuple[str, str]], param_shapes: dict[str, tuple[int, ...]],
    num_experts: int, base: str,
) -> dict[str, tuple[str, str]]:  # fmt: skip
    """``{param: (lora_A key, lora_B key)}`` for the nesting levels of one experts module.

    Each level is assigned by its dimensions: ``{a, b}`` of ``A [r·E, a]``, ``B [b, r·E]`` must equal ``{d1, d2}``
    of exactly one ``param_shapes[param] = (E, d1, d2)``. Then ``r·E`` must be ``r`` (adapter_config / rank_pattern)
    times the base's E (``base`` names where E comes from); a mismatch names both readings (another E, or another r).
    """
    out: dict[str, tuple[str, str]] = {}
    for _depth, (ka, kb) in sorted(levels.items()):
        A, B = adapter.shapes[ka], adapter.shapes[kb]
        if len(A) != 2 or len(B) != 2 or A[0] != B[1] or A[0] == 0:
            raise AdapterError(
                f"{adapter.root}: {ka} {list(A)} / {kb} {list(B)} are not lora_A [r·E, a], lora_B [b, r·E]"
            )
        fits = [p for p, (_, d1, d2) in param_shapes.items() if sorted((A[1], B[0])) == sorted((d1, d2))]
        if len(fits) != 1:
            raise AdapterError(
                f"{adapter.root}: {ka} {list(A)} / {kb} {list(B)} fit {fits or 'no'} expert param of {module} "
                f"(shapes {param_shapes}, E={num_experts}); exactly one must fit"
            )
        (param,) = fits
        if param in out:
            raise AdapterError(f"{adapter.root}: two wrappers on {module} both fit {param} ({out[param][0]}, {ka})")
        rows, r = A[0], config_rank(adapter.config, f"{module}.{param}")
        if rows != r * num_experts:
            other_e = f"E = {rows // r} experts" if rows % r == 0 else f"no whole number of experts ({rows}/{r})"
            other_r = (
                f", or r = {rows // num_experts} if adapter_config's r is wrong" if rows % num_experts == 0 else ""
            )
            raise AdapterError(
                f"{adapter.root}: {ka} has r·E = {rows} rows: with r = {r} (adapter_config) that is {other_e}, but "
                f"{module}.{param} has E = {num_experts} ({base}){other_r}. The adapter was trained for another model"
            )
        out[param] = (ka, kb)
    return out


def expert_orientation(
    adapter: Adapter,
    module: str,
    param: str,
    assigned: dict[str, tuple[str, str]],
    param_shapes: dict[str, tuple[int, ...]],
    num_experts: int,
    *,
    layout: str | None,
    did_swap: bool | None = None,
) -> OrientationDecision:
    """`reference.layout.decide_orientation` for ``param`` of experts ``module`` with every source the adapter
    directory offers: the factor shapes, the sibling parameter's factors (from ``assigned``), the sidecar's
    orientation, ``is_transposed`` and transformers version, ``peft_version``; plus the base's ``layout`` and the
    live swap flag when known. The sidecar's recorded shapes must be the file's. Raises OrientationError."""
    ka, kb = assigned[param]
    target = adapter.sidecar.target(module, param) if adapter.sidecar else None
    where = f"{adapter.root}: {module}.{param}"
    if target is not None:
        actual = {
            "lora_A_shape": adapter.shapes[ka],
            "lora_B_shape": adapter.shapes[kb],
            "param_shape": param_shapes[param],
        }
        for name, got in actual.items():
            want = getattr(target, name)
            if want is not None and tuple(want) != tuple(got):
                raise OrientationError(
                    f"{where}: {SIDECAR} records {name} {list(want)} but the adapter / base has {list(got)}: the "
                    "sidecar does not describe this adapter"
                )
    siblings = [p for p in assigned if p != param]
    sibling = None
    if siblings:
        (s,) = siblings
        sibling = SiblingFactors(s, param_shapes[s], adapter.shapes[assigned[s][0]], adapter.shapes[assigned[s][1]])
    side = adapter.sidecar
    try:
        return decide_orientation(
            param_shapes[param], adapter.shapes[ka], adapter.shapes[kb], num_experts,
            module=module, param=param, layout=layout, sibling=sibling, did_swap=did_swap,
            recorded=target.orientation if target else None, recorded_by=SIDECAR,
            is_transposed=target.is_transposed if target else None,
            peft_version=adapter.peft_version or (side.peft_version if side else None),
            transformers_version=side.transformers_version if side else None,
        )  # fmt: skip
    except LayoutError as err:
        raise OrientationError(f"{adapter.root}: {err}") from err
