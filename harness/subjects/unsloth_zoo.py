"""unsloth-zoo as a subject: its released MoE code (2026.6.2 onwards), loaded from the wheel on the package index.

Why the wheel is unpacked and not installed (checked 2026-12-05 on this CPU machine, unsloth_zoo 2026.10.9 +
unsloth 2026.10.9 + transformers 5.17.0 + PEFT 0.21.2 in a cell venv sharing the base torch 2.13): ``import
unsloth_zoo`` raises "Please install Unsloth" without the ``unsloth`` package; installing it pulls torchvision 0.29
(needs torch >= 2.14: the cell build stops on the conflict, and forced through, ``import unsloth`` raises "operator
torchvision::nms does not exist") and datasets (needs fsspec <= 2026.2); with the torchvision check skipped,
``unsloth``'s CPU init raises inside transformers (``Could not import module 'Trainer'``). Releases before 2026.9
also raise "Unsloth cannot find any torch accelerator? You need a GPU." from ``unsloth_zoo.device_type`` at import.
So: ``harness.subjects.wheel`` fetches the wheel, and only the modules that hold the MoE code are imported:

- ``unsloth_zoo.saving_utils`` (merge: ``_detect_moe_lora_layout``, ``_merge_moe_{gate,up,down_proj}_expert``,
  ``_merge_moe_fused_{gate_up,down_proj}_expert``, ``create_lora_statistics``, ``_MOE_MERGE_STATE``),
- ``unsloth_zoo.temporary_patches.moe_utils`` (forward: ``_extract_lora_from_wrapper``),
- ``unsloth_zoo.temporary_patches.moe_utils_fp8`` (``_fp8_dequant_blockwise``, ``_fp8_requant_blockwise``,
  ``_dequantize_expert_slice``, ``_make_grouped_mm_rhs_column_major``),
- ``unsloth_zoo.temporary_patches.moe_utils_bnb4bit`` (``_dequantize_bnb4bit_expert_weights``),

with the packages ``unsloth_zoo`` and ``unsloth_zoo.temporary_patches`` replaced by stand-ins whose ``__init__``
does not run (no GPU init, no import-time patching: ``TEMPORARY_PATCHES = []``) and ``unsloth_zoo.device_type``
replaced by a CPU stub (`DEVICE_STUB`). Every other submodule they import is the wheel's own code; ``unsloth`` is
absent, so the code's own ``except ImportError`` fallbacks run (as on any machine without the Triton kernels).
``UNSLOTH_COMPILE_LOCATION`` points at a temporary directory (``moe_utils`` copies itself there at import) and
``UNSLOTH_ENABLE_LOGGING=0``. The module global ``_PEFT_AMBIGUOUS_LAYOUT_DEFAULT`` is computed from the PEFT
installed at import, so one subject version runs per process (the matrix runs one per cell).

Call sites reproduced (see each method): the merge reads its `LoraStats` from the subject's own
``create_lora_statistics`` on the real PeftModel (so ``LoraStats.module`` is whatever that function attaches: the
experts module for the gate_up wrapper, and for the outer wrapper whatever the release finds); the fused merge gets the
``is_transposed`` hint its caller computes from the shard header (``gate_up.shape[2] > gate_up.shape[1]``); the forward
calls ``_extract_lora_from_wrapper(wrapper)`` exactly as the patched ``ParamWrapper.forward`` does and applies the
documented contract ``delta = x @ first[e] @ second[e] * scaling`` (``forward_native_moe_loop``'s per-expert step).
Not covered: the NF4 ``ParamWrapper.merge`` replacement (installed through the package's patch machinery, which
these stubs do not run) and the FP8 save handler's shard I/O.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from harness.subjects import wheel
from harness.subjects.interface import (
    ForwardCall,
    FP8Call,
    FP8RequantCall,
    FusedMergeCall,
    LoraInput,
    MergeResult,
    NF4Call,
    Op,
    PerExpertMergeCall,
    RhsCall,
    Subject,
    SubjectLoadError,
    SubjectRefusal,
)
from reference.layout import Orientation

DIST = "unsloth_zoo"
LAYOUT_ENV = "UNSLOTH_MOE_LORA_B_LAYOUT"  # from 2026.9.6: grouped_by_expert reads a legacy contiguous-r adapter
FIRST_MOE_RELEASE = "2026.6.2"  # the MoE / NF4 / FP8 / ParamWrapper code first ships here; 2026.6.1 has none
MODULES = (
    "unsloth_zoo.saving_utils",
    "unsloth_zoo.temporary_patches.moe_utils",
    "unsloth_zoo.temporary_patches.moe_utils_fp8",
    "unsloth_zoo.temporary_patches.moe_utils_bnb4bit",
)


def _noop(*args, **kwargs) -> None:
    return None


DEVICE_STUB = {
    "DEVICE_TYPE": "cpu",
    "DEVICE_TYPE_TORCH": "cpu",
    "DEVICE_COUNT": 0,
    "ALLOW_PREQUANTIZED_MODELS": False,
    "ALLOW_BITSANDBYTES": True,
    "is_hip": lambda: False,
    "get_device_type": lambda: "cpu",
    "device_synchronize": _noop,
    "device_empty_cache": _noop,
    "device_is_bf16_supported": lambda *a, **k: True,
}

_SAFETENSORS_DTYPE = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16",
                      torch.float16: "F16", getattr(torch, "float8_e8m0fnu", None): "F8_E8M0"}


class _Shard:
    """A safetensors shard as the merge uses it: ``get_tensor(key)`` only."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]


