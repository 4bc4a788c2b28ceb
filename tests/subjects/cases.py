"""The subject checks' inputs: one `Case` per (operation, edge case), built fresh for every call.

Edge cases are the reference tests' `@example` pins (tests/reference/test_lora.py, test_merge.py, test_fp8.py,
test_nf4.py): 2I == H (gate_up square), I == H (down square), E == 1, r == 1, experts without rows, both PEFT
orientations (whichever the cell's PEFT produces for each family: Qwen3-MoE ``[E, out, in]`` with
``is_transposed=False``, GPT-OSS ``[E, in, out]`` with ``is_transposed=True``), FP8 partial blocks, UE8M0 and bf16
scales, per-row scales, NF4 rows that do not hold whole blocks. The LoRA cases are real PEFT adapters: the cell's
``peft.get_peft_model`` on a real transformers experts module at ``model.layers.0.mlp.experts`` targeting both
``gate_up_proj`` and ``down_proj`` (gate_up is the inner wrapper, as in every released PEFT).

Every tensor is `pat(shape, salt)`: small integers (-3..3), exact in every float dtype, so sums and products in fp32
are exact and a reproduction can print the formula instead of the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.subjects.interface import (
    Context,
    ForwardCall,
    FP8Call,
    FP8RequantCall,
    FusedMergeCall,
    LoraInput,
    NF4Call,
    Op,
    PeftObjects,
    PerExpertMergeCall,
    RhsCall,
)
from reference.fp8 import UE8M0_DTYPE
from reference.layout import FUSED_LINEAR, GPT_OSS
from reference.lora import CONTIGUOUS_R, STRIDE_E

MODULE_PATH = "model.layers.0.mlp.experts"
PREFIX = "model.layers.0.mlp."
FAMILIES = {"qwen3_moe": FUSED_LINEAR, "gpt_oss": GPT_OSS}
# name -> (E, H, I, r). Dims tiny so a reproduction fits in an issue; E = 3 so expert 1 can get no rows.
SHAPES = {
    "nonsquare": (3, 4, 3, 2),
    "2i_eq_h": (3, 4, 2, 2),  # gate_up square (fused_linear [E, 2I, H], gpt_oss [E, H, 2I])
    "i_eq_h": (3, 3, 3, 2),  # down square
    "e1": (1, 4, 3, 2),  # a single expert
    "r1_2i_eq_h": (3, 4, 2, 1),  # rank 1 (both lora_B conventions coincide) on the square gate_up
}
PARAMS = ("gate_up", "down")
SCALING = 2.0  # lora_alpha = 2r: exact


def pat(shape, salt: int) -> torch.Tensor:
    """Deterministic small integers -3..3 (fp32): ``(3i² + 5i + salt) mod 7 - 3`` over the flat index i."""
    i = torch.arange(math.prod(shape), dtype=torch.int64)
    return ((i * i * 3 + i * 5 + salt) % 7 - 3).to(torch.float32).reshape(shape)


PAT_SOURCE = (
    "def pat(shape, salt):  # small integers -3..3, exact in every float dtype\n"
    "    i = torch.arange(math.prod(shape))\n"
    "    return ((i * i * 3 + i * 5 + salt) % 7 - 3).float().reshape(shape)"
)


@dataclass(frozen=True)
class Case:
    """One check input: ``build()`` returns a fresh call object (a new PEFT model each time, so a subject that
    writes into its inputs cannot change what the reference or the next call sees)."""

    op: Op
    name: str
    build: Callable[[], Any] = field(compare=False, repr=False)
    tags: dict = field(default_factory=dict, compare=False)

    @property
    def check_name(self) -> str:
        return f"finding_subject_{self.op.value}_{self.name}"

    @property
    def dims(self) -> str:
        """The sizes, for the report's variant column (``E3 H4 I2 r2``, ``6x10 block (4, 4)``)."""
        t = self.tags
        if "E" in t:
            return f"E{t['E']} H{t['H']} I{t['I']} r{t['r']}"
        return t.get("dims", "")


# --- real PEFT adapters ----------------------------------------------------------------------------------------


