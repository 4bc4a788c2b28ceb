"""PEFT ``target_parameters`` LoRA on `QuantizedExperts`: forward, merge, adapter save/reload with a sidecar.

PEFT's ``ParamWrapper`` applies LoRA by registering a parametrization on the targeted parameter for the duration of
the forward. On `QuantizedExperts` that parameter is a zero-storage shape carrier, so that path would read zeros,
materialise a dense ``[E, d1, d2]`` tensor per call (and, in PEFT 0.21, leak proxies). `install` therefore wraps
three ``ParamWrapper`` methods, **only for wrappers whose base layer is a QuantizedExperts** (every other wrapper runs
PEFT's original code):

- ``forward``: hands the active adapters' raw factors (``lora_A [r·E, a]``, ``lora_B [b, r·E]``, scaling, and the
  orientation decided by `reference.layout.detect_orientation` from the shapes, the live
  ``_did_swap_in_out_features``, the module's ``is_transposed`` and ``peft.__version__``) to the experts module for
  the duration of the call; `impl.forward` adds ``s·x·first_e·second_e`` itself. Nested wrappers (gate_up inner,
  down outer) each attach their own parameter. Disabled adapters: the base runs alone. Mixed-adapter batches raise.
- ``merge``: a real merge into the quantized storage: dequantize (fp32) + ΔW (`reference.lora.delta_weight`, stride-E)
  -> requantize with the same parameters (NF4 blocksize / double quant; FP8 block; dense dtype). The pre-merge storage
  is kept, so ``unmerge`` restores it exactly (no requantization drift).
- ``unmerge``: restores the pre-merge storage.

If PEFT's parametrization path is reached anyway (hooks not installed), `impl.forward.experts_forward` raises.

`save_adapter` writes PEFT's adapter plus ``moe_compat.json`` (lora_B convention, per-target orientation and shapes,
versions); `load_adapter` decides the file's orientation as the merge does (sidecar or not: `describe_adapter_dir`),
converts it if this PEFT uses the other one, reloads with ``PeftModel.from_pretrained`` and checks the live
orientation against the description.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from impl.adapter_dir import (
    ADAPTER_CONFIG,
    EXPERT_PARAMS,
    assign_expert_params,
    expert_orientation,
    read_adapter,
    read_adapter_config,
)
from impl.forward import LoraSpec
from impl.fp8_linear import FP8Linear
from impl.quant_experts import (
    DENSE,
    FP8,
    NF4,
    DenseWeight,
    FP8Weight,
    NF4Weight,
    QuantizedExperts,
    QuantizedExpertsError,
)
from impl.sidecar import SIDECAR, SIDECAR_FORMAT, read_sidecar, write_sidecar
from reference.layout import (
    FUSED_LINEAR,
    GPT_OSS,
    LayoutError,
    Orientation,
    decide_orientation,
    parse_version,
    peft_swaps,
)
from reference.lora import STRIDE_E, delta_weight

_MARK = "_moe_compat_hook"


def _peft_version() -> str:
    import peft

    return peft.__version__


def install() -> bool:
    """Wrap ``peft.tuners.lora.layer.ParamWrapper.{forward, merge, unmerge}`` and ``lora.Linear.merge`` (idempotent).

    The ParamWrapper hooks route QuantizedExperts through impl's LoRA path; the ``lora.Linear.merge`` hook refuses an
    in-memory merge into an `FP8Linear` base (its weight is a zero-storage carrier over e4m3 codes).

    Returns False when PEFT is not installed (nothing can wrap the experts then), True otherwise.
    """
    try:
        from peft.tuners.lora import layer as lora_layer
    except ModuleNotFoundError:
        return False
    pw = lora_layer.ParamWrapper
    if getattr(pw.forward, _MARK, False):
        return True
    orig_forward, orig_merge, orig_unmerge = pw.forward, pw.merge, pw.unmerge

    def forward(self, x, *args, **kwargs):
        if not isinstance(self.get_base_layer(), QuantizedExperts):
            return orig_forward(self, x, *args, **kwargs)
        return _forward(self, x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names=None):
        if not isinstance(self.get_base_layer(), QuantizedExperts):
            return orig_merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
        return _merge(self, safe_merge, adapter_names)

    def unmerge(self):
        if not isinstance(self.get_base_layer(), QuantizedExperts):
            return orig_unmerge(self)
        return _unmerge(self)

    lin = lora_layer.Linear
    orig_linear_merge = lin.merge

    def linear_merge(self, safe_merge: bool = False, adapter_names=None):
        base = self.get_base_layer()
        if isinstance(base, FP8Linear):
            raise QuantizedExpertsError(
                f"cannot merge LoRA into an FP8Linear base in memory ({base.extra_repr()}): its weight is a "
                "zero-storage carrier over e4m3 codes. Save the adapter and merge on disk with "
                "impl.merge.merge_adapter (moe-compat-merge), which dequantizes and requantizes the FP8 weights"
            )
        return orig_linear_merge(self, safe_merge=safe_merge, adapter_names=adapter_names)

    for cls, name, fn, orig in ((pw, "forward", forward, orig_forward), (pw, "merge", merge, orig_merge),
                                (pw, "unmerge", unmerge, orig_unmerge),
                                (lin, "merge", linear_merge, orig_linear_merge)):  # fmt: skip
        setattr(fn, _MARK, True)
        fn.__wrapped__ = orig
        fn.__doc__ = orig.__doc__
        setattr(cls, name, fn)
    return True


# --- orientation ------------------------------------------------------------------------------------------------


def wrapper_did_swap(wrapper) -> bool:
    """The live swap flag: PEFT >= 0.19 sets ``_did_swap_in_out_features``, transformers 5.0-5.3's patch sets
    ``_swapped_in_out``, 5.4-5.12's patch sets the former. PEFT 0.17/0.18 have no swap logic, so with neither
    attribute the wrapper did not swap (False)."""
    if getattr(wrapper, "_swapped_in_out", False):
        return True
    return bool(getattr(wrapper, "_did_swap_in_out_features", False))


def wrapper_orientation(wrapper, adapter: str) -> Orientation:
    """Orientation of ``adapter``'s factors on ``wrapper`` (PEFT ParamWrapper over a QuantizedExperts):
    `reference.layout.decide_orientation` from the shapes, the live swap flag and the running PEFT's rule with the
    module's ``is_transposed`` (the rule set aside on transformers 5.0-5.12, whose patch may force the swap)."""
    import transformers

    base = wrapper.get_base_layer()
    return decide_orientation(
        getattr(base, wrapper.parameter_name).shape, wrapper.lora_A[adapter].weight.shape,
        wrapper.lora_B[adapter].weight.shape, wrapper.num_experts,
        param=f"{wrapper.parameter_name} of adapter {adapter!r} (PEFT {_peft_version()})",
        layout=GPT_OSS if base.is_transposed else FUSED_LINEAR, did_swap=wrapper_did_swap(wrapper),
        is_transposed=bool(base.is_transposed), peft_version=_peft_version(),
        transformers_version=transformers.__version__,
    ).orientation  # fmt: skip