# unsloth's per-expert merge names (LoRA "standard" = lora_A spans the per-expert weight's in_dim)
_UNSLOTH_LAYOUT = {"standard": Orientation.SWAPPED, "swapped": Orientation.STANDARD}


class UnslothZoo(Subject):
    name = DIST
    strict = False
    ops = frozenset({
        Op.ORIENTATION, Op.LORA_FORWARD, Op.MERGE_PER_EXPERT, Op.MERGE_FUSED, Op.FP8_DEQUANT, Op.FP8_DEQUANT_EXPERT,
        Op.FP8_REQUANT, Op.GROUPED_MM_RHS, Op.NF4_DEQUANT,
    })  # fmt: skip
    missing = {}

    def __init__(self, version: str, root) -> None:
        super().__init__()
        self.version = version
        self.source = f"wheel {DIST}=={version} unpacked at {root} (modules {', '.join(MODULES)}; stubs: "
        self.source += "unsloth_zoo/__init__, temporary_patches/__init__, device_type)"
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", tempfile.mkdtemp(prefix="moe_compat_unsloth_compiled_"))
        os.environ.setdefault("UNSLOTH_ENABLE_LOGGING", "0")
        mods = wheel.load_modules(
            root,
            DIST,
            MODULES,
            stub_packages={
                "unsloth_zoo": {"__version__": version, "DEVICE_TYPE": "cpu", "DEVICE_TYPE_TORCH": "cpu",
                                "DEVICE_COUNT": 0},  # fmt: skip
                "unsloth_zoo.temporary_patches": {"TEMPORARY_PATCHES": []},
            },
            stub_modules={"unsloth_zoo.device_type": DEVICE_STUB},
        )
        self.su = mods["unsloth_zoo.saving_utils"]
        self.mu = mods["unsloth_zoo.temporary_patches.moe_utils"]
        self.mf = mods["unsloth_zoo.temporary_patches.moe_utils_fp8"]
        self.mb = mods["unsloth_zoo.temporary_patches.moe_utils_bnb4bit"]

    # --- helpers ------------------------------------------------------------------------------------------------

    def _stats(self, lora: LoraInput):
        """The subject's own LoraStats for ``lora``'s wrapper (``create_lora_statistics`` on the real PeftModel)."""
        if lora.peft is None:
            raise SubjectLoadError("unsloth_zoo's merge reads LoRA from a live PeftModel; this call has none")
        stats, _ = self.su.create_lora_statistics(lora.peft.model, merge_into_original=True, return_state_dict=False)
        inner = self.su.find_lora_base_model(lora.peft.model)
        want = lora.peft.wrappers[f"{lora.context.param}_proj"]
        for key, st in stats.items():
            if st.lora_A is not None and inner.get_submodule(key) is want:
                return key, st
        raise SubjectLoadError(f"create_lora_statistics has no entry for the {lora.context.param} wrapper: {list(stats)}")

    def _merge_state(self) -> tuple[int, int, list[str]]:
        s = self.su._MOE_MERGE_STATE
        return int(s["applied"]), int(s["fallback"]), [str(s["first_error"])] if s["first_error"] else []

    @staticmethod
    def _module_repr(st) -> str:
        """``LoraStats.module`` as a standalone reproduction can pass it: only its swap flag is read by the layout
        detection (an object without the flag behaves like None)."""
        m = st.module
        if m is None or not hasattr(m, "_did_swap_in_out_features"):
            return "None"
        return f"types.SimpleNamespace(_did_swap_in_out_features={m._did_swap_in_out_features})"

    @staticmethod
    def _module_note(st) -> str:
        m = st.module
        if m is None:
            return "None"
        return f"{type(m).__name__} (_did_swap_in_out_features={getattr(m, '_did_swap_in_out_features', 'absent')})"

    @staticmethod
    @contextlib.contextmanager
    def _lora_b_layout(lora: LoraInput):
        """``UNSLOTH_MOE_LORA_B_LAYOUT=grouped_by_expert`` (read on every call from 2026.9.6; ignored before, when
        contiguous-r was the only reading) for a contiguous-r adapter, unset for a PEFT (stride-E) one."""
        old = os.environ.pop(LAYOUT_ENV, None)
        if lora.context.lora_B_convention == "contiguous_r":
            os.environ[LAYOUT_ENV] = "grouped_by_expert"
        try:
            yield
        finally:
            os.environ.pop(LAYOUT_ENV, None)
            if old is not None:
                os.environ[LAYOUT_ENV] = old

    @staticmethod
    def _layout_note(lora: LoraInput) -> str:
        if lora.context.lora_B_convention == "contiguous_r":
            return f"import os; os.environ['{LAYOUT_ENV}'] = 'grouped_by_expert'  # a contiguous-r adapter\n"
        return ""

    # --- ops ----------------------------------------------------------------------------------------------------

    def orientation(self, lora: LoraInput) -> Orientation:
        """``_detect_moe_lora_layout`` as the per-expert merge calls it: dims of the per-expert disk weight
        (gate/up ``[I, H]``: out 2I, in H; down ``[H, I]``: out H, in I) and ``lora_module=LoraStats.module``."""
        key, st = self._stats(lora)
        _, d1, d2 = lora.context.param_shape  # fused_linear: gate_up [E, 2I, H], down [E, H, I] = (out, in)
        layout, r = self.su._detect_moe_lora_layout(st.lora_A, st.lora_B, lora.num_experts, d1, d2,
                                                    lora_module=st.module)  # fmt: skip
        self.record(
            f"import types\nfrom unsloth_zoo.saving_utils import _detect_moe_lora_layout\n"
            f"_detect_moe_lora_layout(lora_A, lora_B, {lora.num_experts}, {d1}, {d2}, "
            f"lora_module={self._module_repr(st)})\n"
            f"# lora_module: create_lora_statistics(model)[{key!r}].module = {self._module_note(st)}\n"
            f"# returned ({layout!r}, {r}); unsloth's 'standard' = lora_A spans the per-expert in_dim = the "
            "reference's 'swapped' (PEFT _did_swap_in_out_features=True)",
            lora_A=st.lora_A, lora_B=st.lora_B,
        )  # fmt: skip
        if layout not in _UNSLOTH_LAYOUT:
            raise SubjectRefusal(f"_detect_moe_lora_layout returned {layout!r}")
        return _UNSLOTH_LAYOUT[layout]

    def lora_forward(self, call: ForwardCall) -> torch.Tensor:
        """``_extract_lora_from_wrapper(wrapper)`` (what the patched ParamWrapper.forward stashes), then the per-expert
        step of ``forward_native_moe_loop``: ``x_e @ first[e] @ second[e] * scaling`` (2-D factors when E <= 1).
        None (the extractor swallows errors) means the forward runs without LoRA: a zero delta.

        The reproduction calls ``extract_moe_lora_weights_for_grouped_mm`` with a stand-in wrapper carrying only what
        it reads (the swap flag, the base layer's ``is_transposed`` / grouped-mm flag) and the in/out dims the real call
        derives; it is checked here to give the same factors as the real call."""
        import types

        lora = call.lora
        ctx = lora.context
        wrapper = lora.peft.wrappers[f"{ctx.param}_proj"]
        with self._lora_b_layout(lora):
            res = self.mu._extract_lora_from_wrapper(wrapper)
        base = wrapper.get_base_layer()
        grouped = bool(getattr(base, "_unsloth_grouped_mm_format", False))
        shape = ctx.param_shape
        in_dim, out_dim = (shape[-2], shape[-1]) if grouped else (shape[-1], shape[-2])
        flag = getattr(wrapper, "_did_swap_in_out_features", None)
        stand_in = types.SimpleNamespace(get_base_layer=lambda: types.SimpleNamespace(
            is_transposed=getattr(base, "is_transposed", None), _unsloth_grouped_mm_format=grouped))  # fmt: skip
        if flag is not None:
            stand_in._did_swap_in_out_features = flag
        with self._lora_b_layout(lora):
            alone = self.mu.extract_moe_lora_weights_for_grouped_mm(stand_in, lora.lora_A, lora.lora_B,
                                                                    lora.scaling, lora.num_experts, input_dim=in_dim,
                                                                    output_dim=out_dim)  # fmt: skip
        same = res is not None and all(torch.equal(a.detach(), b.detach()) for a, b in zip(res[:2], alone[:2]))
        flag_src = "" if flag is None else f", _did_swap_in_out_features={flag}"
        self.record(
            "import types\nfrom unsloth_zoo.temporary_patches.moe_utils import extract_moe_lora_weights_for_grouped_mm\n"
            + self._layout_note(lora) + f"wrapper = types.SimpleNamespace(get_base_layer=lambda: types.SimpleNamespace(is_transposed="
            f"{getattr(base, 'is_transposed', None)}, _unsloth_grouped_mm_format={grouped}){flag_src})\n"
            f"first, second, s, E = extract_moe_lora_weights_for_grouped_mm(wrapper, lora_A, lora_B, {lora.scaling}, "
            f"{lora.num_experts}, input_dim={in_dim}, output_dim={out_dim})\n"
            "delta = torch.stack([x[i] @ first[e] @ second[e] * s for i, e in enumerate(ids.tolist())])\n"
            f"# = _extract_lora_from_wrapper(PEFT {ctx.peft_version} ParamWrapper({ctx.param}_proj) on {ctx.family} "
            f"experts) then forward_native_moe_loop"
            + ("" if same else "\n# NOTE: this stand-in call gives other factors than the real wrapper call"),
            lora_A=lora.lora_A, lora_B=lora.lora_B, x=call.x, ids=call.expert_ids,
        )  # fmt: skip
        x, ids = call.x, call.expert_ids
        if res is None:
            return x.new_zeros(x.shape[0], out_dim)
        first, second, scaling, _ = res
        first, second = first.detach().to(x.dtype), second.detach().to(x.dtype)
        if first.ndim == 2:
            return (x @ first @ second) * scaling
        out = x.new_zeros(x.shape[0], second.shape[-1])
        for e in ids.unique().tolist():
            rows = ids == e
            out[rows] = (x[rows] @ first[e] @ second[e]) * scaling
        return out

    def merge_per_expert(self, call: PerExpertMergeCall) -> MergeResult:
        """``_merge_moe_{gate,up,down_proj}_expert(W, stats, e, E, W.dtype)`` per expert, stats from
        ``create_lora_statistics``; applied / fallback from ``_MOE_MERGE_STATE`` (its caller raises on a fallback)."""
        self.su._reset_moe_merge_state()
        out = dict(call.tensors)
        key = {n: f"{call.prefix}experts.{{e}}.{n}_proj.weight" for n in ("gate", "up", "down")}
        stats = {p: self._stats(lo) for p, lo in call.adapters.items()}
        E = call.num_experts
        with self._lora_b_layout(next(iter(call.adapters.values()))):
            self._merge_experts(call, out, key, stats)
        I, H = call.tensors[key["gate"].format(e=0)].shape
        applied, refused, reasons = self._merge_state()
        calls = {"gate_up": [("gate", (I, H)), ("up", (I, H))], "down": [("down", (H, I))]}
        for p, (k, st) in stats.items():
            lines = [
                "import types\nfrom unsloth_zoo import saving_utils as su\n" + self._layout_note(call.adapters[p])
                + f"stats = su.LoraStats({self._module_repr(st)}, lora_A, lora_B, {st.alpha})  # module: "
                f"create_lora_statistics(model)[{k!r}].module = {self._module_note(st)}",
                "e = 0  # any expert; a zero base makes the result the merged delta",
            ]  # fmt: skip
            for n, shp in calls[p]:
                fn = "_merge_moe_down_proj_expert" if n == "down" else f"_merge_moe_{n}_expert"
                lines.append(f"{n} = su.{fn}(torch.zeros{shp}, stats, e, {E}, torch.float32)")
            lines.append(f"# _MOE_MERGE_STATE after all experts: applied {applied}, fallback {refused}")
            self.record("\n".join(lines), keys=tuple(key[n].format(e=e) for n, _ in calls[p] for e in range(E)),
                        lora_A=call.adapters[p].lora_A, lora_B=call.adapters[p].lora_B)  # fmt: skip
        if refused:
            raise SubjectRefusal(f"{refused} fallback(s): {reasons}")
        return MergeResult(out, applied, refused, reasons)

    def _merge_experts(self, call: PerExpertMergeCall, out: dict, key: dict, stats: dict) -> None:
        E = call.num_experts
        for e in range(E):
            if "gate_up" in stats:
                st = stats["gate_up"][1]
                for n, fn in (("gate", self.su._merge_moe_gate_expert), ("up", self.su._merge_moe_up_expert)):
                    k = key[n].format(e=e)
                    out[k] = fn(out[k], st, e, E, out[k].dtype)
            if "down" in stats:
                k = key["down"].format(e=e)
                out[k] = self.su._merge_moe_down_proj_expert(out[k], stats["down"][1], e, E, out[k].dtype)

    def merge_fused(self, call: FusedMergeCall) -> MergeResult:
        """``_merge_moe_fused_{gate_up,down_proj}_expert(W, stats, W.dtype, is_transposed=hint)``, the hint computed as
        ``_merge_moe_experts_file`` does: ``gate_up.shape[2] > gate_up.shape[1]`` of the shard's gate_up entry."""
        self.su._reset_moe_merge_state()
        lora = call.lora
        key, st = self._stats(lora)
        gate_up = call.param if lora.context.param == "gate_up" else call.sibling
        hint = gate_up.shape[2] > gate_up.shape[1]
        fn = {"gate_up": self.su._merge_moe_fused_gate_up_expert, "down": self.su._merge_moe_fused_down_proj_expert}
        with self._lora_b_layout(lora):
            merged = fn[lora.context.param](call.param, st, call.param.dtype, is_transposed=hint)
        applied, refused, reasons = self._merge_state()
        self.record(
            "from unsloth_zoo import saving_utils as su\n" + self._layout_note(lora)
            + f"stats = su.LoraStats(None, lora_A, lora_B, {st.alpha})  # module unused by the fused merge\n"
            f"W = torch.zeros({tuple(call.param.shape)})  # the fused {lora.context.param}_proj on disk\n"
            f"su.{fn[lora.context.param].__name__}(W, stats, torch.float32, is_transposed={hint})  # hint: gate_up "
            f"{tuple(gate_up.shape)}: shape[2] > shape[1]\n"
            f"# _MOE_MERGE_STATE: applied {applied}, fallback {refused}; W - W0 is the merged delta",
            lora_A=st.lora_A, lora_B=st.lora_B,
        )  # fmt: skip
        if refused:
            raise SubjectRefusal(f"{refused} fallback(s): {reasons}")
        return MergeResult({"param": merged}, applied, refused, reasons)

    def _quant_load(self, q: torch.Tensor, scale_inv: torch.Tensor, block):
        """``apply_moe_quant_load(file, header, key[, block_size])``: the merge's FP8 entry point (save handler),
        with a shard of two tensors ``w.weight`` and ``w.weight_scale_inv``; UNSAFE is a refusal."""
        import inspect

        tensors = {"w.weight": q, "w.weight_scale_inv": scale_inv}
        header = {k: {"dtype": _SAFETENSORS_DTYPE.get(t.dtype, str(t.dtype)), "shape": list(t.shape)}
                  for k, t in tensors.items()}  # fmt: skip
        shard = _Shard(tensors)
        kwargs = {"block_size": block} if "block_size" in inspect.signature(self.mf.apply_moe_quant_load).parameters else {}
        out, requant = self.mf.apply_moe_quant_load(shard, header, "w.weight", **kwargs)
        if out is self.mf._MOE_QUANT_UNSAFE:
            raise SubjectRefusal("apply_moe_quant_load returned _MOE_QUANT_UNSAFE (merge fallback recorded)")
        if requant is None:
            raise SubjectRefusal("apply_moe_quant_load did not treat the e4m3 weight as FP8 (no requant function)")
        return out, requant, kwargs

    def fp8_dequant(self, call: FP8Call) -> torch.Tensor:
        """The merge's FP8 read: ``apply_moe_quant_load`` -> ``_fp8_save_handler`` -> ``_fp8_dequant_blockwise``."""
        self.record(self._shard_code(call.scale_inv.dtype)
                    + f"W, requant = apply_moe_quant_load(Shard(), header, 'w.weight'{self._block_kw(call.block)})",
                    q=call.q, scale_inv=call.scale_inv)  # fmt: skip
        return self._quant_load(call.q, call.scale_inv, call.block)[0]

    @staticmethod
    def _shard_code(scale_dtype) -> str:
        """Python for the shard the merge reads FP8 from (``q`` and ``scale_inv`` defined by the caller's lines)."""
        return (
            "from unsloth_zoo.temporary_patches.moe_utils_fp8 import apply_moe_quant_load\n"
            "class Shard:  # what the merge passes: get_tensor only\n"
            "    def get_tensor(self, k): return {'w.weight': q, 'w.weight_scale_inv': scale_inv}[k]\n"
            "header = {'w.weight': {'dtype': 'F8_E4M3', 'shape': list(q.shape)}, 'w.weight_scale_inv': "
            f"{{'dtype': {_SAFETENSORS_DTYPE.get(scale_dtype)!r}, 'shape': list(scale_inv.shape)}}}}\n"
        )

    def _block_kw(self, block) -> str:
        import inspect

        has = "block_size" in inspect.signature(self.mf.apply_moe_quant_load).parameters
        return f", block_size={block}" if has else ""

    def fp8_dequant_expert(self, call: FP8Call) -> torch.Tensor:
        """``_dequantize_expert_slice(q, s, fp32, quant_kind="weight_scale_inv")`` with ``block_size`` attached to
        the scale as ``_get_moe_weight_and_quant_info`` attaches it."""
        s = call.scale_inv
        if call.block is not None:
            s.block_size = call.block
        self.record(
            f"from unsloth_zoo.temporary_patches.moe_utils_fp8 import _dequantize_expert_slice\n"
            f"scale_inv.block_size = {call.block}\n"
            f"_dequantize_expert_slice(q, scale_inv, torch.float32, quant_kind='weight_scale_inv')",
            q=call.q, scale_inv=call.scale_inv,
        )  # fmt: skip
        out = self.mf._dequantize_expert_slice(call.q, s, torch.float32, quant_kind="weight_scale_inv")
        if out is None:
            raise SubjectRefusal("_dequantize_expert_slice returned None")
        return out

    def fp8_requant(self, call: FP8RequantCall) -> tuple[torch.Tensor, torch.Tensor]:
        """The merge's FP8 write: the ``requant`` closure ``apply_moe_quant_load`` returns for an FP8 weight with a
        ``block`` grid of scales in ``scale_dtype``, applied to the merged weight ``w``."""
        rows, cols = call.w.shape
        grid = (-(-rows // call.block[0]), -(-cols // call.block[1]))
        q0 = torch.zeros(rows, cols).to(torch.float8_e4m3fn)
        s0 = torch.ones(grid).to(call.scale_dtype)
        _, requant, _ = self._quant_load(q0, s0, call.block)
        w_fp8, _dtype, extra = requant(call.w)
        self.record(
            f"q = torch.zeros{(rows, cols)}.to(torch.float8_e4m3fn)  # the FP8 weight on disk (values unused)\n"
            f"scale_inv = torch.ones{grid}.to({call.scale_dtype})  # its scales: their dtype is the requant's\n"
            + self._shard_code(call.scale_dtype)
            + f"_, requant = apply_moe_quant_load(Shard(), header, 'w.weight'{self._block_kw(call.block)})\n"
            "q, _, [(_, scale_inv, _)] = requant(w)  # the merged weight w requantized",
            w=call.w,
        )  # fmt: skip
        (_key, new_scale, _sd), = extra
        return w_fp8, new_scale

    def grouped_mm_rhs(self, call: RhsCall) -> torch.Tensor:
        self.record(
            "from unsloth_zoo.temporary_patches.moe_utils_fp8 import _make_grouped_mm_rhs_column_major\n"
            f"out = _make_grouped_mm_rhs_column_major(w)  # w {tuple(call.w.shape)} contiguous\n"
            "# torch._scaled_grouped_mm needs mat_b of the same (E, K, N) shape with stride(-2) == 1",
            w=call.w,
        )  # fmt: skip
        return self.mf._make_grouped_mm_rhs_column_major(call.w)

    def nf4_dequant(self, call: NF4Call) -> torch.Tensor:
        """Quantized as its loader does (``Bnb4bitQuantize.convert``: one ``Params4bit`` over the whole 3-D stack,
        ``_original_shape`` set), read with ``_dequantize_bnb4bit_expert_weights``."""
        import bitsandbytes as bnb

        param = bnb.nn.Params4bit(call.weight, requires_grad=False, quant_type="nf4", blocksize=call.blocksize,
                                  compress_statistics=False).to(call.weight.device)  # fmt: skip
        param._original_shape = tuple(call.weight.shape)
        self.record(
            "from unsloth_zoo.temporary_patches.moe_utils_bnb4bit import _dequantize_bnb4bit_expert_weights\n"
            f"p = bnb.nn.Params4bit(w, requires_grad=False, quant_type='nf4', blocksize={call.blocksize}, "
            f"compress_statistics=False).to('cpu'); p._original_shape = {tuple(call.weight.shape)}\n"
            f"_dequantize_bnb4bit_expert_weights(p, {call.dtype})",
            w=call.weight,
        )  # fmt: skip
        out = self.mb._dequantize_bnb4bit_expert_weights(param, call.dtype)
        if out is None:
            raise SubjectRefusal("_dequantize_bnb4bit_expert_weights returned None (not a quantized Params4bit)")
        return out


def fetch(version: str | None):
    """The unpacked wheel of unsloth_zoo ``version`` (downloaded into the subject cache once)."""
    from packaging.version import Version

    if version is None:
        raise SubjectLoadError(f"{DIST} needs an exact version: {DIST}==VERSION")
    if Version(version) < Version(FIRST_MOE_RELEASE):
        raise SubjectLoadError(f"{DIST} {version} predates its MoE code (first in {FIRST_MOE_RELEASE})")
    return wheel.fetch(DIST, version)


def load(version: str | None) -> UnslothZoo:
    """Fetch (cached), unpack and import unsloth_zoo ``version``."""
    return UnslothZoo(version, fetch(version))
