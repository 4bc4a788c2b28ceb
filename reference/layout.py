"""Orientation of PEFT LoRA factors on 3-D expert parameters, and PEFT's per-version swap rule.

A 3-D expert parameter is ``P [E, d1, d2]``. PEFT's ``ParamWrapper`` stores ``lora_A.weight [r·E, a]`` and
``lora_B.weight [b, r·E]``. The orientation is named after PEFT's ``_did_swap_in_out_features``:

- ``standard`` (not swapped): ``a = d1``, ``b = d2``, ``ΔW[e] = s·(B_e A_e)ᵀ``;
- ``swapped``: ``a = d2``, ``b = d1``, ``ΔW[e] = s·B_e A_e``.

When ``d1 == d2`` (``2I == H`` for gate_up, ``I == H`` for down) both orientations give valid shapes: the layout is
*ambiguous* from the shapes and only a hint (the live swap flag, or the PEFT version plus ``is_transposed``) decides.

This module is the one place that states the per-version swap rule (`peft_swaps`) and the 2I == H tie-break
(`detect_orientation`). Imports only the standard library.
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


# --- orientation detection --------------------------------------------------------------------------------------


def _shape(name: str, shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    t = tuple(int(s) for s in shape)
    if len(t) != ndim:
        raise LayoutError(f"{name} must be {ndim}-D, got shape {t}")
    return t


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
    """Orientation of ``lora_A [r·E, a]``, ``lora_B [b, r·E]`` relative to ``P [E, d1, d2]``.

    standard fits iff ``(a, b) == (d1, d2)``; swapped fits iff ``(a, b) == (d2, d1)``; both need
    ``lora_A.shape[0] == lora_B.shape[1] == r·E`` with r >= 1 and ``P.shape[0] == E``.

    - exactly one fits: that orientation. A hint that names the other one raises LayoutError (the caller's
      assumption about where the adapter came from is wrong).
    - neither fits: UNKNOWN with the reason.
    - both fit (d1 == d2): ambiguous. Tie-break, first applicable wins: ``did_swap`` (the live PEFT flag, which also
      reflects transformers' 5.0–5.12 monkey patch), then ``peft_swaps(peft_version, 3, is_transposed)``. With no
      usable hint: AmbiguousLayoutError, or UNKNOWN when ``refuse_ambiguous=False``.
    """
    E = int(num_experts)
    if E < 1:
        raise LayoutError(f"num_experts must be >= 1, got {num_experts}")
    pE, d1, d2 = _shape("param", param_shape, 3)
    rEa, a = _shape("lora_A", lora_A_shape, 2)
    b, rEb = _shape("lora_B", lora_B_shape, 2)
    shapes = f"param {(pE, d1, d2)}, lora_A {(rEa, a)}, lora_B {(b, rEb)}, E={E}"
    if pE != E:
        return LayoutDecision(Orientation.UNKNOWN, None, False, None, f"param dim 0 is not E: {shapes}")
    if rEa != rEb or rEa < E or rEa % E != 0:
        return LayoutDecision(
            Orientation.UNKNOWN, None, False, None, f"lora_A rows / lora_B cols are not equal multiples r·E: {shapes}"
        )
    r = rEa // E
    fits = []
    if (a, b) == (d1, d2):
        fits.append(Orientation.STANDARD)
    if (a, b) == (d2, d1):
        fits.append(Orientation.SWAPPED)
    if not fits:
        return LayoutDecision(Orientation.UNKNOWN, r, False, None, f"neither (a, b) == (d1, d2) nor (d2, d1): {shapes}")

    hint, hint_name = _hint(did_swap, is_transposed, peft_version)
    if len(fits) == 1:
        (o,) = fits
        if hint is not None and hint != o:
            raise LayoutError(f"shapes say {o.value} but {hint_name} says {hint.value}: {shapes}")
        return LayoutDecision(o, r, False, None, f"only {o.value} fits: {shapes}")

    if hint is not None:
        return LayoutDecision(hint, r, True, hint_name, f"d1 == d2 == {d1}; {hint_name} says {hint.value}: {shapes}")
    msg = (
        f"ambiguous: d1 == d2 == {d1} (2I == H for gate_up / I == H for down) so both orientations fit and no hint "
        f"(did_swap, peft_version) was given: {shapes}"
    )
    if refuse_ambiguous:
        raise AmbiguousLayoutError(msg)
    return LayoutDecision(Orientation.UNKNOWN, r, True, None, msg)


def _hint(did_swap: bool | None, is_transposed: bool | None, peft_version: str | None):
    """The orientation a hint implies and the hint's name, or (None, None). did_swap wins over the version rule."""
    if did_swap is not None:
        return (Orientation.SWAPPED if did_swap else Orientation.STANDARD), "did_swap"
    if peft_version is not None:
        swapped = peft_swaps(peft_version, 3, is_transposed)
        return (Orientation.SWAPPED if swapped else Orientation.STANDARD), "peft_version"
    return None, None


def semantic_orientation(expert_layout: str) -> Orientation:
    """The orientation in which lora_A spans the layer's real input (the ``nn.Linear`` meaning of LoRA).

    fused_linear / module_list ``[E, out, in]`` -> SWAPPED (lora_A [r·E, in]); gpt_oss ``[E, in, out]`` -> STANDARD.
    """
    if expert_layout in (FUSED_LINEAR, MODULE_LIST):
        return Orientation.SWAPPED
    if expert_layout == GPT_OSS:
        return Orientation.STANDARD
    raise ValueError(f"unknown expert layout {expert_layout!r}; expected one of {EXPERT_LAYOUTS}")
