"""Orientation of PEFT LoRA factors on 3-D expert parameters, and PEFT's per-version swap rule.

A 3-D expert parameter is ``P [E, d1, d2]``. PEFT's ``ParamWrapper`` stores ``lora_A.weight [r·E, a]`` and
``lora_B.weight [b, r·E]``. The orientation is named after PEFT's ``_did_swap_in_out_features``:

- ``standard`` (not swapped): ``a = d1``, ``b = d2``, ``ΔW[e] = s·(B_e A_e)ᵀ``;
- ``swapped``: ``a = d2``, ``b = d1``, ``ΔW[e] = s·B_e A_e``.

When ``d1 == d2`` (``2I == H`` for gate_up, ``I == H`` for down) both orientations give valid shapes: the layout is
*ambiguous* from the shapes and only a hint (the live swap flag, or the PEFT version plus ``is_transposed``) decides.

Sources of evidence about the orientation, all combined by `decide_orientation` (the one place that decides it; the
merge, the live loader and the subject interface call it):

- the parameter's own shapes (decisive unless ``d1 == d2``);
- the *sibling*: the other 3-D parameter of the same experts module with its factors. PEFT decides the swap once per
  experts module (the same ``ndim`` and ``is_transposed`` for both parameters; transformers' 5.0–5.12 patch swaps
  both names), so a non-square sibling fixes the orientation of a square parameter;
- the live swap flag (``_did_swap_in_out_features``, or transformers 5.0–5.3's ``_swapped_in_out``);
- a recorded orientation (the ``moe_compat.json`` sidecar);
- the PEFT version's rule (`peft_swaps`) with ``is_transposed`` (unknown for ``(E, in, out)`` experts unless given:
  True for GPT-OSS on transformers 5.x, absent on 4.57 and for Llama4); set aside on transformers 5.0–5.12, whose
  ``load_adapter`` patch may force the swap whatever the version.

Every source that speaks must name the same orientation, else `LayoutError` naming the module, the parameter and the
sources. This module also states the per-version swap rule (`peft_swaps`). Imports only the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

FUSED_LINEAR = "fused_linear"  # gate_up [E, 2I, H], down [E, H, I]: (E, out, in), y = x @ W[e]ᵀ
GPT_OSS = "gpt_oss"  # gate_up [E, H, 2I], down [E, I, H]: (E, in, out), y = x @ W[e]
MODULE_LIST = "module_list"  # per-expert nn.Linear [out, in]; stacked it is (E, out, in) like fused_linear
EXPERT_LAYOUTS = (FUSED_LINEAR, GPT_OSS, MODULE_LIST)


class Orientation(StrEnum):
    """Which factor spans which dimension of ``P [E, d1, d2]`` (named after ``_did_swap_in_out_features``)."""

    STANDARD = "standard"
    SWAPPED = "swapped"
    UNKNOWN = "unknown"


class LayoutError(ValueError):
    """Shapes or hints that no orientation explains, or that contradict each other."""


class AmbiguousLayoutError(LayoutError):
    """Both orientations fit the shapes (d1 == d2) and no hint resolves the tie."""


@dataclass(frozen=True)
class LayoutDecision:
    """Result of `detect_orientation`.

    orientation: STANDARD / SWAPPED, or UNKNOWN (shapes fit neither, or an unresolved tie with refuse_ambiguous=False).
    rank: the per-expert rank r (``lora_A.shape[0] // E``) when the shapes are consistent, else None.
    ambiguous: True when both orientations fit the shapes (d1 == d2).
    resolved_by: for an ambiguous case, the hint that decided ("did_swap" or "peft_version"), else None.
    reason: one human-readable sentence naming the shapes and hints used.
    """

    orientation: Orientation
    rank: int | None
    ambiguous: bool
    resolved_by: str | None
    reason: str


# --- the PEFT per-version swap rule ----------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?(?P<rest>[^+]*)(?:\+.*)?$")

_SWAP_ADDED = (0, 19, 0)  # PR #3083: swap iff is_transposed
_SWAP_INVERTED = (0, 19, 1)  # PR #3165: swap iff ndim == 3 and not is_transposed
_PARAM_WRAPPER_ADDED = (0, 17, 0)  # PR #2638: target_parameters / ParamWrapper
# transformers' `patch_moe_parameter_targeting` (run by its load_adapter) swaps gate_up_proj/down_proj whatever PEFT's
# rule says: 5.0.0 through 5.12.x; removed in 5.13.0 (peft.md §2.4). Dev builds of 5.0.0 and 5.13.0 count as inside.
_TRANSFORMERS_SWAP_PATCH = ((5, 0, 0), (5, 13, 0))


def parse_version(version: str) -> tuple[tuple[int, int, int], bool]:
    """``"0.19.1"`` -> ``((0, 19, 1), False)``; ``"0.20.1.dev0"`` / ``"0.19.0rc1"`` -> (release, True = pre/dev).

    A local suffix (``+cu124``) is ignored; ``.postN`` counts as the release itself. Raises ValueError otherwise.
    """
    m = _VERSION_RE.match(version)
    if m is None:
        raise ValueError(f"cannot parse version {version!r} (expected MAJOR.MINOR[.PATCH][suffix])")
    release = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    rest = m.group("rest").lower().lstrip(".-_")
    if rest == "" or re.fullmatch(r"post\d*", rest):
        return release, False
    if re.fullmatch(r"(dev|a|alpha|b|beta|rc|c|pre|preview)\d*(\.?dev\d*)?", rest):
        return release, True
    raise ValueError(f"cannot parse version suffix {rest!r} in {version!r}")


def peft_swaps(peft_version: str, param_ndim: int, is_transposed: bool | None) -> bool:
    """Whether PEFT's ``ParamWrapper.update_layer`` swaps in/out (sets ``_did_swap_in_out_features``).

    The rule, by released PEFT version (``is_transposed`` is the experts module's attribute; None = absent = False):

    - 0.17.x, 0.18.x: never (no swap logic);
    - 0.19.0: iff ``is_transposed`` (for any ``param_ndim``; PR #3083);
    - 0.19.1 and later: iff ``param_ndim == 3 and not is_transposed`` (PR #3165 inverted 0.19.0's rule).

    A dev/pre-release is placed *before* its release, and main-branch dev builds may carry either rule near the
    0.19.0/0.19.1 boundary, so ``0.18.1.devN`` .. ``0.19.1rcN`` raise ValueError rather than guess. Versions before
    0.17.0 (no ``ParamWrapper``) raise too.
    """
    release, pre = parse_version(peft_version)
    if release < _PARAM_WRAPPER_ADDED or (pre and release == _PARAM_WRAPPER_ADDED):
        raise ValueError(f"PEFT {peft_version} has no ParamWrapper (target_parameters came in 0.17.0)")
    if pre and (0, 18, 1) <= release <= _SWAP_INVERTED:
        raise ValueError(
            f"PEFT {peft_version} is a dev/pre-release next to the 0.19.0 / 0.19.1 swap-rule changes; "
            "its rule is unknown (read `_did_swap_in_out_features` from the live ParamWrapper instead)"
        )
    transposed = bool(is_transposed)
    if release < _SWAP_ADDED:
        return False
    if release < _SWAP_INVERTED:
        return transposed
    return param_ndim == 3 and not transposed


def transformers_may_force_swap(transformers_version: str) -> bool:
    """Whether transformers ``transformers_version`` has the ``load_adapter`` patch that swaps in/out of every later
    ``gate_up_proj`` / ``down_proj`` ParamWrapper in the process regardless of PEFT's rule (5.0.0 – 5.12.x)."""
    release, pre = parse_version(transformers_version)
    lo, hi = _TRANSFORMERS_SWAP_PATCH
    return lo <= release < hi or (pre and release == hi)


# --- orientation detection --------------------------------------------------------------------------------------


def _shape(name: str, shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    t = tuple(int(s) for s in shape)
    if len(t) != ndim:
        raise LayoutError(f"{name} must be {ndim}-D, got shape {t}")
    return t


@dataclass(frozen=True)
class _Fit:
    """Which orientations ``lora_A [r·E, a]``, ``lora_B [b, r·E]`` fit on ``P [E, d1, d2]``; ``problem`` says why none."""

    fits: tuple[Orientation, ...]
    rank: int | None
    shapes: str
    problem: str | None


def _fit(param_shape, lora_A_shape, lora_B_shape, num_experts) -> _Fit:
    E = int(num_experts)
    if E < 1:
        raise LayoutError(f"num_experts must be >= 1, got {num_experts}")
    pE, d1, d2 = _shape("param", param_shape, 3)
    rEa, a = _shape("lora_A", lora_A_shape, 2)
    b, rEb = _shape("lora_B", lora_B_shape, 2)
    shapes = f"param {(pE, d1, d2)}, lora_A {(rEa, a)}, lora_B {(b, rEb)}, E={E}"
    if pE != E:
        return _Fit((), None, shapes, f"param dim 0 is not E: {shapes}")
    if rEa != rEb or rEa < E or rEa % E != 0:
        return _Fit((), None, shapes, f"lora_A rows / lora_B cols are not equal multiples r·E: {shapes}")
    fits = tuple(o for o, ab in ((Orientation.STANDARD, (d1, d2)), (Orientation.SWAPPED, (d2, d1))) if (a, b) == ab)
    problem = None if fits else f"neither (a, b) == (d1, d2) nor (d2, d1): {shapes}"
    return _Fit(fits, rEa // E, shapes, problem)


@dataclass(frozen=True)
class SiblingFactors:
    """The other 3-D parameter of the same experts module and its LoRA factors (e.g. ``down_proj`` for
    ``gate_up_proj``): ``param_shape [E, d1, d2]``, ``lora_A_shape [r·E, a]``, ``lora_B_shape [b, r·E]``."""

    param: str
    param_shape: Sequence[int]
    lora_A_shape: Sequence[int]
    lora_B_shape: Sequence[int]


@dataclass(frozen=True)
class OrientationDecision:
    """Result of `decide_orientation`.

    orientation: STANDARD or SWAPPED (an undecidable or contradicted case raises instead).
    rank: the per-expert rank r (``lora_A.shape[0] // E``).
    ambiguous: the parameter's own shapes fit both orientations (d1 == d2).
    decided_by: the sources that named the orientation, all agreeing, in the order "shapes", "sibling", "did_swap",
      the recorded source (e.g. "sidecar"), "peft_version".
    not_used: sources that were given but say nothing, each with why ("peft_version: ... depends on is_transposed").
    reason: one sentence naming what decided and the shapes.
    """

    orientation: Orientation
    rank: int
    ambiguous: bool
    decided_by: tuple[str, ...]
    not_used: tuple[str, ...]
    reason: str


def decide_orientation(
    param_shape: Sequence[int],
    lora_A_shape: Sequence[int],
    lora_B_shape: Sequence[int],
    num_experts: int,
    *,
    module: str | None = None,
    param: str | None = None,
    layout: str | None = None,
    sibling: SiblingFactors | None = None,
    did_swap: bool | None = None,
    recorded: Orientation | str | None = None,
    recorded_by: str = "sidecar",
    is_transposed: bool | None = None,
    peft_version: str | None = None,
    transformers_version: str | None = None,
) -> OrientationDecision:
    """The orientation of ``lora_A [r·E, a]``, ``lora_B [b, r·E]`` on ``P [E, d1, d2]`` from every source given.

    Each input is optional (None = not known) and is one source (see the module docstring):

    - shapes: standard fits iff ``(a, b) == (d1, d2)``, swapped iff ``(a, b) == (d2, d1)`` (both need
      ``lora_A.shape[0] == lora_B.shape[1] == r·E``, r >= 1, ``P.shape[0] == E``); fitting neither raises LayoutError.
    - ``sibling``: the same test on the module's other parameter; it speaks when exactly one orientation fits it.
    - ``did_swap``: the live PEFT flag. ``recorded``: an orientation written down at save time (``recorded_by`` names
      where, e.g. "sidecar").
    - ``peft_version`` with ``is_transposed`` (the experts module's attribute as PEFT saw it; pass False when absent,
      None when unknown): `peft_swaps`. ``layout`` fused_linear / module_list ``(E, out, in)`` implies
      ``is_transposed`` False (True contradicts it: raises); gpt_oss ``(E, in, out)`` leaves it unknown. With
      ``is_transposed`` unknown the rule speaks only where both values give the same answer. A version the rule
      cannot place (dev builds at the 0.19 boundary, < 0.17) says nothing. Set aside when ``transformers_version``
      is 5.0–5.12 (`transformers_may_force_swap`).

    Every source that speaks must agree, else LayoutError naming module, parameter and the sources with what each
    says. None speaking (square shapes and no hint) raises AmbiguousLayoutError.
    """
    where = ".".join(x for x in (module, param) if x) or "expert parameter"
    fit = _fit(param_shape, lora_A_shape, lora_B_shape, num_experts)
    if fit.problem:
        raise LayoutError(f"{where}: the LoRA factors fit the parameter in no orientation: {fit.problem}")
    said: dict[str, tuple[str, Orientation]] = {}  # source -> (how to name it in a message, orientation)
    not_used: list[str] = []
    if len(fit.fits) == 1:
        said["shapes"] = ("the shapes say", fit.fits[0])
    if sibling is not None:
        sib = _fit(sibling.param_shape, sibling.lora_A_shape, sibling.lora_B_shape, num_experts)
        if sib.problem:
            raise LayoutError(f"{where}: the sibling {sibling.param}'s factors fit it in no orientation: {sib.problem}")
        if len(sib.fits) == 1:
            said["sibling"] = (f"the non-square sibling {sibling.param} ({sib.shapes}) says", sib.fits[0])
        else:
            not_used.append(f"sibling: {sibling.param} is square too")
    if did_swap is not None:
        said["did_swap"] = (f"the live swap flag (did_swap={did_swap}) says", _swap(did_swap))
    if recorded is not None:
        said[recorded_by] = (f"{recorded_by} says", _recorded(where, recorded, recorded_by))
    transposed = _is_transposed(where, layout, is_transposed)
    if peft_version is not None:
        rule, why = _version_rule(peft_version, transposed, transformers_version)
        if rule is None:
            not_used.append(f"peft_version: {why}")
        else:
            said["peft_version"] = (f"peft_version {peft_version} ({why}) says", rule)

    named = {o for _, o in said.values()}
    if len(named) > 1:
        claims = "; ".join(f"{text} {o.value}" for text, o in said.values())
        raise LayoutError(
            f"{where}: orientation sources disagree: {claims} ({fit.shapes}). One of them is wrong; applying ΔW in the "
            "wrong orientation would transpose every expert's delta, so this is refused"
        )
    if not named:
        d1 = int(param_shape[1])
        ignored = f"; not usable: {'; '.join(not_used)}" if not_used else ""
        raise AmbiguousLayoutError(
            f"{where}: ambiguous: d1 == d2 == {d1} (2I == H for gate_up / I == H for down) so both orientations fit "
            f"and no source decides (did_swap, {recorded_by}, sibling, peft_version){ignored}: {fit.shapes}"
        )
    (o,) = named
    reason = f"{' and '.join(said)} say {o.value}: {fit.shapes}"
    return OrientationDecision(o, fit.rank, len(fit.fits) == 2, tuple(said), tuple(not_used), reason)


def _swap(swapped: bool) -> Orientation:
    return Orientation.SWAPPED if swapped else Orientation.STANDARD


def _recorded(where: str, recorded: Orientation | str, recorded_by: str) -> Orientation:
    try:
        o = Orientation(recorded)
    except ValueError as err:
        raise LayoutError(f"{where}: {recorded_by} records orientation {recorded!r}: {err}") from err
    if o is Orientation.UNKNOWN:
        raise LayoutError(f"{where}: {recorded_by} records orientation 'unknown', which cannot be applied")
    return o


def _is_transposed(where: str, layout: str | None, is_transposed: bool | None) -> bool | None:
    """``is_transposed`` as given, or implied by an ``(E, out, in)`` layout; raises when the two contradict."""
    if layout is None or layout == GPT_OSS:
        return is_transposed
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout {layout!r}; expected one of {EXPERT_LAYOUTS}")
    if is_transposed:
        raise LayoutError(
            f"{where}: is_transposed=True means (E, in, out) but the experts layout is {layout} (E, out, in)"
        )
    return False


def _version_rule(peft_version: str, is_transposed: bool | None, transformers_version: str | None):
    """(orientation PEFT ``peft_version``'s rule gives a 3-D param, how) or (None, why it says nothing)."""
    if transformers_version is not None and transformers_may_force_swap(transformers_version):
        return None, f"transformers {transformers_version}'s load_adapter patch may force the swap whatever the version"
    candidates = (is_transposed,) if is_transposed is not None else (True, False)
    try:
        rule = {peft_swaps(peft_version, 3, t) for t in candidates}
    except ValueError as err:
        return None, str(err)
    if len(rule) != 1:
        return None, f"PEFT {peft_version}'s rule depends on is_transposed, which is unknown here"
    how = f"is_transposed={is_transposed}" if is_transposed is not None else "either is_transposed"
    return _swap(rule.pop()), how


def detect_orientation(
    param_shape: Sequence[int],
    lora_A_shape: Sequence[int],
    lora_B_shape: Sequence[int],
    num_experts: int,
    *,
    did_swap: bool | None = None,
    is_transposed: bool | None = None,
    peft_version: str | None = None,
    refuse_ambiguous: bool = True,
) -> LayoutDecision:
    """`decide_orientation` from the shapes, the live flag and the version rule only, in the older result form.

    ``is_transposed`` None means the attribute is absent (False, as PEFT reads it). Shapes that fit neither
    orientation give UNKNOWN; an unresolved tie raises AmbiguousLayoutError, or gives UNKNOWN when
    ``refuse_ambiguous=False``; hints that contradict the shapes or each other raise LayoutError.
    """
    fit = _fit(param_shape, lora_A_shape, lora_B_shape, num_experts)
    if fit.problem:
        return LayoutDecision(Orientation.UNKNOWN, fit.rank, False, None, fit.problem)
    try:
        d = decide_orientation(
            param_shape, lora_A_shape, lora_B_shape, num_experts,
            did_swap=did_swap, is_transposed=bool(is_transposed), peft_version=peft_version,
        )  # fmt: skip
    except AmbiguousLayoutError as err:
        if refuse_ambiguous:
            raise
        return LayoutDecision(Orientation.UNKNOWN, fit.rank, True, None, str(err))
    resolved_by = next(s for s in d.decided_by if s != "shapes") if d.ambiguous else None
    return LayoutDecision(d.orientation, d.rank, d.ambiguous, resolved_by, d.reason)


def semantic_orientation(expert_layout: str) -> Orientation:
    """The orientation in which lora_A spans the layer's real input (the ``nn.Linear`` meaning of LoRA).

    fused_linear / module_list ``[E, out, in]`` -> SWAPPED (lora_A [r·E, in]); gpt_oss ``[E, in, out]`` -> STANDARD.
    """
    if expert_layout in (FUSED_LINEAR, MODULE_LIST):
        return Orientation.SWAPPED
    if expert_layout == GPT_OSS:
        return Orientation.STANDARD
    raise ValueError(f"unknown expert layout {expert_layout!r}; expected one of {EXPERT_LAYOUTS}")
