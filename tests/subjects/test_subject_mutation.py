"""The subject checks catch a deliberately broken copy of a subject, and flag exactly the broken operation.

- impl (runs everywhere, CI included; no download): subclasses of impl's adapter with one operation changed the way
  real bugs look (lora_B read contiguous-r in the forward; ``weight_scale_inv`` divided instead of multiplied).
- unsloth-zoo (runs in the subject cells, ``nox -s subject``, where the wheel is present): one line of
  ``_fp8_requant_blockwise`` in the loaded ``moe_utils_fp8`` is changed (``W_blocks / scale_inv`` ->
  ``W_blocks * scale_inv``) and re-executed in the module's namespace; only the FP8 requant cases may change verdict.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from harness.subjects import registry  # noqa: E402
from harness.subjects.impl_subject import ImplSubject  # noqa: E402
from harness.subjects.interface import FP8Call, Op  # noqa: E402
from tests.subjects.cases import all_cases  # noqa: E402
from tests.subjects.verdict import cached, evaluate  # noqa: E402

pytestmark = pytest.mark.upstream
FLAGGED = ("disagree", "crash")


class ContiguousRForward(ImplSubject):
    """impl with one bug: the LoRA forward reads lora_B's columns contiguous-r (unsloth-zoo before 2026.9.6)."""

    def lora_B_convention(self, lora) -> str:
        from reference.lora import CONTIGUOUS_R

        return CONTIGUOUS_R


class ReciprocalScale(ImplSubject):
    """impl with one bug: the forward's FP8 dequant divides by weight_scale_inv (unsloth-zoo before 2026.9.8)."""

    def fp8_dequant_expert(self, call: FP8Call) -> torch.Tensor:
        inv = FP8Call(call.q, call.scale_inv.to(torch.float32).reciprocal(), call.block)
        return super().fp8_dequant_expert(inv)


def _flagged(subject) -> dict[Op, list[str]]:
    out: dict[Op, list[str]] = {}
    for case in all_cases():
        if evaluate(subject, case).status in FLAGGED:
            out.setdefault(case.op, []).append(case.name)
    return out


@pytest.mark.parametrize(("broken", "op"), [(ContiguousRForward, Op.LORA_FORWARD),
                                             (ReciprocalScale, Op.FP8_DEQUANT_EXPERT)],
                         ids=["contiguous_r_forward", "reciprocal_scale"])  # fmt: skip
def test_broken_impl_copy_is_flagged_on_exactly_that_op(broken, op):
    flagged = _flagged(broken())
    assert set(flagged) == {op}, flagged
    if op is Op.LORA_FORWARD:  # contiguous-r == stride-E exactly when E == 1 or r == 1
        assert all(not n.endswith(("_e1", "_r1_2i_eq_h")) for n in flagged[op]), flagged
        assert len(flagged[op]) == 2 * 2 * 3, flagged  # 2 families x 2 params x 3 shapes with E, r > 1


def test_mutated_unsloth_zoo_copy_is_flagged_on_exactly_that_op():
    spec = registry.current_spec()
    if spec.name != "unsloth_zoo":
        pytest.skip(f"the unsloth-zoo copy is mutated in the subject cells (nox -s subject); this process checks {spec}")
    subject = registry.load()
    cases = all_cases()
    before = {c: cached(subject, c).status for c in cases}  # the subject checks ran them in this process
    mf = subject.mf
    original = mf._fp8_requant_blockwise
    src = inspect.getsource(original)
    assert src.count("W_blocks / scale_inv") == 1, "the mutated line is not in this release"
    namespace = mf.__dict__
    exec(compile(src.replace("W_blocks / scale_inv", "W_blocks * scale_inv"), mf.__file__, "exec"), namespace)
    try:
        after = {c: evaluate(subject, c).status for c in cases}  # not cached: later tests read the real verdicts
    finally:
        namespace["_fp8_requant_blockwise"] = original
    changed = {c.op for c in cases if before[c] != after[c]}
    newly_flagged = {c.op for c in cases if after[c] in FLAGGED and before[c] not in FLAGGED}
    assert changed == newly_flagged == {Op.FP8_REQUANT}, (changed, newly_flagged)
