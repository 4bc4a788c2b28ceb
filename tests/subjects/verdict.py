"""Run one case against one subject and classify the outcome.

Order (issue 10): (1) the reference against the real upstream on the same input — if they disagree and no known
dependency bug applies, it is moe-compat's bug (``reference_bug``, the check fails); (2) a subject disagreement that
a known dependency bug explains (``dependency``, an expected failure with the link); (3) otherwise the subject
(``disagree``: a finding with a minimal reproduction, or a failure for a strict subject). A subject that refuses
loudly scores ``refused``; one that raises anything else scores ``crash`` (a disagreement).

Every side gets its own freshly built input (``case.build()``): a subject that writes into its arguments cannot change
what the reference saw.

Tolerances: LoRA/merge inputs are small integers (tests/subjects/cases.py `pat`), so every product and sum is exact
in fp32: a difference above ``1e-6 · max(1, max|want|)`` is a real disagreement (1e-6 leaves room only for fp32
rounding of non-integer intermediates). FP8 dequant may round once to the scale's own float dtype (bf16 / fp16:
``rtol = eps``); UE8M0 and fp32 scales are exact in fp32. FP8 requant is checked by its defining bound: dequantizing
the subject's codes with the subject's scales reproduces ``w`` within e4m3's half ulp (``2^-4·|w|``, subnormals
``2^-10·s``), the scales have the requested dtype and the ceil grid. The grouped-mm RHS must have ``w``'s shape and
values with ``stride(-2) == 1``. NF4 is bit-exact (the reference is bit-identical to bitsandbytes on CPU).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from harness.subjects.interface import Op, Subject, SubjectRefusal
from reference.fp8 import dequantize_fp8
from tests.subjects import dependency_bugs, oracles
from tests.subjects.cases import E4M3, PAT_SOURCE, Case, pat

STATUSES = ("agree", "refused", "skip", "disagree", "crash", "dependency", "reference_bug")
MAX_REPRO = 1500  # the report shows 1500 characters of a check's message


@dataclass
class Verdict:
    status: str
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    dependency: dependency_bugs.DependencyBug | None = None


# --- comparison --------------------------------------------------------------------------------------------------


def _as_f64(t) -> torch.Tensor:
    return t.detach().to(torch.float64) if isinstance(t, torch.Tensor) else t


def tensor_diff(got, want, rtol: float = 0.0) -> tuple[bool, float, str]:
    """(agree, max abs diff, why not) for tensors: same shape, ``|got - want| <= 1e-6·max(1, max|want|) + rtol·|want|``."""
    if not isinstance(got, torch.Tensor):
        return False, math.inf, f"got {type(got).__name__}, expected a tensor"
    if tuple(got.shape) != tuple(want.shape):
        return False, math.inf, f"shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    g, w = _as_f64(got), _as_f64(want)
    if not torch.isfinite(g).all():
        return False, math.inf, "non-finite values"
    err = (g - w).abs()
    bound = 1e-6 * max(1.0, float(w.abs().max()) if w.numel() else 1.0) + rtol * w.abs()
    diff = float(err.max()) if err.numel() else 0.0
    return bool((err <= bound).all()), diff, "" if bool((err <= bound).all()) else f"max |got - want| = {diff:.6g}"


def _dtype_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0


def compare(case: Case, call, got, want) -> tuple[bool, float, str]:
    op = case.op
    if op is Op.ORIENTATION:
        return got == want, 0.0 if got == want else 1.0, (f"decided {getattr(got, 'value', got)}, expected "
                                                           f"{want.value} (reference names: swapped = PEFT "
                                                           "_did_swap_in_out_features)")  # fmt: skip
    if op in (Op.MERGE_PER_EXPERT, Op.MERGE_FUSED):
        tensors = got.tensors if hasattr(got, "tensors") else got
        worst, why = 0.0, ""
        for k, w in want.items():
            if k not in tensors:
                return False, math.inf, f"missing {k}"
            ok, d, msg = tensor_diff(tensors[k], w)
            if not ok:
                return False, d, f"{k}: {msg}"
            worst = max(worst, d)
        return True, worst, why
    if op in (Op.FP8_DEQUANT, Op.FP8_DEQUANT_EXPERT):
        return tensor_diff(got, want, rtol=_dtype_eps(call.scale_inv.dtype))
    if op is Op.FP8_REQUANT:
        return requant_ok(call, got)
    if op is Op.GROUPED_MM_RHS:
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            return False, math.inf, f"shape {tuple(getattr(got, 'shape', ()))} != {tuple(want.shape)} (strides " \
                                    f"{tuple(got.stride()) if isinstance(got, torch.Tensor) else '-'})"
        if got.stride(-2) != 1:
            return False, 0.0, f"not column-major: strides {tuple(got.stride())} (need stride(-2) == 1)"
        return tensor_diff(got, want)
    return tensor_diff(got, want)


def requant_ok(call, got) -> tuple[bool, float, str]:
    if not (isinstance(got, tuple) and len(got) == 2):
        return False, math.inf, f"expected (codes, scale_inv), got {type(got).__name__}"
    q, s = got
    rows, cols = call.w.shape
    grid = (-(-rows // call.block[0]), -(-cols // call.block[1]))
    if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != tuple(call.w.shape):
        return False, math.inf, f"codes {q.dtype} {tuple(q.shape)}, expected float8_e4m3fn {tuple(call.w.shape)}"
    if s.dtype != call.scale_dtype or tuple(s.shape) != grid:
        return False, math.inf, f"scales {s.dtype} {tuple(s.shape)}, expected {call.scale_dtype} {grid}"
    deq = dequantize_fp8(q, s, call.block, dtype=torch.float64)
    w = call.w.to(torch.float64)
    s_full = (s.to(torch.float64).repeat_interleave(call.block[0], 0)[:rows]
              .repeat_interleave(call.block[1], 1)[:, :cols])  # fmt: skip
    bound = 2.0**-4 * w.abs() + 2.0**-10 * s_full + 1e-12
    err = (deq - w).abs()
    worst = float((err / bound).max())
    return bool((err <= bound).all()), float(err.max()), f"round trip error {float(err.max()):.4g} exceeds the e4m3 " \
                                                         f"half-ulp bound (worst ratio {worst:.3g})"


# --- reproductions -----------------------------------------------------------------------------------------------


def _literal(t: torch.Tensor) -> str:
    """A tensor as a Python expression: a `pat` formula when it is one (``pat(s, a)`` or ``pat(s, a) *
    exp2(pat(s, a + 1))``, the inputs tests/subjects/cases.py builds), else a literal of up to 64 values, else ``None``
    with its dtype, shape and sum in a comment (still valid Python)."""
    if t.numel() and (t.dtype.is_floating_point or t.dtype == E4M3):
        f = t.detach().to(torch.float32)
        shape = tuple(t.shape)
        cast = "" if t.dtype == torch.float32 else f".to({t.dtype})"
        for salt in range(64):
            p = pat(shape, salt)
            if torch.equal(f, p.to(t.dtype).to(torch.float32)):
                return f"pat({shape}, {salt}){cast}"
            q = p * torch.exp2(pat(shape, salt + 1))
            if torch.equal(f, q.to(t.dtype).to(torch.float32)):
                return f"(pat({shape}, {salt}) * torch.exp2(pat({shape}, {salt + 1}))){cast}"
    if t.numel() <= 64:
        vals = t.detach().to(torch.float32).tolist() if t.dtype.is_floating_point else t.tolist()
        text = re.sub(r"(?<![\d.])(-?\d+)\.0(?!\d)", r"\1", str(vals)).replace(" ", "")  # 4.0 -> 4: shorter, same value
        cast = f",dtype=torch.float32).to({t.dtype})" if t.dtype not in (torch.float32, torch.int64) else ")"
        if t.dtype == torch.float32:
            cast = ",dtype=torch.float32)"
        return f"torch.tensor({text}{cast}"
    return f"None  # {t.dtype} {tuple(t.shape)}, sum {float(t.double().sum()):.6g}: too large to print"


def reproduction(subject: Subject, key: str | None = None) -> str:
    """The subject's last recorded call (for a merge: the last one that produced ``key``) as Python."""
    if not subject.calls:
        return "(the adapter recorded no call)"
    call = next((c for c in reversed(subject.calls) if key is not None and key in c.keys), subject.calls[-1])
    lines = ["import math, torch", PAT_SOURCE]
    lines += [f"{name} = {_literal(t)}" for name, t in call.tensors.items() if isinstance(t, torch.Tensor)]
    lines.append(call.code)
    return "\n".join(lines)


