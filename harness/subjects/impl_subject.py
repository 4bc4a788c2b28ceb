"""moe-compat's own ``impl/`` as a subject, through the same interface as any other implementation.

Only impl's public functions are called (re-point the imports here when impl's modules move):

- orientation, per-expert and fused merges: the on-disk path users run. The case's base tensors are written as a tiny
  checkpoint (``config.json`` + ``model.safetensors``, per-expert ``...experts.{e}.{gate,up,down}_proj.weight`` or
  fused ``...experts.{gate_up,down}_proj``) and the adapter is saved by the cell's real PEFT (``save_pretrained``);
  then ``impl.checkpoint.open_checkpoint`` + ``impl.adapter_dir.read_adapter`` + ``impl.merge.plan_merge`` (the
  decision) or ``impl.merge.merge_adapter`` (``merged_16bit``, fp32 out). impl's refusals (``impl.errors.MergeError``
  and its subclasses, ``CheckpointError``, ``LayoutError``) are scored as refusals.
- LoRA forward: ``impl.peft_integration.wrapper_orientation`` on the live wrapper, then ``impl.forward.expert_lora`` and the CPU backend's grouped ``lora_delta`` (the model's path).
- FP8: ``impl.storage.FP8Weight`` (forward storage: quantize / dequantize); the merge path dequantizes and
  requantizes through ``reference.fp8`` (``impl.merge`` imports those functions), so those ops call them.
- NF4: ``impl.storage.NF4Weight`` (quantize with bitsandbytes, dequantize through a flat state).

Not implemented: the grouped-mm right-hand-side helper (impl's kernels read ``[E, K, N]`` row-major directly).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

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
    Subject,
    SubjectRefusal,
)
from reference.layout import Orientation
from reference.lora import STRIDE_E

UE8M0 = getattr(torch, "float8_e8m0fnu", None)


def _refusals() -> tuple[type[BaseException], ...]:
    from impl.checkpoint import CheckpointError
    from impl.errors import MergeError
    from impl.storage import QuantizedExpertsError
    from reference.fp8 import FP8FormatError
    from reference.layout import LayoutError

    return (MergeError, CheckpointError, LayoutError, QuantizedExpertsError, FP8FormatError)


class ImplSubject(Subject):
    name = "impl"
    strict = True
    ops = frozenset({
        Op.ORIENTATION, Op.LORA_FORWARD, Op.MERGE_PER_EXPERT, Op.MERGE_FUSED, Op.FP8_DEQUANT, Op.FP8_DEQUANT_EXPERT,
        Op.FP8_REQUANT, Op.NF4_DEQUANT,
    })  # fmt: skip
    missing = {Op.GROUPED_MM_RHS: "impl's grouped GEMM kernels read [E, K, N] row-major; there is no RHS helper"}

    def __init__(self) -> None:
        super().__init__()
        from importlib import metadata

        try:
            self.version = metadata.version("moe-compat")
        except metadata.PackageNotFoundError:
            self.version = "checkout"
        self.source = f"this checkout ({Path(__file__).resolve().parents[2]})"

    # --- disk helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def _write_base(root: Path, tensors: dict[str, torch.Tensor], lora: LoraInput) -> None:
        from safetensors.torch import save_file

        E, d1, d2 = lora.context.param_shape
        if lora.context.param == "gate_up":
            H, I = (d2, d1 // 2) if lora.context.layout == "fused_linear" else (d1, d2 // 2)
        else:
            H, I = (d1, d2) if lora.context.layout == "fused_linear" else (d2, d1)
        config = {"hidden_size": H, "moe_intermediate_size": I}
        if lora.context.family == "gpt_oss":
            config["model_type"] = "gpt_oss"
        root.mkdir(parents=True)
        (root / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"))

    def _disk(self, tmp: Path, tensors: dict[str, torch.Tensor], lora: LoraInput) -> tuple[Path, Path]:
        base, adapter = tmp / "base", tmp / "adapter"
        self._write_base(base, tensors, lora)
        lora.peft.model.save_pretrained(str(adapter))
        if lora.context.lora_B_convention != STRIDE_E:  # impl.merge's sidecar short form names the packing
            (adapter / "moe_compat.json").write_text(json.dumps({"lora_B_convention": lora.context.lora_B_convention}))
        return base, adapter

    def _merge(self, tensors: dict[str, torch.Tensor], lora: LoraInput) -> tuple[dict[str, torch.Tensor], int]:
        from safetensors.torch import load_file

        from impl.merge import MERGED_16BIT, merge_adapter

        with tempfile.TemporaryDirectory(prefix="moe_compat_subject_") as d:
            base, adapter = self._disk(Path(d), tensors, lora)
            try:
                report = merge_adapter(base, adapter, Path(d) / "out", method=MERGED_16BIT, dtype=torch.float32)
            except _refusals() as exc:
                raise SubjectRefusal(f"{type(exc).__name__}: {exc}") from exc
            return load_file(str(Path(d) / "out" / "model.safetensors")), report.expert_deltas

    # --- ops ----------------------------------------------------------------------------------------------------

    def orientation(self, lora: LoraInput) -> Orientation:
        from impl.adapter_dir import read_adapter
        from impl.checkpoint import open_checkpoint
        from impl.merge import plan_merge

        E, d1, d2 = lora.context.param_shape
        path = lora.peft.module_path
        I, H = (d1 // 2, d2) if lora.context.param == "gate_up" else (d2, d1)
        zeros = {}
        for e in range(E):
            zeros[f"{path}.{e}.gate_proj.weight"] = torch.zeros(I, H)
            zeros[f"{path}.{e}.up_proj.weight"] = torch.zeros(I, H)
            zeros[f"{path}.{e}.down_proj.weight"] = torch.zeros(H, I)
        with tempfile.TemporaryDirectory(prefix="moe_compat_subject_") as d:
            base, adapter = self._disk(Path(d), zeros, lora)
            try:
                plan = plan_merge(open_checkpoint(base), read_adapter(adapter))
            except _refusals() as exc:
                raise SubjectRefusal(f"{type(exc).__name__}: {exc}") from exc
        self.record(
            "from impl.adapter_dir import read_adapter\nfrom impl.checkpoint import open_checkpoint\n"
            "from impl.merge import plan_merge\n"
            "plan = plan_merge(open_checkpoint(base_dir), read_adapter(adapter_dir))  # adapter_dir: "
            f"peft_model.save_pretrained (PEFT {lora.context.peft_version})\n"
            f"[x.decision for x in plan.expert_loras if x.param == {lora.context.param!r}]",
            lora_A=lora.lora_A, lora_B=lora.lora_B,
        )  # fmt: skip
        (hit,) = [x for x in plan.expert_loras if x.param == lora.context.param]
        return hit.decision.orientation

    def lora_B_convention(self, lora) -> str:
        """How lora_B's columns are read per expert: what the adapter declares (impl honours its sidecar)."""
        return lora.context.lora_B_convention

    def lora_forward(self, call: ForwardCall) -> torch.Tensor:
        from impl.backends import get_backend, route
        from impl.forward import LoraSpec, expert_lora
        from impl.peft_integration import wrapper_orientation

        lora = call.lora
        wrapper = lora.peft.wrappers[f"{lora.context.param}_proj"]
        try:
            o = wrapper_orientation(wrapper, "default")
        except _refusals() as exc:
            raise SubjectRefusal(f"{type(exc).__name__}: {exc}") from exc
        convention = self.lora_B_convention(lora)
        spec = LoraSpec(lora.lora_A, lora.lora_B, lora.scaling, o.value, convention)
        # the model's CPU path: grouped LoRA through torch._grouped_mm; float64 only through the explicit loop backend
        backend = "loop" if call.x.dtype == torch.float64 else "grouped_mm"
        self.record(
            "from impl.backends import get_backend, route\nfrom impl.forward import LoraSpec, expert_lora\n"
            "from impl.peft_integration import wrapper_orientation\n"
            f"o = wrapper_orientation(wrapper, 'default')  # {o.value}\n"
            f"lora = expert_lora([LoraSpec(lora_A, lora_B, {lora.scaling}, o.value, "
            f"{convention!r})], {lora.num_experts}, {lora.context.layout!r}, x.shape[1])\n"
            f"routing = route(expert_ids[:, None], {lora.num_experts})\n"
            f"delta = get_backend({backend!r}).lora_delta(x[routing.token_idx], lora, routing)  # rows in expert order",
            lora_A=lora.lora_A, lora_B=lora.lora_B, x=call.x, expert_ids=call.expert_ids,
        )  # fmt: skip
        try:
            factors = expert_lora([spec], lora.num_experts, lora.context.layout, call.x.shape[1])
        except _refusals() as exc:
            raise SubjectRefusal(f"{type(exc).__name__}: {exc}") from exc
        routing = route(call.expert_ids.reshape(-1, 1), lora.num_experts)
        delta = get_backend(backend).lora_delta(call.x[routing.token_idx], factors, routing)
        return torch.empty_like(delta).index_copy(0, routing.token_idx, delta)  # back to the caller's row order

    def merge_per_expert(self, call: PerExpertMergeCall) -> MergeResult:
        lora = next(iter(call.adapters.values()))
        merged, applied = self._merge(call.tensors, lora)
        self.record(
            "from impl.merge import merge_adapter\n"
            "merge_adapter(base_dir, adapter_dir, out_dir, method='merged_16bit', dtype=torch.float32)  # base_dir: "
            f"per-expert {sorted(call.tensors)[:3]}...; adapter_dir: save_pretrained (PEFT {lora.context.peft_version})",
            **{f"lora_{w}_{p}": getattr(lo, f"lora_{w}") for p, lo in call.adapters.items() for w in "AB"},
        )  # fmt: skip
        return MergeResult({k: merged[k] for k in call.tensors}, applied, 0)

    def merge_fused(self, call: FusedMergeCall) -> MergeResult:
        lora = call.lora
        path = lora.peft.module_path
        names = {lora.context.param: call.param, ("down" if lora.context.param == "gate_up" else "gate_up"): call.sibling}
        tensors = {f"{path}.{n}_proj": t for n, t in names.items()}
        merged, applied = self._merge(tensors, lora)
        key = f"{path}.{lora.context.param}_proj"
        self.record(
            "from impl.merge import merge_adapter\n"
            f"merge_adapter(base_dir, adapter_dir, out_dir, method='merged_16bit', dtype=torch.float32)  # base_dir: "
            f"fused {key} {tuple(call.param.shape)} (+ its sibling); adapter_dir: save_pretrained "
            f"(PEFT {lora.context.peft_version})",
            lora_A=lora.lora_A, lora_B=lora.lora_B,
        )  # fmt: skip
        return MergeResult({"param": merged[key]}, applied, 0)

    def fp8_dequant(self, call: FP8Call) -> torch.Tensor:
        from reference.fp8 import dequantize_fp8  # what impl.merge dequantizes FP8 checkpoint tensors with

        self.record(f"from reference.fp8 import dequantize_fp8\ndequantize_fp8(q, scale_inv, {call.block})",
                    q=call.q, scale_inv=call.scale_inv)  # fmt: skip
        try:
            return dequantize_fp8(call.q, call.scale_inv, call.block)
        except _refusals() as exc:
            raise SubjectRefusal(f"{type(exc).__name__}: {exc}") from exc

    def fp8_dequant_expert(self, call: FP8Call) -> torch.Tensor:
        from impl.storage import FP8Weight

        if call.block is None or call.scale_inv.ndim != 2:
            raise SubjectRefusal("impl.storage.FP8Weight stores block scales only (no per-row / per-tensor)")
        self.record(
            "from impl.storage import FP8Weight\n"
            f"FP8Weight(q[None], scale_inv[None], {call.block}).dequantize(torch.float32)[0]",
            q=call.q, scale_inv=call.scale_inv,
        )  # fmt: skip
        try:
            return FP8Weight(call.q[None], call.scale_inv[None], call.block).dequantize(torch.float32)[0]
        except _refusals() as exc:
            raise SubjectRefusal(f"{type(exc).__name__}: {exc}") from exc

    def fp8_requant(self, call: FP8RequantCall) -> tuple[torch.Tensor, torch.Tensor]:
        from reference.fp8 import requantize_fp8_block  # impl.merge's fp8 method requantizes through this

        ue8m0 = UE8M0 is not None and call.scale_dtype == UE8M0
        self.record(f"from reference.fp8 import requantize_fp8_block\nrequantize_fp8_block(w, {call.block}, "
                    f"ue8m0={ue8m0})", w=call.w)  # fmt: skip
        return requantize_fp8_block(call.w, call.block, ue8m0=ue8m0)

    def nf4_dequant(self, call: NF4Call) -> torch.Tensor:
        from impl.storage import NF4Weight

        self.record(
            "from impl.storage import NF4Weight\n"
            f"NF4Weight(w, blocksize={call.blocksize}).dequantize({call.dtype})",
            w=call.weight,
        )  # fmt: skip
        return NF4Weight(call.weight, blocksize=call.blocksize).dequantize(call.dtype)


def load(version: str | None = None) -> ImplSubject:
    if version not in (None, "", "checkout"):
        raise ValueError(f"the impl subject is this checkout; got version {version!r}")
    return ImplSubject()
