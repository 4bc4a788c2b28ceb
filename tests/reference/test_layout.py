"""reference/layout.py: PEFT's per-version swap rule, orientation detection (truth table), the d1 == d2 tie-break.

Expected values come from PEFT's own formulas and from the facts sheet (/work/shared/upstream/peft.md §1.2, §2.2),
never from the code under test.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from reference.layout import (
    FUSED_LINEAR,
    GPT_OSS,
    MODULE_LIST,
    AmbiguousLayoutError,
    LayoutError,
    Orientation,
    SiblingFactors,
    decide_orientation,
    detect_orientation,
    parse_version,
    peft_swaps,
    semantic_orientation,
    transformers_may_force_swap,
)

STD, SWP, UNK = Orientation.STANDARD, Orientation.SWAPPED, Orientation.UNKNOWN

# PEFT's get_delta_weight einsums for E > 1 (peft/tuners/lora/layer.py, ParamWrapper, unchanged 0.17 -> 0.21):
# lora_B.weight viewed as [out, r, E] ("o r e"), lora_A.weight as [E, r, in] ("e r i").
PEFT_EINSUM = {STD: "o r e, e r i -> e i o", SWP: "o r e, e r i -> e o i"}


def peft_formula_fits(orientation, param_shape, a_shape, b_shape, E) -> bool:
    """Independent oracle: does PEFT's einsum for `orientation` turn these factor shapes into a ΔW of param's shape?"""
    (rEa, a), (b, rEb) = a_shape, b_shape
    if param_shape[0] != E or rEa != rEb or rEa % E or rEa < E:
        return False
    r = rEa // E
    A = torch.zeros(E, r, a)
    B = torch.zeros(b, r, E)
    return tuple(torch.einsum(PEFT_EINSUM[orientation], B, A).shape) == tuple(param_shape)


def test_truth_table_exhaustive_small_dims():
    """All d1, d2, a, b in 1..5, r in 1..3, E in 1..3: the decision is the unique fitting orientation, UNKNOWN when
    none fits, and ambiguous (refused / UNKNOWN / resolved by did_swap) exactly when both fit."""
    n_both = n_one = n_none = 0
    dims = range(1, 6)
    for E, r, d1, d2 in itertools.product(range(1, 4), range(1, 4), dims, dims):
        P = (E, d1, d2)
        for a, b in itertools.product(dims, dims):
            A, B = (r * E, a), (b, r * E)
            fits = {o for o in (STD, SWP) if peft_formula_fits(o, P, A, B, E)}
            if len(fits) == 2:
                n_both += 1
                with pytest.raises(AmbiguousLayoutError, match="ambiguous"):
                    detect_orientation(P, A, B, E)
                d = detect_orientation(P, A, B, E, refuse_ambiguous=False)
                assert (d.orientation, d.ambiguous, d.resolved_by, d.rank) == (UNK, True, None, r)
                for flag, want in ((True, SWP), (False, STD)):
                    d = detect_orientation(P, A, B, E, did_swap=flag)
                    assert (d.orientation, d.ambiguous, d.resolved_by, d.rank) == (want, True, "did_swap", r)
            elif len(fits) == 1:
                n_one += 1
                (want,) = fits
                d = detect_orientation(P, A, B, E)
                assert (d.orientation, d.ambiguous, d.resolved_by, d.rank) == (want, False, None, r)
                # the live flag agreeing with the shapes is accepted, the other value is a contradiction
                assert detect_orientation(P, A, B, E, did_swap=(want is SWP)).orientation is want
                with pytest.raises(LayoutError, match="shapes say"):
                    detect_orientation(P, A, B, E, did_swap=(want is STD))
            else:
                n_none += 1
                d = detect_orientation(P, A, B, E)
                assert d.orientation is UNK and not d.ambiguous
    # the table really exercised all three outcomes
    assert n_both > 0 and n_one > 0 and n_none > 0


def test_rank_and_expert_count_mismatches_are_unknown():
    """lora_A rows != lora_B cols, rows not a multiple of E, r == 0, or P.shape[0] != E: no orientation fits."""
    cases = [
        ((2, 4, 6), (4, 4), (6, 6)),  # A rows 4 != B cols 6
        ((2, 4, 6), (3, 4), (6, 3)),  # 3 rows not a multiple of E=2
        ((2, 4, 6), (0, 4), (6, 0)),  # r = 0
        ((3, 4, 6), (4, 4), (6, 4)),  # P says E=3, caller says E=2
    ]
    for P, A, B in cases:
        assert detect_orientation(P, A, B, 2).orientation is UNK, (P, A, B)
    with pytest.raises(LayoutError, match="3-D"):
        detect_orientation((4, 6), (2, 6), (4, 2), 1)


# The swap rule as documented in the facts sheet (peft.md §1.2 table), one row per (version, ndim, is_transposed).
SWAP_TABLE = [
    ("0.17.1", 3, None, False),
    ("0.17.1", 3, True, False),
    ("0.18.1", 3, False, False),
    ("0.18.1", 3, True, False),
    ("0.19.0", 3, None, False),  # missing attribute -> getattr(..., False)
    ("0.19.0", 3, False, False),
    ("0.19.0", 3, True, True),
    ("0.19.0", 2, True, True),  # 0.19.0's condition ignores ndim
    ("0.19.1", 3, None, True),  # missing attribute counts as not transposed -> swap
    ("0.19.1", 3, False, True),
    ("0.19.1", 3, True, False),
    ("0.19.1", 2, False, False),
    ("0.20.0", 3, False, True),
    ("0.21.2", 3, None, True),
    ("0.21.2", 3, True, False),
    ("0.21.2", 2, None, False),
    ("0.20.1.dev0", 3, False, True),  # main after 0.20.0 (the facts sheet's snapshot)
    ("0.21.2+local", 3, True, False),
    ("0.18.0.dev0", 3, True, False),
]


@pytest.mark.parametrize(("version", "ndim", "is_transposed", "want"), SWAP_TABLE)
def test_peft_swap_rule_table(version, ndim, is_transposed, want):
    assert peft_swaps(version, ndim, is_transposed) is want


@pytest.mark.parametrize("version", ["0.16.0", "0.17.0.dev0", "0.18.1.dev0", "0.19.0rc1", "0.19.1.dev0", "x.y"])
def test_peft_swap_rule_refuses_unknown_versions(version):
    """No ParamWrapper before 0.17.0; dev builds next to the 0.19.0/0.19.1 rule changes could carry either rule."""
    with pytest.raises(ValueError, match="PEFT|parse"):
        peft_swaps(version, 3, False)


def test_parse_version():
    assert parse_version("0.19.1") == ((0, 19, 1), False)
    assert parse_version("0.20") == ((0, 20, 0), False)
    assert parse_version("0.20.1.dev0") == ((0, 20, 1), True)
    assert parse_version("0.19.0rc1") == ((0, 19, 0), True)
    assert parse_version("0.21.2.post1+cu124") == ((0, 21, 2), False)
    with pytest.raises(ValueError, match="suffix"):
        parse_version("0.19.1foo")


# peft.md §2.2: does lora_A span the real input ("semantically correct") for gate_up_proj, per model and PEFT version.
# (expert layout, is_transposed attribute on the experts module, {peft version: lora_A spans the input?})
SEMANTIC_TABLE = [
    (GPT_OSS, None, {"0.18.1": True, "0.19.0": True, "0.19.1": False, "0.21.2": False}),  # transformers 4.57 GPT-OSS
    (GPT_OSS, True, {"0.18.1": True, "0.19.0": False, "0.19.1": True, "0.21.2": True}),  # transformers 5.x GPT-OSS
    (FUSED_LINEAR, False, {"0.18.1": False, "0.19.0": False, "0.19.1": True, "0.21.2": True}),  # Mixtral/Qwen3 v5
]


@pytest.mark.parametrize(("layout", "is_transposed", "by_version"), SEMANTIC_TABLE)
def test_swap_rule_reproduces_facts_sheet_semantic_table(layout, is_transposed, by_version):
    for version, correct in by_version.items():
        o = SWP if peft_swaps(version, 3, is_transposed) else STD
        assert (o is semantic_orientation(layout)) is correct, (layout, is_transposed, version)


def test_semantic_orientation():
    """fused_linear / module_list store (E, out, in): lora_A [r·E, in] spans d2 -> swapped; gpt_oss (E, in, out)."""
    assert semantic_orientation(FUSED_LINEAR) is SWP
    assert semantic_orientation(MODULE_LIST) is SWP
    assert semantic_orientation(GPT_OSS) is STD
    with pytest.raises(ValueError, match="unknown expert layout"):
        semantic_orientation("llama4")


@pytest.mark.parametrize("E", [1, 4])
def test_square_tie_break_by_peft_version(E):
    """2I == H (gate_up) / I == H (down): both fit; the version rule resolves it; did_swap overrides the version
    (transformers 5.4-5.12 patched PEFT to swap regardless of version, so the live flag is the truth)."""
    r, H = 2, 8
    P, A, B = (E, H, H), (r * E, H), (H, r * E)
    # Qwen3-MoE / Mixtral on transformers 5.x: is_transposed=False
    assert detect_orientation(P, A, B, E, peft_version="0.18.1", is_transposed=False).orientation is STD
    assert detect_orientation(P, A, B, E, peft_version="0.19.0", is_transposed=False).orientation is STD
    d = detect_orientation(P, A, B, E, peft_version="0.19.1", is_transposed=None)
    assert (d.orientation, d.ambiguous, d.resolved_by) == (SWP, True, "peft_version")
    # GPT-OSS on transformers 5.x: is_transposed=True
    assert detect_orientation(P, A, B, E, peft_version="0.19.0", is_transposed=True).orientation is SWP
    assert detect_orientation(P, A, B, E, peft_version="0.21.2", is_transposed=True).orientation is STD
    # the live flag against the version rule: a contradiction, unless transformers 5.0-5.12's load_adapter patch
    # (which swaps whatever the PEFT version) may have run in the process, where the flag is the truth
    with pytest.raises(LayoutError, match="orientation sources disagree"):
        detect_orientation(P, A, B, E, did_swap=True, peft_version="0.18.1")
    d = decide_orientation(P, A, B, E, did_swap=True, peft_version="0.18.1", transformers_version="5.12.1")
    assert (d.orientation, d.decided_by) == (SWP, ("did_swap",))
    assert "load_adapter patch" in d.not_used[0]
    # is_transposed alone (no version) does not decide anything
    with pytest.raises(AmbiguousLayoutError):
        detect_orientation(P, A, B, E, is_transposed=True)


def test_non_square_version_hint_contradiction_raises():
    """gate_up [E, 2I, H] with an adapter saved by 0.18.1 (standard: lora_A [r·E, 2I]) read as if PEFT 0.21.2 made it."""
    E, r, I, H = 4, 2, 6, 8
    P, A, B = (E, 2 * I, H), (r * E, 2 * I), (H, r * E)
    assert detect_orientation(P, A, B, E, peft_version="0.18.1").orientation is STD
    with pytest.raises(LayoutError, match=r"the shapes say standard; peft_version 0\.21\.2 .* says swapped"):
        detect_orientation(P, A, B, E, peft_version="0.21.2")


# --- decide_orientation: every source combined ----------------------------------------------------------------

E4, R, I6, H8 = 4, 2, 6, 8  # gate_up [E, 2I, H] = [4, 12, 8]; down [E, H, I] = [4, 8, 6]; square: H = 8 = I


def _factors(param_shape, o: Orientation, E: int = E4, r: int = R):
    """Factor shapes of orientation ``o`` on ``P [E, d1, d2]`` (PEFT: lora_A [r·E, in], lora_B [out, r·E])."""
    _, d1, d2 = param_shape
    a, b = (d1, d2) if o is STD else (d2, d1)
    return (r * E, a), (b, r * E)


# the version whose rule names each orientation for an (E, out, in) module (is_transposed False)
VERSION_SAYS = {STD: "0.18.1", SWP: "0.21.2"}
OTHER = {STD: SWP, SWP: STD}


@pytest.mark.parametrize("square", [True, False], ids=["square", "non_square"])
@pytest.mark.parametrize("truth", [STD, SWP])
def test_every_source_combination_agrees_or_is_refused(square, truth):
    """Each source absent, agreeing with the truth or contradicting it (sibling, live flag, sidecar, version rule;
    the shapes always tell the truth when they speak): the decision is the truth when nothing contradicts and
    something speaks; any contradiction raises LayoutError naming the module, the parameter and the liar; nothing
    speaking raises AmbiguousLayoutError. (Square shapes and every source wrong alike cannot be told apart from the
    truth: the decision follows them.)"""
    P = (E4, H8, H8) if square else (E4, 2 * I6, H8)
    A, B = _factors(P, truth)
    sib_P = (E4, H8, I6)  # down, never square
    states = ("absent", "agree", "contradict")
    n = 0
    for sib, flag, side, ver in itertools.product(states, repeat=4):
        said = {
            s: truth if v == "agree" else OTHER[truth]
            for s, v in (("sibling", sib), ("did_swap", flag), ("sidecar", side), ("peft_version", ver))
            if v != "absent"
        }
        kw = dict(module="model.layers.3.mlp.experts", param="gate_up_proj", layout=FUSED_LINEAR)
        if "sibling" in said:
            kw["sibling"] = SiblingFactors("down_proj", sib_P, *_factors(sib_P, said["sibling"]))
        if "did_swap" in said:
            kw["did_swap"] = said["did_swap"] is SWP
        if "sidecar" in said:
            kw["recorded"] = said["sidecar"].value
        if "peft_version" in said:
            kw["peft_version"] = VERSION_SAYS[said["peft_version"]]
        liars = [s for s, o in said.items() if o is not truth]
        truthful = len(said) > len(liars) or not square  # non-square shapes always speak, and tell the truth
        if liars and not truthful:  # square and every voice wrong alike: nothing can tell (they all agree)
            assert decide_orientation(P, A, B, E4, **kw).orientation is OTHER[truth]
        elif liars:
            with pytest.raises(
                LayoutError,
                match=r"model\.layers\.3\.mlp\.experts\.gate_up_proj: orientation sources "
                "disagree",
            ) as info:
                decide_orientation(P, A, B, E4, **kw)
            assert not isinstance(info.value, AmbiguousLayoutError)
            labels = {"sibling": "sibling down_proj", "did_swap": "swap flag", "sidecar": "sidecar says",
                      "peft_version": "peft_version"}  # fmt: skip
            assert all(labels[s] in str(info.value) for s in liars), (liars, str(info.value))
        elif square and not said:
            with pytest.raises(AmbiguousLayoutError, match="ambiguous"):
                decide_orientation(P, A, B, E4, **kw)
        else:
            d = decide_orientation(P, A, B, E4, **kw)
            want_by = ([] if square else ["shapes"]) + list(said)
            assert (d.orientation, d.ambiguous, d.rank, d.decided_by) == (truth, square, R, tuple(want_by))
        n += 1
    assert n == 81


def test_sibling_decides_square_gpt_oss_where_the_version_cannot():
    """GPT-OSS (E, in, out) experts, 2I == H gate_up, PEFT 0.21.2 adapter without sidecar: the rule depends on
    is_transposed (True on transformers 5.x, absent on 4.57), so the version says nothing; the non-square down
    decides (the gap issue 12 names: such adapters were refused though decidable)."""
    E, r, I, H = 4, 2, 4, 8
    P, sib_P = (E, H, 2 * I), (E, I, H)  # gpt_oss gate_up [E, H, 2I], down [E, I, H]
    for truth in (STD, SWP):
        A, B = _factors(P, truth, E, r)
        with pytest.raises(AmbiguousLayoutError, match="depends on is_transposed"):
            decide_orientation(P, A, B, E, layout=GPT_OSS, peft_version="0.21.2")
        sib = SiblingFactors("down_proj", sib_P, *_factors(sib_P, truth, E, r))
        d = decide_orientation(P, A, B, E, layout=GPT_OSS, peft_version="0.21.2", sibling=sib)
        assert (d.orientation, d.decided_by) == (truth, ("sibling",))
        assert d.not_used == ("peft_version: PEFT 0.21.2's rule depends on is_transposed, which is unknown here",)
        # with is_transposed known (transformers 5.x GPT-OSS: True) the 0.21.2 rule says standard
        if truth is STD:
            d = decide_orientation(P, A, B, E, layout=GPT_OSS, peft_version="0.21.2", is_transposed=True, sibling=sib)
            assert d.decided_by == ("sibling", "peft_version")
        else:
            with pytest.raises(LayoutError, match="disagree"):
                decide_orientation(P, A, B, E, layout=GPT_OSS, peft_version="0.21.2", is_transposed=True, sibling=sib)


def test_layout_and_is_transposed_inputs():
    """(E, out, in) layouts imply is_transposed False (so 0.21.2's rule decides), and True contradicts them; an
    unplaceable PEFT version says nothing; factors that fit no orientation (here or on the sibling) raise."""
    P = (E4, H8, H8)
    A, B = _factors(P, SWP)
    d = decide_orientation(P, A, B, E4, layout=FUSED_LINEAR, peft_version="0.21.2")
    assert (d.orientation, d.decided_by) == (SWP, ("peft_version",))
    with pytest.raises(LayoutError, match="is_transposed=True means"):
        decide_orientation(P, A, B, E4, layout=MODULE_LIST, is_transposed=True, peft_version="0.21.2")
    with pytest.raises(ValueError, match="unknown expert layout"):
        decide_orientation(P, A, B, E4, layout="llama4")
    with pytest.raises(AmbiguousLayoutError, match="dev/pre-release"):
        decide_orientation(P, A, B, E4, layout=FUSED_LINEAR, peft_version="0.19.1rc1")
    with pytest.raises(LayoutError, match=r"experts\.down_proj: the LoRA factors fit the parameter in no orientation"):
        decide_orientation(P, (R * E4, 5), B, E4, module="experts", param="down_proj")
    bad_sib = SiblingFactors("down_proj", (E4, H8, I6), (R * E4, 7), (H8, R * E4))
    with pytest.raises(LayoutError, match="sibling down_proj's factors fit it in no orientation"):
        decide_orientation(P, A, B, E4, sibling=bad_sib)
    with pytest.raises(LayoutError, match="records orientation 'sideways'"):
        decide_orientation(P, A, B, E4, recorded="sideways")
    with pytest.raises(LayoutError, match="records orientation 'unknown'"):
        decide_orientation(P, A, B, E4, recorded="unknown")


@pytest.mark.parametrize(
    ("version", "patched"),
    [("4.57.6", False), ("5.0.0", True), ("5.3.0", True), ("5.12.1", True), ("5.13.0.dev0", True), ("5.13.0", False),
     ("5.24.0", False), ("5.0.0.dev0", True)],
)  # fmt: skip
def test_transformers_patch_window(version, patched):
    """peft.md §2.4: transformers' patch_moe_parameter_targeting exists in 5.0.0-5.12.1, removed in 5.13.0; dev
    builds at either boundary may or may not have it, so they count as inside (the version rule is set aside)."""
    assert transformers_may_force_swap(version) is patched