def _short(v, n: int = 8) -> str:
    if isinstance(v, torch.Tensor):
        vals = [float(f"{x:.4g}") for x in v.detach().to(torch.float32).reshape(-1)[:n].tolist()]
        return f"{tuple(v.shape)} {vals}{' ...' if v.numel() > n else ''}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_short(x, n) for x in v) + ")"
    return str(getattr(v, "value", v))


def _mismatch_key(want, got) -> str | None:
    if not isinstance(want, dict):
        return None
    tensors = getattr(got, "tensors", got) if got is not None else None
    return next((k for k, w in want.items() if tensors is None or k not in tensors
                 or not tensor_diff(tensors[k], w)[0]), next(iter(want)))  # fmt: skip


def _shown(case: Case, want, got) -> str:
    """Expected vs got; for merges the delta (merged - base) of the first tensor that differs (the base from a fresh
    build: the subject may have written into its own copy)."""
    if isinstance(want, dict):
        tensors = getattr(got, "tensors", got) if got is not None else None
        fresh = case.build()
        base = fresh.tensors if hasattr(fresh, "tensors") else {"param": fresh.param}
        key = _mismatch_key(want, got)
        b = base[key].to(torch.float64)
        text = f"Expected (reference) delta of {key}: {_short(want[key] - b)}"
        if tensors is not None and key in tensors and isinstance(tensors[key], torch.Tensor):
            if tuple(tensors[key].shape) == tuple(b.shape):
                text += f"\nGot delta: {_short(tensors[key].to(torch.float64) - b)}"
            else:
                text += f"\nGot: {_short(tensors[key])}"
        return text
    text = f"Expected (reference): {_short(want)}"
    if got is not None:
        text += f"\nGot: {_short(got)}"
    return text