def _specs(wrapper, adapters) -> list[LoraSpec]:
    return [
        LoraSpec(
            wrapper.lora_A[a].weight,
            wrapper.lora_B[a].weight,
            float(wrapper.scaling[a]),
            wrapper_orientation(wrapper, a).value,
            STRIDE_E,
        )
        for a in adapters
        if a in wrapper.lora_A
    ]


# --- forward ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _attached(base: QuantizedExperts, name: str, specs: list[LoraSpec]):
    if base._lora[name]:
        raise QuantizedExpertsError(
            f"LoRA already attached to {name} of {base.original_class.__name__} (re-entrant call)"
        )
    base._lora[name] = specs
    try:
        yield
    finally:
        base._lora[name] = []


def _forward(self, x, *args, **kwargs):
    self._check_forward_args(x, *args, **kwargs)
    if kwargs.pop("adapter_names", None) is not None:
        raise ValueError(f"lora.{type(self).__name__} on quantized experts does not support mixed adapter batches")
    if self.disable_adapters:
        if self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)
    if self.merged:
        return self.base_layer(x, *args, **kwargs)
    specs = _specs(self, self.active_adapters)
    with _attached(self.get_base_layer(), self.parameter_name, specs):
        return self.base_layer(x, *args, **kwargs)


# --- merge ------------------------------------------------------------------------------------------------------


