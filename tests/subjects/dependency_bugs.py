"""Known bugs of the packages subjects (and the upstream oracles) depend on: data, with links.

A disagreement is blamed on a dependency only when an entry *applies* to the input and, for a subject's answer, the
entry *explains* it: recomputing the dependency's buggy output reproduces what the subject returned. Otherwise the
subject is blamed (a ``finding_subject_*``). Each entry is also pinned where it lives: bitsandbytes' in
tests/oracles/test_bnb_nf4.py (strict xfails), PEFT's E == 1 in tests/oracles/test_peft_paramwrapper.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.subjects.interface import Op
from tests.subjects.cases import Case


@dataclass(frozen=True)
class DependencyBug:
    id: str
    package: str
    reason: str
    link: str
    applies: Callable[[Case, object], bool]
    explains: Callable[[Case, object, object], bool] | None = None  # (case, call, value) -> value is the bug's output


def _bnb_avx512_applies(case: Case, call) -> bool:
    """bitsandbytes 0.50.2's native CPU dequantize_4bit with AVX-512F indexes absmax per row when the last dim n is a
    multiple of 16 but not of the blocksize and there are several rows (the condition is the oracle's own)."""
    from tests.oracles.test_bnb_nf4 import avx512_misreads

    return case.op is Op.NF4_DEQUANT and avx512_misreads(tuple(call.weight.shape), call.blocksize)


def _bnb_shaped_dequant(case: Case, call, value) -> bool:
    """The value equals bitsandbytes' own dequant of the same weight quantized with its N-D shape."""
    import bitsandbytes.functional as bnbf

    packed, qs = bnbf.quantize_4bit(call.weight, blocksize=call.blocksize, quant_type="nf4")
    bug = bnbf.dequantize_4bit(packed, qs).reshape(call.weight.shape).to(call.dtype)
    return isinstance(value, torch.Tensor) and value.shape == bug.shape and torch.equal(value.to(bug.dtype), bug)


def _peft_e1_applies(case: Case, call) -> bool:
    """PEFT ParamWrapper, E == 1, not swapped: get_delta_weight takes the 2-D Linear path and returns s·B A [d2, d1]
    (the transpose of the 3-D formula's s·(B A)ᵀ [d1, d2]); merge_and_unload fails or adds it transposed."""
    if case.op not in (Op.LORA_FORWARD, Op.MERGE_PER_EXPERT, Op.MERGE_FUSED) or case.tags.get("E") != 1:
        return False
    lora = getattr(call, "lora", None) or next(iter(call.adapters.values()))
    return not getattr(lora.peft.wrappers["gate_up_proj"], "_did_swap_in_out_features", False)


DEPENDENCY_BUGS = (
    DependencyBug(
        "bnb_avx512_dequant_absmax",
        "bitsandbytes",
        "bitsandbytes 0.50.2 CPU dequantize_4bit on AVX-512F reads absmax per row when rows split blocks "
        "(last dim % 16 == 0, % blocksize != 0, > 1 row)",
        "https://github.com/bitsandbytes-foundation/bitsandbytes/blob/main/csrc/cpu_ops.cpp",
        _bnb_avx512_applies,
        _bnb_shaped_dequant,
    ),
    DependencyBug(
        "peft_e1_unswapped_delta",
        "peft",
        "PEFT ParamWrapper with E == 1 and no swap: get_delta_weight returns the 2-D s·B A (transposed) delta",
        "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py",
        _peft_e1_applies,
    ),
)


def matching(case: Case, call) -> list[DependencyBug]:
    return [b for b in DEPENDENCY_BUGS if b.applies(case, call)]
