"""reference/merge.py: merged-weight forward == base forward + LoRA-delta forward, per layout × orientation × convention;
per-expert disk tensors (gate/up/down and w1/w3/w2); bf16 / NF4 / FP8 targets with documented rounding bounds.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from reference.fp8 import UE8M0_DTYPE, dequantize_fp8, quantize_fp8_block
from reference.layout import FUSED_LINEAR, GPT_OSS, Orientation
from reference.lora import CONTIGUOUS_R, STRIDE_E, LoraFactors
from reference.merge import (
    GATE_UP_DOWN,
    W1_W3_W2,
    factors_delta,
    fuse_per_expert,
    merge_fp8_to_bf16,
    merge_fused,
    merge_into_fp8,
    merge_into_nf4,
    merge_per_expert,
    split_fused,
)
from reference.nf4 import NF4_CODE, absmax_of, dequantize_nf4, quantize_nf4

F64 = torch.float64
ORIENTATIONS = (Orientation.STANDARD, Orientation.SWAPPED)
CONVENTIONS = (STRIDE_E, CONTIGUOUS_R)


def factors_for(shape, r, o, c, g, scaling=0.5, dtype=F64) -> LoraFactors:
    """Random nonzero factors for a param [E, d1, d2] in orientation o (PEFT shapes)."""
    E, d1, d2 = shape
    a, b = (d1, d2) if o is Orientation.STANDARD else (d2, d1)
    A = torch.randn(r * E, a, generator=g, dtype=dtype)
    B = torch.randn(b, r * E, generator=g, dtype=dtype)
    return LoraFactors(A, B, scaling, o, c)


def route(S, E, g):
    """Expert ids [S]; with E >= 3 the last expert never gets a token (an expert with zero tokens)."""
    return torch.randint(0, max(E - 1, 1) if E >= 3 else E, (S,), generator=g)


def mlp_rows(x, ids, proj_in, proj_out, split):
    """Per-token expert MLP: h = proj_in(x_i, e_i); gate, up = split(h); y = proj_out(silu(gate)·up, e_i)."""
    ys = []
    for i in range(x.shape[0]):
        e = int(ids[i])
        gate, up = split(proj_in(x[i : i + 1], e))
        ys.append(proj_out(F.silu(gate) * up, e))
    return torch.cat(ys) if ys else x.new_zeros(0, 0)


def lora_add(f: LoraFactors, E, layout, base):
    """Projection with the LoRA delta applied in the forward (the factors path, no merge)."""
    return lambda x, e: base(x, e) + f.forward_delta(x, torch.full((x.shape[0],), e), E, layout)


def halves(h):  # fused_linear / module_list: gate = rows [0, I), up = rows [I, 2I) of gate_up -> h[:, :I], h[:, I:]
    return h.chunk(2, dim=-1)


def interleaved(h):  # gpt_oss: gate = [..., ::2], up = [..., 1::2]
    return h[..., ::2], h[..., 1::2]


# transformers' per-expert checkpoint names (Qwen3-MoE / Mixtral): gate, up, down
DISK_NAMES = {GATE_UP_DOWN: ("gate_proj", "up_proj", "down_proj"), W1_W3_W2: ("w1", "w3", "w2")}


def disk_projections(tensors, names, prefix):
    """Per-expert nn.Linear projections from disk tensors: in = [x gateᵀ, x upᵀ] (gate first), out = a downᵀ."""
    gate, up, down = names

    def proj_in(v, e):
        return torch.cat([v @ tensors[f"{prefix}experts.{e}.{n}.weight"].T for n in (gate, up)], dim=-1)

    def proj_out(v, e):
        return v @ tensors[f"{prefix}experts.{e}.{down}.weight"].T

    return proj_in, proj_out


shapes = dict(E=st.integers(1, 4), r=st.integers(1, 3), I=st.integers(1, 7), H=st.integers(1, 9))


@given(**shapes, S=st.integers(0, 6), seed=st.integers(0, 2**16))
@example(E=4, r=2, I=4, H=8, S=5, seed=0)  # 2I == H: gate_up square
@example(E=4, r=2, I=6, H=6, S=5, seed=1)  # I == H: down square
@example(E=1, r=2, I=3, H=5, S=3, seed=2)  # E == 1
@example(E=3, r=1, I=5, H=3, S=4, seed=3)  # r == 1, expert 2 gets no token
@example(E=2, r=2, I=3, H=4, S=0, seed=4)  # no tokens at all
def test_merged_forward_equals_base_plus_lora_forward(E, r, I, H, S, seed):
    """For fused_linear, gpt_oss and module_list (per-expert disk, both naming schemes), every orientation and
    convention: MLP(merged weights)(x) == MLP(base weights)(x) with LoRA deltas added in the forward, in float64.

    Tolerance: float64, ~(2I + H + 2r) products per output; relative error ~1e-15; 1e-10 absolute/relative is loose
    and still far below the O(1) change a wrong merge causes.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, H, generator=g, dtype=F64)
    ids = route(S, E, g)
    for o, c in itertools.product(ORIENTATIONS, CONVENTIONS):
        # fused_linear [E, 2I, H] / [E, H, I], y = x Wᵀ
        gu = torch.randn(E, 2 * I, H, generator=g, dtype=F64)
        dn = torch.randn(E, H, I, generator=g, dtype=F64)
        fgu, fdn = factors_for(gu.shape, r, o, c, g), factors_for(dn.shape, r, o, c, g)
        lin = lambda w: lambda v, e: v @ w[e].T  # noqa: E731
        want = mlp_rows(
            x, ids, lora_add(fgu, E, FUSED_LINEAR, lin(gu)), lora_add(fdn, E, FUSED_LINEAR, lin(dn)), halves
        )
        got = mlp_rows(x, ids, lin(merge_fused(gu, fgu)), lin(merge_fused(dn, fdn)), halves)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

        # module_list: per-expert disk tensors gate/up [I, H], down [H, I]; the adapter is the fused one above
        for scheme in (GATE_UP_DOWN, W1_W3_W2):
            disk = split_fused(gu, dn, scheme, prefix="model.layers.0.mlp.")
            disk["model.layers.0.mlp.gate.weight"] = torch.ones(E, H, dtype=F64)  # router: must pass through
            merged = merge_per_expert(disk, {"gate_up": fgu, "down": fdn}, E, scheme, prefix="model.layers.0.mlp.")
            assert merged.keys() == disk.keys()
            assert torch.equal(merged["model.layers.0.mlp.gate.weight"], disk["model.layers.0.mlp.gate.weight"])
            mgu, mdn = fuse_per_expert(merged, E, scheme, prefix="model.layers.0.mlp.")
            per_in, per_out = disk_projections(merged, DISK_NAMES[scheme], "model.layers.0.mlp.")
            got = mlp_rows(x, ids, per_in, per_out, halves)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            # splitting then merging per expert == merging the fused tensor then splitting (same fp64 sums)
            assert torch.equal(mgu, merge_fused(gu, fgu)) and torch.equal(mdn, merge_fused(dn, fdn))

        # gpt_oss [E, H, 2I] (interleaved gate/up) / [E, I, H], y = x W
        gu = torch.randn(E, H, 2 * I, generator=g, dtype=F64)
        dn = torch.randn(E, I, H, generator=g, dtype=F64)
        fgu, fdn = factors_for(gu.shape, r, o, c, g), factors_for(dn.shape, r, o, c, g)
        lin = lambda w: lambda v, e: v @ w[e]  # noqa: E731
        want = mlp_rows(x, ids, lora_add(fgu, E, GPT_OSS, lin(gu)), lora_add(fdn, E, GPT_OSS, lin(dn)), interleaved)
        got = mlp_rows(x, ids, lin(merge_fused(gu, fgu)), lin(merge_fused(dn, fdn)), interleaved)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bf16_merge_rounds_once():
    """bf16 param: W' = round_bf16(W + ΔW) with the sum exact in fp32 -> per element |W' - (W + ΔW)_f64| <= u·|·|,
    u = 2^-8 (bf16 unit roundoff), plus the fp32 sum's own rounding 2^-24 relative (bound 2^-8 + 2^-23)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 12, 8, generator=g).to(torch.bfloat16)
    f = factors_for(W.shape, 2, Orientation.SWAPPED, STRIDE_E, g, dtype=torch.float32)
    got = merge_fused(W, f)
    assert got.dtype == torch.bfloat16
    exact = W.double() + factors_delta(f, 4, F64)
    assert ((got.double() - exact).abs() <= (2**-8 + 2**-23) * exact.abs()).all()
    # out_dtype: an fp32 base merged straight into bf16 obeys the same single-rounding bound
    got = merge_fused(W.float(), f, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and ((got.double() - exact).abs() <= (2**-8 + 2**-23) * exact.abs()).all()


def test_merge_errors_name_the_cause():
    g = torch.Generator().manual_seed(0)
    E, I, H = 2, 3, 4
    gu, dn = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    disk = split_fused(gu, dn, GATE_UP_DOWN)
    wrong = factors_for((E, H, 2 * I), 1, Orientation.SWAPPED, STRIDE_E, g)  # a gpt_oss-shaped adapter
    with pytest.raises(ValueError, match=r"base shape \(2, 6, 4\) != LoRA delta shape \(2, 4, 6\)"):
        merge_per_expert(disk, {"gate_up": wrong}, E, GATE_UP_DOWN)
    with pytest.raises(ValueError, match="extra"):
        merge_per_expert(disk, {"up": wrong}, E, GATE_UP_DOWN)
    with pytest.raises(KeyError, match=r"experts\.0\.w1\.weight"):
        merge_per_expert(disk, {}, E, W1_W3_W2)
    with pytest.raises(ValueError, match="unknown per-expert naming scheme"):
        merge_per_expert(disk, {}, E, "gate_up_proj")
    with pytest.raises(TypeError, match="merge_into_nf4"):
        merge_fused(torch.zeros(E, 2, 2, dtype=torch.uint8), wrong)


NF4_HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)  # largest distance to the nearest NF4 code, scaled


def blockwise_absmax(v: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = v.reshape(-1)
    pad = (-flat.numel()) % blocksize
    return F.pad(flat.abs(), (0, pad)).reshape(-1, blocksize).amax(dim=1)


@given(E=st.integers(1, 3), d1=st.integers(1, 9), d2=st.integers(1, 9), seed=st.integers(0, 2**16))
@example(E=3, d1=5, d2=7, seed=0)  # 105 elements: odd numel (padding nibble), partial last block
@example(E=1, d1=8, d2=8, seed=1)  # exactly one block
def test_nf4_merge_is_nearest_code_of_merged_weight(E, d1, d2, seed):
    """merge_into_nf4 = requant(dequant(W) + ΔW): new absmax is the block max of |W + ΔW| (fp32), and every element
    decodes to the NF4 grid point (code · absmax') nearest to W + ΔW. Slack 4·2^-24·absmax' covers fp32 rounding
    of the division and product; dtype and blocksize are kept."""
    g = torch.Generator().manual_seed(seed)
    bs = 64
    W = torch.randn(E, d1, d2, generator=g).to(torch.bfloat16)
    packed, state = quantize_nf4(W, blocksize=bs)
    f = factors_for((E, d1, d2), 1, Orientation.STANDARD, STRIDE_E, g, scaling=0.1)
    delta = factors_delta(f, E, torch.float32)
    p2, s2 = merge_into_nf4(packed, state, delta)
    assert (s2.blocksize, s2.dtype, s2.shape, s2.nested) == (bs, torch.bfloat16, W.shape, None)
    v = (dequantize_nf4(packed, state, torch.float32) + delta).reshape(-1)
    amax = blockwise_absmax(v, bs)
    assert torch.equal(s2.absmax, amax)
    per_elem = amax.repeat_interleave(bs)[: v.numel()]
    grid = NF4_CODE[None, :] * per_elem[:, None]  # [n, 16]
    best = (grid - v[:, None]).abs().min(dim=1).values
    got = dequantize_nf4(p2, s2, torch.float32).reshape(-1)
    assert ((got - v).abs() <= best + 4 * 2**-24 * per_elem).all()
    assert ((got - v).abs() <= NF4_HALF_GAP * per_elem * (1 + 2**-20)).all()


def test_nf4_zero_delta_merge_is_lossless_and_double_quant_is_kept():
    """Requantizing an NF4 tensor's own dequantization gives the same codes and absmax (the block max decodes to ±1·absmax
    exactly); with double quant the nested setting and blocksize survive and the result stays within the NF4 bound."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(2, 24, 40, generator=g)
    packed, state = quantize_nf4(W, blocksize=64)
    p2, s2 = merge_into_nf4(packed, state, torch.zeros(W.shape))
    assert torch.equal(p2, packed) and torch.equal(s2.absmax, state.absmax)

    packed, state = quantize_nf4(W, blocksize=64, double_quant=True)
    delta = torch.randn(W.shape, generator=g) * 0.05
    p2, s2 = merge_into_nf4(packed, state, delta)
    assert s2.nested is not None and s2.absmax is None and s2.blocksize == 64
    v = dequantize_nf4(packed, state) + delta
    true_amax = blockwise_absmax(v, 64)
    deq_amax = absmax_of(s2)
    # element error <= nearest-code error on the true absmax + the double-quant error of its absmax (|code| <= 1)
    bound = (NF4_HALF_GAP * true_amax + (deq_amax - true_amax).abs()).repeat_interleave(64)[: v.numel()] * (1 + 2**-20)
    assert ((dequantize_nf4(p2, s2) - v).abs().reshape(-1) <= bound).all()