def requantize_like(store, merged: torch.Tensor):
    """New storage of the same kind and parameters as ``store`` holding ``merged [E, d1, d2]`` (fp32)."""
    if store.kind == NF4:
        return NF4Weight(merged, store.blocksize, store.double_quant)
    if store.kind == FP8:
        return FP8Weight.quantize(merged, store.block)
    if store.kind == DENSE:
        return DenseWeight(merged.to(store.weight.dtype))
    raise QuantizedExpertsError(f"cannot requantize storage kind {store.kind!r}")


def merged_delta(wrapper, adapters) -> torch.Tensor:
    """``ΔW [E, d1, d2]`` (fp32) summed over ``adapters`` in the live orientation (`reference.lora.delta_weight`)."""
    total = None
    for spec in _specs(wrapper, adapters):
        d = delta_weight(spec.lora_A.detach().float(), spec.lora_B.detach().float(), wrapper.num_experts,
                         spec.scaling, orientation=spec.orientation, convention=spec.convention)  # fmt: skip
        total = d if total is None else total + d
    return total


def _merge(self, safe_merge: bool, adapter_names):
    from peft.tuners.tuners_utils import check_adapters_to_merge

    adapter_names = check_adapters_to_merge(self, adapter_names)
    if not adapter_names:
        return
    base: QuantizedExperts = self.get_base_layer()
    name = self.parameter_name
    store = base.storage(name)
    delta = merged_delta(self, adapter_names)
    merged = store.dequantize(torch.float32) + delta.to(store.device)
    if safe_merge and not torch.isfinite(merged).all():
        raise ValueError(f"NaNs/Infs in the merged {name}; the adapter(s) {adapter_names} seem to be broken")
    # kept on the wrapper (not the experts module): merge_and_unload drops the wrapper and with it this copy
    self.__dict__.setdefault("_moe_compat_premerge", []).append(store)
    base.add_module(f"{name}_q", requantize_like(store, merged).to(store.device))
    self.merged_adapters.extend(adapter_names)


def _unmerge(self):
    if not self.merged:
        return
    base: QuantizedExperts = self.get_base_layer()
    name = self.parameter_name
    stack = self.__dict__.get("_moe_compat_premerge", [])
    if not stack:
        raise QuantizedExpertsError(f"no pre-merge storage recorded for {name}; cannot unmerge exactly")
    base.add_module(f"{name}_q", stack[0].to(base.storage(name).device))
    stack.clear()
    self.merged_adapters.clear()


# --- save / reload ----------------------------------------------------------------------------------------------


def quantized_wrappers(model) -> list[tuple[str, Any]]:
    """``(module path, ParamWrapper)`` for every PEFT wrapper directly or indirectly over a QuantizedExperts."""
    from peft.tuners.lora.layer import ParamWrapper

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ParamWrapper)
            and isinstance(m.get_base_layer(), QuantizedExperts)]  # fmt: skip


def describe_adapters(model) -> dict:
    """The sidecar content: per adapter and target ``<module path>:<param>`` its orientation and shapes."""
    import transformers

    adapters: dict[str, dict] = {}
    for path, w in quantized_wrappers(model):
        base = w.get_base_layer()
        for a in w.lora_A:
            A, B = w.lora_A[a].weight, w.lora_B[a].weight
            adapters.setdefault(a, {})[f"{path}:{w.parameter_name}"] = dict(
                orientation=wrapper_orientation(w, a).value,
                lora_A_shape=list(A.shape),
                lora_B_shape=list(B.shape),
                param_shape=list(getattr(base, w.parameter_name).shape),
                num_experts=int(w.num_experts),
                is_transposed=bool(base.is_transposed),
                kind=base.kind,
            )
    return dict(
        format=SIDECAR_FORMAT,
        lora_B_convention=STRIDE_E,
        peft_version=_peft_version(),
        transformers_version=transformers.__version__,
        adapters=adapters,
    )


