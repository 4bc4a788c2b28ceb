"""The subject interface: what an implementation under test declares and how each operation is called.

A *subject* is someone else's implementation of the MoE LoRA operations that moe-compat's reference specifies (a
trainer's forward, a merge tool, a serving engine's adapter reader). An adapter (one file per subject, e.g.
`harness.subjects.unsloth_zoo`) subclasses `Subject`, lists the `Op` s it implements in ``ops`` and maps each call
onto the subject's own functions, reproducing the call site the real code has.

Every call carries the context the real call site would see (`Context`: family/layout, the sibling shape, the on-disk
format, the PEFT and transformers versions, PEFT's swap flag and the experts module's ``is_transposed``, each possibly
absent) and the real PEFT objects the factors came from (`PeftObjects`), so an adapter can pass the object that
carries a flag in the subject's code (the experts module, the inner or outer ``ParamWrapper``) rather than the value.

Conventions are the reference's (`reference.layout`, `reference.lora`): ``P [E, d1, d2]``, ``lora_A [r·E, a]``,
``lora_B [b, r·E]``; orientation STANDARD (``a = d1``) / SWAPPED (``a = d2``); per-expert tensors on disk
``gate/up [I, H]``, ``down [H, I]``.

Scoring: an adapter raises `SubjectRefusal` when the subject refused loudly (a named error, an "unknown layout"
answer, a merge that reports refused/fallback counts). A refusal is scored ``refused``, never as a wrong answer.
Any other exception escaping an adapter is a crash of the subject (scored as a disagreement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from reference.layout import Orientation

if TYPE_CHECKING:  # annotations only: the matrix runner imports this module and should not pay for torch
    import torch


class Op(StrEnum):
    """Operations a subject may implement (each maps onto one reference function; see tests/subjects/oracles.py)."""

    ORIENTATION = "orientation"  # merge-time orientation decision of a 3-D expert adapter -> Orientation
    LORA_FORWARD = "lora_forward"  # per-expert LoRA forward delta of rows x routed to experts -> [S, out]
    MERGE_PER_EXPERT = "merge_per_expert"  # adapter on fused gate_up/down into per-expert disk tensors (16-bit)
    MERGE_FUSED = "merge_fused"  # adapter into a fused 3-D disk tensor (GPT-OSS / Gemma4 style), 16-bit
    FP8_DEQUANT = "fp8_dequant"  # block FP8 dequant of a 2-D e4m3 weight (merge path) -> fp32
    FP8_DEQUANT_EXPERT = "fp8_dequant_expert"  # one expert's e4m3 weight with its weight_scale_inv (forward path)
    FP8_REQUANT = "fp8_requant"  # block FP8 requant of a 16/32-bit weight -> (e4m3 codes, scale_inv)
    GROUPED_MM_RHS = "grouped_mm_rhs"  # the right-hand side of a (scaled) grouped mm: same shape, column-major
    NF4_DEQUANT = "nf4_dequant"  # a bitsandbytes NF4 expert stack -> dense [E, d1, d2]


class SubjectRefusal(Exception):
    """The subject refused the call loudly (named error, unknown-layout answer, refused merge counts)."""


class SubjectLoadError(RuntimeError):
    """A subject could not be fetched, unpacked or imported; the message names the spec, the file and the cause."""


@dataclass(frozen=True)
class Context:
    """What the real call site knows, each field None when absent there.

    family: the transformers experts family the adapter was trained on ("qwen3_moe", "gpt_oss").
    layout: `reference.layout` FUSED_LINEAR (``[E, out, in]``) or GPT_OSS (``[E, in, out]``).
    param: "gate_up" or "down"; param_shape / sibling_shape: the fused 3-D shapes of this param and the other one.
    disk_format: "per_expert" (``experts.{e}.{gate,up,down}_proj.weight``) or "fused" (``experts.gate_up_proj``).
    peft_version / transformers_version: installed when the adapter was built.
    did_swap: ``_did_swap_in_out_features`` of the wrapper that owns the adapter (None: the attribute is absent, PEFT
    < 0.19). is_transposed: the experts module's attribute (None: absent).
    lora_B_convention: how lora_B's columns are packed per expert: ``stride_e`` (PEFT's; every adapter PEFT trains)
    or ``contiguous_r`` (adapters trained by unsloth-zoo before 2026.9.6); `reference.lora` names both.
    """

    family: str | None = None
    layout: str | None = None
    param: str | None = None
    param_shape: tuple[int, int, int] | None = None
    sibling_shape: tuple[int, int, int] | None = None
    disk_format: str | None = None
    peft_version: str | None = None
    transformers_version: str | None = None
    did_swap: bool | None = None
    is_transposed: bool | None = None
    lora_B_convention: str = "stride_e"

    def describe(self) -> str:
        keys = ("family", "layout", "param", "param_shape", "sibling_shape", "disk_format", "peft_version",
                "transformers_version", "did_swap", "is_transposed", "lora_B_convention")  # fmt: skip
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys if getattr(self, k) is not None)


@dataclass
class PeftObjects:
    """The real PEFT objects an adapter came from: built by the cell's own PEFT with ``get_peft_model``.

    model: the PeftModel; experts: the transformers experts module (innermost base layer); wrappers: parameter name
    (``gate_up_proj`` / ``down_proj``) -> its ``lora.ParamWrapper`` (the first targeted parameter is the inner one);
    module_path: the experts module's path inside the base model (``model.layers.0.mlp.experts``).
    """

    model: Any
    experts: torch.nn.Module
    wrappers: dict[str, Any]
    module_path: str


@dataclass
class LoraInput:
    """One PEFT adapter on one fused 3-D expert param: factors, scaling, expert count, context, real objects."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    num_experts: int
    context: Context
    peft: PeftObjects | None = None