# --- run -----------------------------------------------------------------------------------------------------------

RESULTS: dict[tuple[int, str], Verdict] = {}  # (id(subject), case check name) -> verdict, filled by `run_case`


def cached(subject: Subject, case: Case) -> Verdict:
    """The verdict of an earlier `run_case` on the same subject object in this process, else a new run."""
    return RESULTS.get((id(subject), case.check_name)) or run_case(subject, case)



def run_case(subject: Subject, case: Case) -> Verdict:
    """`evaluate` and remember the verdict for later tests of this process (`cached`)."""
    v = evaluate(subject, case)
    RESULTS[(id(subject), case.check_name)] = v
    return v


def evaluate(subject: Subject, case: Case) -> Verdict:
    """Run ``case`` against ``subject`` and classify (nothing remembered: for deliberately altered subjects)."""
    if case.op not in subject.ops:
        return Verdict("skip", f"{subject.name} does not implement {case.op.value}: "
                               f"{subject.missing.get(case.op, 'not declared by its adapter')}")  # fmt: skip
    ref_call = case.build()
    want = oracles.reference(case, ref_call)
    deps = dependency_bugs.matching(case, ref_call)
    notes = []
    try:
        up = oracles.upstream(case, case.build())
    except oracles.UpstreamError as exc:
        if not deps:
            return Verdict("reference_bug", f"the upstream oracle raised on this input and no known dependency bug "
                                            f"explains it, so the reference cannot be confirmed: {exc}")  # fmt: skip
        notes.append(f"upstream raised ({deps[0].id}): {exc}")
        up = None
    if up is not None:
        ok, d, why = compare(case, ref_call, up, want)
        if not ok:
            if not deps:
                return Verdict("reference_bug", f"moe-compat's reference disagrees with the real upstream on "
                                                f"{case.op.value}/{case.name}: {why}; reference {_short(want)}, "
                                                f"upstream {_short(up)}", {"max_abs_diff": d})  # fmt: skip
            notes.append(f"upstream differs from the reference here ({deps[0].id}: {deps[0].reason})")
    call = case.build()
    subject.calls.clear()
    try:
        got = getattr(subject, case.op.value)(call)
    except SubjectRefusal as exc:
        return Verdict("refused", f"{subject.name} refused: {exc}", {"refused": 1.0})
    except Exception as exc:  # noqa: BLE001 - a crash of the subject is its answer; reported with the reproduction
        return _disagree(subject, case, call, "crash", f"raised {type(exc).__name__}: {exc}", math.inf, want, None,
                         notes)  # fmt: skip
    ok, d, why = compare(case, call, got, want)
    metrics = {"max_abs_diff": d if math.isfinite(d) else -1.0}
    if ok:
        return Verdict("agree", "; ".join(notes), metrics)
    for bug in deps:
        if bug.explains is not None and bug.explains(case, call, got):
            return Verdict("dependency", f"{bug.package} bug {bug.id}: {bug.reason} ({bug.link}); {why}", metrics,
                           bug)  # fmt: skip
    return _disagree(subject, case, call, "disagree", why, d, want, got, notes)


def _disagree(subject, case, call, status, why, d, want, got, notes) -> Verdict:
    """The finding's message: what differs, the reproduction, expected vs got, then context and notes, dropped in
    that reverse order when the message would exceed what the report shows (the reproduction is never cut)."""
    lora = getattr(call, "lora", None) or next(iter(getattr(call, "adapters", {}).values()), None)
    ctx = getattr(lora, "context", None) if lora is not None else getattr(call, "context", None)
    head = (f"{subject.name} {subject.version} disagrees with moe-compat's reference on {case.op.value} "
            f"[{case.name}]: {why}.")  # fmt: skip
    repro = f"\nReproduction:\n{reproduction(subject, _mismatch_key(want, got))}\n{_shown(case, want, got)}"
    extras = [f" Context: {ctx.describe()}." if ctx is not None else "", "\nNotes: " + "; ".join(notes) if notes else ""]
    while extras and len(head + extras[0] + repro + "".join(extras[1:])) > MAX_REPRO:
        extras.pop()
    text = head + (extras[0] if extras else "") + repro + "".join(extras[1:])
    if len(text) > MAX_REPRO:
        text = text[: MAX_REPRO - 40] + "\n... (truncated; rerun the case)"
    return Verdict(status, text, {"max_abs_diff": d if math.isfinite(d) else -1.0})