def save_adapter(peft_model, save_directory: str, **kwargs) -> dict:
    """``peft_model.save_pretrained(save_directory, **kwargs)`` plus ``moe_compat.json``; returns the sidecar dict."""
    peft_model.save_pretrained(save_directory, **kwargs)
    info = describe_adapters(peft_model)
    write_sidecar(save_directory, info)
    return info


def describe_adapter_dir(model, adapter_dir: str) -> dict:
    """The format-1 sidecar describing the adapter *file* in ``adapter_dir`` for ``model`` (not yet PEFT-wrapped).

    For every LoRA on a QuantizedExperts module of ``model``: which parameter each nesting level is and its
    orientation, decided by `impl.adapter_dir.expert_orientation` from everything the directory offers (factor
    shapes, the sibling parameter, ``moe_compat.json`` if present, adapter_config's ``peft_version``), exactly as
    the merge decides. Works for plain PEFT saves (no sidecar). Raises OrientationError where the sources disagree
    or a square parameter is undecidable, AdapterError for an unreadable directory. Other modules are left to PEFT.
    """
    adapter = read_adapter(adapter_dir, merge=False)
    side = adapter.sidecar
    targets = {}
    for module, levels in sorted(adapter.modules.items()):
        experts = _experts_module(model, module)
        if experts is None:
            continue
        shapes = {p: tuple(getattr(experts, p).shape) for p in EXPERT_PARAMS}
        E = shapes[EXPERT_PARAMS[0]][0]
        layout = GPT_OSS if experts.is_transposed else FUSED_LINEAR
        assigned = assign_expert_params(adapter, module, levels, shapes, E, f"{module} in {type(model).__name__}")
        for param, (ka, kb) in assigned.items():
            d = expert_orientation(adapter, module, param, assigned, shapes, E, layout=layout)
            depth = next(depth for depth, pair in levels.items() if pair == (ka, kb))
            recorded = side.target(module, param) if side else None
            targets[f"base_model.model.{module}{'.base_layer' * depth}:{param}"] = dict(
                orientation=d.orientation.value,
                lora_A_shape=list(adapter.shapes[ka]),
                lora_B_shape=list(adapter.shapes[kb]),
                param_shape=list(shapes[param]),
                num_experts=E,
                is_transposed=recorded.is_transposed if recorded else None,  # the saver's: unknown without a sidecar
                kind=experts.kind,
                decided_by=list(d.decided_by),
            )
    return dict(
        format=SIDECAR_FORMAT,
        lora_B_convention=adapter.convention,
        peft_version=adapter.peft_version or (side.peft_version if side else None),
        transformers_version=side.transformers_version if side else None,
        adapters={"default": targets},
    )


def _experts_module(model, module: str) -> QuantizedExperts | None:
    try:
        m = model.get_submodule(module)
    except AttributeError:
        return None
    return m if isinstance(m, QuantizedExperts) else None


def check_sidecar(model, saved: dict, adapter_name: str = "default", saved_adapter: str = "default") -> None:
    """Raise LayoutError if the live adapter's orientation or shapes differ from the sidecar's."""
    if saved.get("lora_B_convention") != STRIDE_E:
        raise LayoutError(f"adapter lora_B convention {saved.get('lora_B_convention')!r} is not {STRIDE_E!r}")
    want = saved["adapters"].get(saved_adapter)
    if want is None:
        raise LayoutError(f"sidecar has no adapter {saved_adapter!r}: {sorted(saved['adapters'])}")
    live_all = describe_adapters(model)["adapters"].get(adapter_name, {})
    if sorted(live_all) != sorted(want):
        raise LayoutError(f"adapter targets differ: saved {sorted(want)}, loaded {sorted(live_all)}")
    for key, w in want.items():
        live = live_all[key]
        for field in ("orientation", "lora_A_shape", "lora_B_shape", "param_shape"):
            if live[field] != w[field]:
                raise LayoutError(
                    f"{key}: {field} saved as {w[field]} (PEFT {saved.get('peft_version')}, transformers "
                    f"{saved.get('transformers_version')}) but loaded as {live[field]} (PEFT {_peft_version()}); "
                    "the adapter would be applied transposed. Convert it with reference.lora.convert_adapter."
                )