@dataclass
class ForwardCall:
    """LoRA forward delta: rows ``x [S, in]`` routed to ``expert_ids [S]`` (sorted; some experts may get none)."""

    lora: LoraInput
    x: torch.Tensor
    expert_ids: torch.Tensor


@dataclass
class PerExpertMergeCall:
    """Merge adapters trained on the fused params into per-expert disk tensors.

    tensors: ``{prefix}experts.{e}.{gate_proj,up_proj,down_proj}.weight`` (scheme gate_up_down); adapters:
    ``{"gate_up": LoraInput, "down": LoraInput}`` (either may be absent); prefix e.g. ``model.layers.0.mlp.``.
    """

    tensors: dict[str, torch.Tensor]
    adapters: dict[str, LoraInput]
    num_experts: int
    prefix: str


@dataclass
class FusedMergeCall:
    """Merge one adapter into its fused 3-D disk tensor ``param [E, d1, d2]``; ``sibling`` is the other fused param
    of the same experts module on disk (real call sites read layout hints from the shard header)."""

    param: torch.Tensor
    sibling: torch.Tensor
    lora: LoraInput


@dataclass
class FP8Call:
    """FP8 e4m3 weight ``q [R, C]`` with its dequant multiplier ``scale_inv`` (fp32/bf16/UE8M0; block grid, per-row
    ``[R, 1]`` or per-tensor) and the block ``(bm, bn)`` (None: per-row / per-tensor)."""

    q: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int] | None


@dataclass
class FP8RequantCall:
    """Requantize ``w [R, C]`` in blocks ``block`` with scales of ``scale_dtype`` (fp32 or float8_e8m0fnu)."""

    w: torch.Tensor
    block: tuple[int, int]
    scale_dtype: torch.dtype


@dataclass
class RhsCall:
    """A grouped-mm right-hand side ``w [E, K, N]`` in grouped-mm layout (row-major contiguous)."""

    w: torch.Tensor


@dataclass
class NF4Call:
    """A whole expert stack ``weight [E, d1, d2]`` to quantize to NF4 (blocks of ``blocksize`` consecutive elements
    of the flattened tensor, no double quant) the way the subject stores experts, then dequantize to ``dtype``."""

    weight: torch.Tensor
    blocksize: int
    dtype: torch.dtype


@dataclass
class MergeResult:
    """A merge's output tensors (same keys as given) and its own accounting: deltas applied / refused."""

    tensors: dict[str, torch.Tensor]
    applied: int
    refused: int
    reasons: list[str] = field(default_factory=list)


@dataclass
class Call:
    """The exact call an adapter made, as Python a maintainer can paste into an issue (``code``), plus the names
    bound to tensors the code refers to (printed as literals or formulas by the verdict)."""

    code: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # merge outputs this call produced (empty: the whole result)


class Subject:
    """Base class of subject adapters.

    name / version: as installed (``unsloth_zoo``, ``2026.10.9``); source: how it was obtained (wheel path, git,
    "this checkout"); strict: disagreements fail the check (own code) instead of being recorded as findings
    (someone else's released code); ops: the operations implemented (others are skipped with the reason in
    ``missing``).

    Each op method takes its call object and returns the result; it appends the exact call it made to
    ``self.calls`` (the verdict prints the last one as the reproduction) and raises `SubjectRefusal` on a loud refusal.
    """

    name: str = "subject"
    version: str = ""
    source: str = ""
    strict: bool = False
    ops: frozenset[Op] = frozenset()
    missing: dict[Op, str] = {}

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def record(self, code: str, *, keys: tuple[str, ...] = (), **tensors: torch.Tensor) -> None:
        self.calls.append(Call(code, dict(tensors), tuple(keys)))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "source": self.source, "strict": self.strict,
                "ops": sorted(self.ops), "missing": {str(k): v for k, v in self.missing.items()}}

    # One method per Op; the base raises so an undeclared op can never silently pass.
    def orientation(self, lora: LoraInput) -> Orientation:
        raise NotImplementedError(f"{self.name} does not implement {Op.ORIENTATION}")

    def lora_forward(self, call: ForwardCall) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not implement {Op.LORA_FORWARD}")

    def merge_per_expert(self, call: PerExpertMergeCall) -> MergeResult:
        raise NotImplementedError(f"{self.name} does not implement {Op.MERGE_PER_EXPERT}")

    def merge_fused(self, call: FusedMergeCall) -> MergeResult:
        raise NotImplementedError(f"{self.name} does not implement {Op.MERGE_FUSED}")

    def fp8_dequant(self, call: FP8Call) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not implement {Op.FP8_DEQUANT}")

    def fp8_dequant_expert(self, call: FP8Call) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not implement {Op.FP8_DEQUANT_EXPERT}")

    def fp8_requant(self, call: FP8RequantCall) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{self.name} does not implement {Op.FP8_REQUANT}")

    def grouped_mm_rhs(self, call: RhsCall) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not implement {Op.GROUPED_MM_RHS}")

    def nf4_dequant(self, call: NF4Call) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not implement {Op.NF4_DEQUANT}")


OP_METHOD = {op: op.value for op in Op}