@given(E=st.integers(1, 3), R=st.integers(1, 11), C=st.integers(1, 13), seed=st.integers(0, 2**16))
@example(E=3, R=10, C=13, seed=0)  # partial edge blocks in both dims
@example(E=1, R=4, C=8, seed=1)  # exactly one block
def test_fp8_merge_requantizes_with_new_block_scales(E, R, C, seed):
    """merge_into_fp8 = requant(q·s + ΔW) with a NEW scale per block: s' = max|W + ΔW|_block / 448 exactly, and each
    element within e4m3fn rounding of W + ΔW: half an ulp, 2^-4 relative (3 mantissa bits), or half the smallest
    subnormal 2^-10·s' near zero; bound 2^-4·|v| + 2^-10·s' (+ 2^-22·|v| for the fp32 division)."""
    g = torch.Generator().manual_seed(seed)
    block = (4, 8)
    q, s = quantize_fp8_block(torch.randn(E, R, C, generator=g), block)
    f = factors_for((E, R, C), 2, Orientation.SWAPPED, CONTIGUOUS_R, g, scaling=0.25, dtype=torch.float32)
    delta = factors_delta(f, E, torch.float32)
    q2, s2 = merge_into_fp8(q, s, delta, block)
    assert q2.dtype == torch.float8_e4m3fn and q2.shape == q.shape and s2.shape == s.shape
    v = dequantize_fp8(q, s, block) + delta
    gr, gc = -(-R // 4), -(-C // 8)
    tiles = F.pad(v.abs(), (0, gc * 8 - C, 0, gr * 4 - R)).reshape(E, gr, 4, gc, 8)
    assert torch.equal(s2, torch.clamp(tiles.amax(dim=(2, 4)) / 448.0, min=1e-12))
    s_elem = s2.repeat_interleave(4, 1)[:, :R].repeat_interleave(8, 2)[:, :, :C]
    err = (dequantize_fp8(q2, s2, block) - v).abs()
    assert (err <= (2**-4 + 2**-22) * v.abs() + 2**-10 * s_elem).all()


def test_fp8_zero_delta_round_trip_and_16bit_merge():
    """Zero ΔW returns the same codes and scales bitwise (requantizing q·s reproduces q, s); the 16-bit merge rounds
    q·s + ΔW once: |err| <= u·|v| + u·tiny, u = 2^-8 (bf16) / 2^-11 (fp16), u·tiny being half the subnormal spacing
    (fp16 subnormals start at 6.1e-5, reached by small merged weights)."""
    g = torch.Generator().manual_seed(5)
    block = (4, 8)
    q, s = quantize_fp8_block(torch.randn(2, 12, 16, generator=g), block)
    q2, s2 = merge_into_fp8(q, s, torch.zeros(q.shape), block)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    delta = torch.randn(q.shape, generator=g, dtype=F64) * 0.01
    v = dequantize_fp8(q, s, block, dtype=F64) + delta
    for dtype in (torch.bfloat16, torch.float16):
        u, tiny = torch.finfo(dtype).eps / 2, torch.finfo(dtype).smallest_normal
        got = merge_fp8_to_bf16(q, s, delta, block, out_dtype=dtype)
        assert got.dtype == dtype
        assert ((got.double() - v).abs() <= u * v.abs() + u * tiny).all()


@pytest.mark.skipif(UE8M0_DTYPE is None, reason=f"torch {torch.__version__} has no float8_e8m0fnu")
def test_fp8_merge_keeps_ue8m0_scale_format():
    g = torch.Generator().manual_seed(6)
    q, s = quantize_fp8_block(torch.randn(2, 8, 8, generator=g), (4, 4), ue8m0=True)
    q2, s2 = merge_into_fp8(q, s, torch.randn(q.shape, generator=g) * 0.1, (4, 4))
    assert s2.dtype == UE8M0_DTYPE and q2.dtype == torch.float8_e4m3fn