def _experts(family: str, E: int, H: int, I: int) -> torch.nn.Module:
    import transformers

    if family == "qwen3_moe":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m

        cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=1)
        mod = m.Qwen3MoeExperts(cfg)
    else:
        from transformers.models.gpt_oss import modeling_gpt_oss as m

        cfg = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=1)
        mod = m.GptOssExperts(cfg)
    with torch.no_grad():
        for salt, (_, p) in enumerate(sorted(mod.named_parameters())):
            p.copy_(pat(p.shape, 40 + salt))
    return mod


class _Root(torch.nn.Module):
    """``model.layers[0].mlp.experts``: the module path of a real checkpoint (PEFT refuses a root-level target)."""

    def __init__(self, experts: torch.nn.Module):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.layers[0].mlp = torch.nn.Module()
        self.model.layers[0].mlp.experts = experts


def peft_objects(family: str, shape: str) -> PeftObjects:
    """``get_peft_model`` (the installed PEFT) over a fresh experts module; lora_A/lora_B set to `pat` values."""
    import peft

    E, H, I, r = SHAPES[shape]
    experts = _experts(family, E, H, I)
    cfg = peft.LoraConfig(r=r, lora_alpha=SCALING * r,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    model = peft.get_peft_model(_Root(experts), cfg)
    wrappers = {}
    for mod in model.modules():
        if isinstance(mod, peft.tuners.lora.ParamWrapper):
            wrappers[mod.parameter_name] = mod
            salt = 1 if mod.parameter_name == "gate_up_proj" else 3
            with torch.no_grad():
                mod.lora_A["default"].weight.copy_(pat(mod.lora_A["default"].weight.shape, salt))
                mod.lora_B["default"].weight.copy_(pat(mod.lora_B["default"].weight.shape, salt + 1))
    if set(wrappers) != {"gate_up_proj", "down_proj"}:
        raise AssertionError(f"PEFT {peft.__version__} wrapped {sorted(wrappers)}, expected gate_up_proj and down_proj")
    return PeftObjects(model, experts, wrappers, MODULE_PATH)


def lora_input(objs: PeftObjects, family: str, param: str, convention: str = STRIDE_E) -> LoraInput:
    """The adapter of ``param``; with ``convention=CONTIGUOUS_R`` its lora_B is re-packed in place (the wrapper then
    holds what an adapter trained by unsloth-zoo < 2026.9.6 holds: the same ΔW, other column order)."""
    import peft
    import transformers

    w = objs.wrappers[f"{param}_proj"]
    if convention != STRIDE_E:
        A, B = w.lora_A["default"].weight.detach(), w.lora_B["default"].weight.detach()
        _, B2 = expert_factors_to(A, B, int(w.num_experts), convention)
        with torch.no_grad():
            w.lora_B["default"].weight.copy_(B2)
    other = "down" if param == "gate_up" else "gate_up"
    ctx = Context(
        family=family,
        layout=FAMILIES[family],
        param=param,
        param_shape=tuple(getattr(objs.experts, f"{param}_proj").shape),
        sibling_shape=tuple(getattr(objs.experts, f"{other}_proj").shape),
        peft_version=peft.__version__,
        transformers_version=transformers.__version__,
        did_swap=getattr(w, "_did_swap_in_out_features", None),
        is_transposed=getattr(objs.experts, "is_transposed", None),
        lora_B_convention=convention,
    )
    return LoraInput(w.lora_A["default"].weight.detach(), w.lora_B["default"].weight.detach(),
                     float(w.scaling["default"]), int(w.num_experts), ctx, objs)  # fmt: skip


def expert_factors_to(A: torch.Tensor, B: torch.Tensor, E: int, convention: str):
    """``(lora_A, lora_B)`` with lora_B's columns re-packed from stride-E into ``convention`` (same ΔW)."""
    from reference.lora import expert_factors, pack_factors

    Ae, Be = expert_factors(A, B, E, STRIDE_E)
    return pack_factors(Ae, Be, convention)


def _ids(E: int, S: int = 5) -> torch.Tensor:
    """Sorted expert ids of S rows; with E >= 3 expert 1 gets no rows (and E-1 gets the most)."""
    if E == 1:
        return torch.zeros(S, dtype=torch.int64)
    if E == 2:
        return torch.tensor([0, 0, 1, 1, 1][:S])
    return torch.tensor([0, 0] + [E - 1] * (S - 2))


def _in_dim(lora: LoraInput) -> int:
    _, d1, d2 = lora.context.param_shape
    return d1 if lora.context.layout == GPT_OSS else d2


def forward_call(family: str, shape: str, param: str, convention: str = STRIDE_E) -> ForwardCall:
    lora = lora_input(peft_objects(family, shape), family, param, convention)
    ids = _ids(lora.num_experts)
    return ForwardCall(lora, pat((ids.numel(), _in_dim(lora)), 7), ids)


def per_expert_call(family: str, shape: str, convention: str = STRIDE_E) -> PerExpertMergeCall:
    objs = peft_objects(family, shape)
    E, H, I, _ = SHAPES[shape]
    tensors = {}
    for e in range(E):
        tensors[f"{MODULE_PATH}.{e}.gate_proj.weight"] = pat((I, H), 10 + e)
        tensors[f"{MODULE_PATH}.{e}.up_proj.weight"] = pat((I, H), 20 + e)
        tensors[f"{MODULE_PATH}.{e}.down_proj.weight"] = pat((H, I), 30 + e)
    adapters = {p: lora_input(objs, family, p, convention) for p in PARAMS}
    return PerExpertMergeCall(tensors, adapters, E, PREFIX)


def fused_call(family: str, shape: str, param: str, convention: str = STRIDE_E) -> FusedMergeCall:
    objs = peft_objects(family, shape)
    lora = lora_input(objs, family, param, convention)
    other = "down" if param == "gate_up" else "gate_up"
    p = getattr(objs.experts, f"{param}_proj").detach().clone()
    s = getattr(objs.experts, f"{other}_proj").detach().clone()
    return FusedMergeCall(p, s, lora)


# --- FP8 / NF4 / layout inputs ---------------------------------------------------------------------------------

E4M3 = torch.float8_e4m3fn


def _codes(shape, salt) -> torch.Tensor:
    """e4m3 codes of mixed magnitudes (-3..3 times powers of two), exact in e4m3."""
    return (pat(shape, salt) * torch.exp2(pat(shape, salt + 1))).to(E4M3)


def _grid(rows: int, cols: int, block) -> tuple[int, int]:
    return -(-rows // block[0]), -(-cols // block[1])


def fp8_call(kind: str) -> FP8Call:
    """Scales are dequant multipliers (``weight_scale_inv``), deliberately != 1 and not powers of two (except UE8M0)."""
    if kind == "per_row":
        q = _codes((6, 8), 2)
        return FP8Call(q, (pat((6, 1), 5).abs() + 1) * 0.375, None)
    rows, cols, block = {"full_blocks": (8, 8, (4, 4)), "partial_blocks": (6, 10, (4, 4)),
                         "ue8m0": (8, 8, (4, 4)), "bf16_scale": (8, 8, (4, 4))}[kind]  # fmt: skip
    q = _codes((rows, cols), 2)
    gr, gc = _grid(rows, cols, block)
    s = (pat((gr, gc), 5).abs() + 1) * 0.375
    if kind == "ue8m0":
        if UE8M0_DTYPE is None:
            raise RuntimeError(f"torch {torch.__version__} has no float8_e8m0fnu")
        s = torch.exp2(pat((gr, gc), 5)).to(UE8M0_DTYPE)
    elif kind == "bf16_scale":
        s = s.to(torch.bfloat16)
    return FP8Call(q, s, block)


def fp8_requant_call(kind: str) -> FP8RequantCall:
    shape = (6, 10) if kind == "partial_blocks" else (8, 8)
    w = pat(shape, 9) * torch.exp2(pat(shape, 10))
    if kind == "zero_block":
        w[:4, :4] = 0
    dtype = UE8M0_DTYPE if kind == "ue8m0" else torch.float32
    return FP8RequantCall(w, (4, 4), dtype)


def rhs_call(kind: str) -> RhsCall:
    shape = {"k_ne_n": (2, 3, 5), "square": (2, 4, 4)}[kind]
    return RhsCall(pat(shape, 6))


def nf4_call(kind: str) -> NF4Call:
    shape = {"aligned": (2, 4, 64), "rows_split_blocks": (2, 3, 32), "odd_last_dim": (2, 3, 33)}[kind]
    # block b of the flattened weight is scaled by 2^-b: every 64-block has its own absmax (a uniform absmax would hide
    # a kernel that reads another block's absmax)
    block = torch.arange(math.prod(shape)).reshape(shape) // 64
    return NF4Call(pat(shape, 8) * 0.1 * torch.exp2(-block.float()), 64, torch.float32)


# --- the catalogue -----------------------------------------------------------------------------------------------


def _lora_tags(family, shape, param=None) -> dict:
    E, H, I, r = SHAPES[shape]
    return {"family": family, "shape": shape, "param": param, "E": E, "H": H, "I": I, "r": r}


def all_cases() -> list[Case]:
    cases = []
    for shape in SHAPES:
        for param in PARAMS:
            cases.append(Case(Op.ORIENTATION, f"qwen3_moe_{param}_{shape}",
                              lambda s=shape, p=param: lora_input(peft_objects("qwen3_moe", s), "qwen3_moe", p),
                              _lora_tags("qwen3_moe", shape, param)))  # fmt: skip
    for shape in SHAPES:
        cases.append(Case(Op.MERGE_PER_EXPERT, f"qwen3_moe_{shape}", lambda s=shape: per_expert_call("qwen3_moe", s),
                          _lora_tags("qwen3_moe", shape)))  # fmt: skip
    for op, builder in ((Op.LORA_FORWARD, forward_call), (Op.MERGE_FUSED, fused_call)):
        for family in FAMILIES:
            for shape in SHAPES:
                for param in PARAMS:
                    cases.append(Case(op, f"{family}_{param}_{shape}",
                                      lambda b=builder, f=family, s=shape, p=param: b(f, s, p),
                                      _lora_tags(family, shape, param)))  # fmt: skip
    # adapters packed contiguous-r (trained by unsloth-zoo < 2026.9.6): a reader must be told, and then read them so
    cr = "nonsquare"
    cases.append(Case(Op.LORA_FORWARD, f"qwen3_moe_gate_up_{cr}_contiguous_r",
                      lambda: forward_call("qwen3_moe", cr, "gate_up", CONTIGUOUS_R),
                      _lora_tags("qwen3_moe", cr, "gate_up")))  # fmt: skip
    cases.append(Case(Op.MERGE_PER_EXPERT, f"qwen3_moe_{cr}_contiguous_r",
                      lambda: per_expert_call("qwen3_moe", cr, CONTIGUOUS_R), _lora_tags("qwen3_moe", cr)))  # fmt: skip
    cases.append(Case(Op.MERGE_FUSED, f"gpt_oss_gate_up_{cr}_contiguous_r",
                      lambda: fused_call("gpt_oss", cr, "gate_up", CONTIGUOUS_R),
                      _lora_tags("gpt_oss", cr, "gate_up")))  # fmt: skip
    for kind in ("full_blocks", "partial_blocks", "per_row", "bf16_scale", "ue8m0"):
        cases.append(_plain(Op.FP8_DEQUANT, kind, fp8_call))
    for kind in ("full_blocks", "partial_blocks", "per_row", "ue8m0"):
        cases.append(_plain(Op.FP8_DEQUANT_EXPERT, kind, fp8_call))
    for kind in ("full_blocks", "partial_blocks", "zero_block", "ue8m0"):
        cases.append(_plain(Op.FP8_REQUANT, kind, fp8_requant_call))
    for kind in ("k_ne_n", "square"):
        cases.append(_plain(Op.GROUPED_MM_RHS, kind, rhs_call))
    for kind in ("aligned", "rows_split_blocks", "odd_last_dim"):
        cases.append(_plain(Op.NF4_DEQUANT, kind, nf4_call))
    return cases


def _plain(op: Op, kind: str, builder) -> Case:
    call = builder(kind)
    t = getattr(call, "q", None)
    t = t if t is not None else getattr(call, "w", None) if getattr(call, "w", None) is not None else call.weight
    dims = "x".join(map(str, t.shape))
    block = getattr(call, "block", None) or getattr(call, "blocksize", None)
    return Case(op, kind, lambda: builder(kind), {"kind": kind, "dims": dims + (f" block {block}" if block else "")})