def expected_orientation(param_ndim: int, is_transposed: bool) -> Orientation:
    """The orientation this process's PEFT gives a parameter of a module with ``is_transposed`` (`peft_swaps`)."""
    swapped = peft_swaps(_peft_version(), param_ndim, is_transposed)
    return Orientation.SWAPPED if swapped else Orientation.STANDARD


def _live_orientations(model, described: dict) -> dict[str, Orientation]:
    """Per described target, the orientation PEFT will give it in this process (the live module's is_transposed)."""
    out = {}
    for target, e in described["adapters"]["default"].items():
        module = target.rsplit(":", 1)[0].removeprefix("base_model.model.").replace(".base_layer", "")
        out[target] = expected_orientation(len(e["param_shape"]), bool(model.get_submodule(module).is_transposed))
    return out


def _state_key(target: str, which: str) -> str:
    """Sidecar target ``<module path>:<param>`` -> PEFT's saved key (adapter name stripped)."""
    path = target.rsplit(":", 1)[0]
    return f"{path}.{which}.weight"


def convert_adapter_dir(adapter_dir: str, saved: dict, out_dir: str, want: dict[str, Orientation]) -> dict:
    """Write to ``out_dir`` a copy of ``adapter_dir`` whose factors are re-expressed in the orientations ``want``
    (``{target: orientation}``, targets of ``saved["adapters"]["default"]``).

    Each target whose recorded orientation differs is converted exactly (a transpose of the per-expert factors,
    `reference.lora.convert_adapter`, stride-E kept). The file's tensor shapes must equal the description's, else
    LayoutError. The copy's adapter_config.json and sidecar name this process's PEFT / transformers versions (the
    file now has their orientation), so its orientation sources agree. Returns the copy's sidecar.
    """
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    from reference.lora import convert_adapter

    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    sd = load_file(weights)
    new = json.loads(json.dumps(saved))
    for target, entry in saved["adapters"]["default"].items():
        kA, kB = _state_key(target, "lora_A"), _state_key(target, "lora_B")
        if kA not in sd or kB not in sd:
            raise LayoutError(f"{target}: keys {kA} / {kB} not in {weights}")
        A, B = sd[kA], sd[kB]
        if [list(A.shape), list(B.shape)] != [entry["lora_A_shape"], entry["lora_B_shape"]]:
            raise LayoutError(
                f"{target}: the sidecar says lora_A {entry['lora_A_shape']}, lora_B {entry['lora_B_shape']} "
                f"({entry['orientation']}) but the file holds {list(A.shape)}, {list(B.shape)}: the sidecar does not "
                "describe this adapter, which would be applied transposed"
            )
        upd = new["adapters"]["default"][target]
        if Orientation(entry["orientation"]) is not want[target]:
            sd[kA], sd[kB] = convert_adapter(A, B, entry["num_experts"], src_orientation=entry["orientation"],
                                             dst_orientation=want[target], src_convention=saved["lora_B_convention"],
                                             dst_convention=STRIDE_E)  # fmt: skip
            upd.update(orientation=want[target].value, lora_A_shape=list(sd[kA].shape), lora_B_shape=list(sd[kB].shape))
        upd["is_transposed"] = None  # the converted file was not saved by a PEFT that saw the module
    new.update(lora_B_convention=STRIDE_E, peft_version=_peft_version(), transformers_version=transformers.__version__)
    new["converted_from"] = {k: saved.get(k) for k in ("peft_version", "transformers_version")}
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(adapter_dir):
        src = os.path.join(adapter_dir, name)
        if os.path.isfile(src) and name not in ("adapter_model.safetensors", SIDECAR, ADAPTER_CONFIG):
            shutil.copy(src, out_dir)
    config = read_adapter_config(Path(adapter_dir))
    config["peft_version"] = _peft_version()
    Path(out_dir, ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(sd, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    write_sidecar(out_dir, new)
    return new


def load_adapter(model, adapter_dir: str, adapter_name: str = "default", *, convert: bool = True,
                 write_sidecar_if_missing: bool = False, **kwargs):  # fmt: skip
    """``PeftModel.from_pretrained(model, adapter_dir, ...)`` with the expert LoRA orientation checked.

    The orientation of every expert target in the file is decided as the merge decides it (`describe_adapter_dir`:
    shapes, the sibling parameter, ``moe_compat.json`` when present, ``peft_version``); contradicting sources or an
    undecidable square target raise OrientationError. Plain PEFT saves (no sidecar) load too;
    ``write_sidecar_if_missing=True`` then writes the decided description as ``adapter_dir/moe_compat.json``.
    A file in another orientation than this PEFT gives (0.18 vs 0.19.1+, or 0.19.0 on GPT-OSS) is converted exactly
    first (``convert=True``; ``False`` raises LayoutError instead): PEFT alone would raise a size mismatch for
    non-square experts and silently apply a transposed delta for square ones. After loading, the live wrappers'
    orientation and shapes must equal the description (`check_sidecar`).
    """
    import tempfile

    from peft import PeftModel

    install()
    described = describe_adapter_dir(model, adapter_dir)
    if write_sidecar_if_missing and read_sidecar(adapter_dir) is None:
        write_sidecar(adapter_dir, described)
    want = _live_orientations(model, described)
    stale = [t for t, e in described["adapters"]["default"].items() if Orientation(e["orientation"]) is not want[t]]
    with tempfile.TemporaryDirectory() as tmp:
        if stale:
            if not convert:
                raise LayoutError(
                    f"adapter saved with PEFT {described.get('peft_version')} in another orientation than PEFT "
                    f"{_peft_version()} uses for {stale}; load with convert=True"
                )
            described = convert_adapter_dir(adapter_dir, described, tmp, want)
            adapter_dir = tmp
        with _skip_broken_v4_conversion(adapter_dir):
            peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, **kwargs)
    check_sidecar(peft_model, described, adapter_name)
    return peft_model


def v4_conversion_broken() -> bool:
    """PEFT 0.19.x builds ``WeightConverter(distributed_operation=...)``, which transformers >= 5.6 rejects, in its
    transformers-v4 -> v5 adapter conversion (peft.md §2.3 / §5.2 item 4; fixed in PEFT 0.20)."""
    import transformers

    peft_v = parse_version(_peft_version())[0]
    return (0, 19, 0) <= peft_v < (0, 20, 0) and parse_version(transformers.__version__)[0] >= (5, 6, 0)


@contextlib.contextmanager
def _skip_broken_v4_conversion(adapter_dir: str):
    """Where `v4_conversion_broken`, run PEFT's loader without its v4 -> v5 conversion, which is the identity for an
    adapter saved by `save_adapter` (fused ``target_parameters`` keys). An adapter with per-expert (v4) LoRA keys
    needs that conversion: raise instead."""
    if not v4_conversion_broken():
        yield
        return
    import re

    from peft.utils import transformers_weight_conversion as twc
    from safetensors import safe_open

    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        v4 = [k for k in f.keys() if re.search(r"\.experts\.\d+\.", k)]
    if v4:
        raise LayoutError(
            f"adapter has per-expert (transformers v4) LoRA keys such as {v4[0]!r}: it needs PEFT's v4 -> v5 "
            f"conversion, which PEFT {_peft_version()} cannot run on this transformers (use PEFT >= 0.20)"
        )
    original = twc.convert_peft_adapter_state_dict_for_transformers
    twc.convert_peft_adapter_state_dict_for_transformers = _identity_conversion
    try:
        yield
    finally:
        twc.convert_peft_adapter_state_dict_for_transformers = original


def _identity_conversion(model, peft_config, adapter_state_dict, adapter_name="default"):
    return adapter_state_dict
