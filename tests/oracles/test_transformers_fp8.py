"""Oracle: transformers' finegrained FP8 quantize / dequantize (CPU, pure torch) against reference/fp8.py.

Smallest upstream piece that does the math, per installed version:
- 4.57.6: ``FineGrainedFP8HfQuantizer.create_quantized_param`` into an ``FP8Linear`` (no dequant op exists);
- 5.x: the conversion ops ``Fp8Quantize`` / ``Fp8Dequantize`` (``transformers.integrations.finegrained_fp8``).

Upstream quantizes with the reciprocal: ``scale = 448 / amax``, ``q = e4m3(w * scale)``, ``scale_inv = 1 / scale``;
the reference divides: ``scale_inv = amax / 448``, ``q = e4m3(w / scale_inv)``. Those differ by at most one fp32 ulp
in ``scale_inv`` and, rarely, by one e4m3 step in a code; the tests pin exactly that.
"""

from __future__ import annotations

import re

import pytest
import torch

from reference import fp8

transformers = pytest.importorskip("transformers", reason="transformers is not installed in this environment")
ffp8 = pytest.importorskip(
    "transformers.integrations.finegrained_fp8",
    reason=f"transformers {transformers.__version__} has no integrations.finegrained_fp8",
)
from transformers import FineGrainedFP8Config  # noqa: E402
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer  # noqa: E402

pytestmark = pytest.mark.oracle

TF = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
HAS_OPS = hasattr(ffp8, "Fp8Quantize")  # 5.x conversion ops
HAS_UE8M0 = "scale_fmt" in FineGrainedFP8Config.__init__.__code__.co_varnames


@pytest.fixture(autouse=True)
def _record_upstream(record_property):
    record_property("upstream", f"transformers=={transformers.__version__}")


def _quantizer(block=(128, 128), **cfg) -> FineGrainedFP8HfQuantizer:
    return FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=block, **cfg), pre_quantized=False)


def tf_quantize(w: torch.Tensor, block=(128, 128), **cfg) -> dict[str, torch.Tensor]:
    """transformers' quantization of ``w`` as {"weight": q, "weight_scale_inv": s} (or what the op returned)."""
    if HAS_OPS:
        out = ffp8.Fp8Quantize(_quantizer(block, **cfg)).convert({"m.weight": [w]})
        return {k.removeprefix("m."): v for k, v in out.items()}
    rows, cols = w.shape
    module = torch.nn.Module()
    module.lin = ffp8.FP8Linear(cols, rows, block_size=block)
    _quantizer(block, **cfg).create_quantized_param(module, w, "lin.weight", "cpu")
    return {"weight": module.lin.weight.data, "weight_scale_inv": module.lin.weight_scale_inv.data}


def tf_dequantize(q: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    hq = _quantizer(block)
    if TF >= (5, 8):
        return ffp8.Fp8Dequantize(hq).convert({"weight": q, "weight_scale_inv": s})["weight"]
    return ffp8.Fp8Dequantize(hq).convert({"weight$": [q], "weight_scale_inv": [s]}, full_layer_name="w")["w"]


def _weights(shape, seed, zero_tile=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape[:-2] + (1, 1), generator=g).float())
    if zero_tile:
        w[..., :128, :128] = 0
    return w


def _upstream_scale_inv(w: torch.Tensor) -> torch.Tensor:
    """The documented upstream formula (transformers.md §5.3), from an independent per-tile amax: fl(1/fl(448/amax))."""
    tiles = w.reshape(*w.shape[:-2], w.shape[-2] // 128, 128, w.shape[-1] // 128, 128)
    amax = tiles.abs().amax(dim=(-3, -1))
    return 1.0 / (448.0 / amax)


def _ordinal(q: torch.Tensor) -> torch.Tensor:
    # e4m3fn byte = sign bit + 7-bit magnitude code, monotone in |value|: +-code is the value's rank (+0 == -0)
    u = q.view(torch.uint8).int()
    return torch.where(u >= 0x80, -(u & 0x7F), u & 0x7F)


def _codes_within_one_step(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((_ordinal(a) - _ordinal(b)).abs() <= 1).all())


@pytest.mark.parametrize("shape", [(256, 384), (3, 256, 256)])
def test_quantize_matches_up_to_the_reciprocal(shape):
    if len(shape) == 3 and not HAS_OPS:
        pytest.skip(f"transformers {transformers.__version__} quantizes 2-D nn.Linear weights only (no fused experts)")
    w = _weights(shape, 0)
    out = tf_quantize(w)
    q_tf, s_tf = out["weight"], out["weight_scale_inv"]
    q, s = fp8.quantize_fp8_block(w)
    assert q_tf.dtype == torch.float8_e4m3fn and q_tf.shape == w.shape
    assert s_tf.dtype == torch.float32 and s_tf.shape == s.shape
    assert torch.equal(s_tf, _upstream_scale_inv(w))
    # fl(1/fl(448/a)) vs fl(a/448): each is the exact a/448 within 1.5 ulp, so they differ by at most one ulp
    assert bool(((s_tf - s).abs() <= s * 2.0**-23).all())
    assert _codes_within_one_step(q_tf, q)
    n_diff = int((q_tf.view(torch.uint8) != q.view(torch.uint8)).sum())
    assert n_diff <= q.numel() * 1e-4, n_diff  # observed 2 in 7.9M codes; only ties moved by a 1-ulp scale change


@pytest.mark.skipif(not HAS_OPS, reason=f"transformers {transformers.__version__}: zero tiles become NaN (finding)")
def test_zero_tile_scale_is_one_upstream_eps_in_reference():
    w = _weights((256, 256), 1, zero_tile=True)
    out = tf_quantize(w)
    q, s = fp8.quantize_fp8_block(w)
    assert float(out["weight_scale_inv"][0, 0]) == 1.0  # 5.x: "keep zeros stable"
    assert float(s[0, 0]) == float(torch.tensor(fp8.DEFAULT_EPS, dtype=torch.float32))
    assert bool(
        (out["weight"][:128, :128].view(torch.uint8) == 0).all() and (q[:128, :128].view(torch.uint8) == 0).all()
    )


@pytest.mark.skipif(HAS_OPS, reason=f"transformers {transformers.__version__} guards all-zero tiles")
@pytest.mark.xfail(
    strict=True, reason="FINDING: transformers 4.57.6 quantizes an all-zero 128x128 tile to NaN (scale = 448/0 = inf)"
)
def test_finding_457_zero_tile_is_nan():
    """Repro: ``create_quantized_param`` with a weight whose first 128x128 tile is 0 -> weight[:128, :128] is NaN."""
    w = _weights((256, 256), 1, zero_tile=True)
    out = tf_quantize(w)
    assert float(out["weight_scale_inv"][0, 0]) == 0.0  # scale_inv = 1/inf: pinned, so only the NaN can xfail
    assert not torch.isnan(out["weight"].float()).any()


@pytest.mark.skipif(HAS_OPS, reason=f"transformers {transformers.__version__} computes in fp32")
def test_457_computes_in_the_parameter_dtype():
    # documented divergence: a bf16 weight gets a bf16 scale_inv computed in bf16 (reference: fp32 throughout)
    w = _weights((256, 256), 2).bfloat16()
    out = tf_quantize(w)
    assert out["weight_scale_inv"].dtype == torch.bfloat16
    _, s = fp8.quantize_fp8_block(w)
    # bf16 arithmetic: 448/amax and 1/that each round to 8 significant bits -> within 2 * 2^-8 relative
    assert torch.allclose(out["weight_scale_inv"].float(), s, rtol=2 * 2.0**-8, atol=0)


@pytest.mark.skipif(HAS_OPS, reason=f"transformers {transformers.__version__} has no .squeeze() on the scale grid")
def test_457_squeeze_breaks_single_block_rows():
    # documented: the scale grid is .squeeze()d, so a [128, 256] weight's [1, 2] grid becomes [2] and fails to load
    with pytest.raises(RuntimeError, match="size mismatch for weight_scale_inv"):
        tf_quantize(_weights((128, 256), 3))


def test_partial_blocks_are_not_quantized_upstream():
    # the reference quantizes 192x256 with a ceil grid [2, 2]; upstream refuses (<5.8) or passes it through (5.8+)
    w = _weights((192, 256), 4)
    q, s = fp8.quantize_fp8_block(w)
    assert s.shape == (2, 2)
    if TF >= (5, 8):
        out = tf_quantize(w)
        assert set(out) == {"weight"} and out["weight"] is w  # passed through unquantized, no scale
    else:
        with pytest.raises(ValueError, match="divisible by block sizes"):
            tf_quantize(w)


@pytest.mark.skipif(not HAS_OPS, reason=f"transformers {transformers.__version__} has no Fp8Dequantize")
def test_dequantize_exact_grid_matches():
    w = _weights((2, 256, 384), 5)
    q, s = fp8.quantize_fp8_block(w)
    assert torch.equal(tf_dequantize(q, s).reshape(w.shape), fp8.dequantize_fp8(q, s))


@pytest.mark.skipif(
    not HAS_OPS or TF >= (5, 8), reason=f"transformers {transformers.__version__}: see the 5.8+ finding"
)
def test_dequantize_partial_grid_raises_before_58():
    q, s = fp8.quantize_fp8_block(_weights((192, 256), 6))
    with pytest.raises(ValueError, match="divisible"):
        tf_dequantize(q, s)


@pytest.mark.skipif(TF < (5, 8), reason=f"transformers {transformers.__version__} refuses partial grids")
@pytest.mark.xfail(
    strict=True,
    reason="FINDING: transformers>=5.8 Fp8Dequantize infers the block as rows // scale_rows; a 192-row weight with "
    "128-blocks (grid [2, 2]) is read with 96-row blocks, so rows 96-127 get the second block's scale, silently",
)
def test_finding_58_partial_grid_dequant_is_misread():
    """Repro::

    q, s = reference.fp8.quantize_fp8_block(torch.randn(192, 256))  # s: [2, 2], block 128
    Fp8Dequantize(hq).convert({"weight": q, "weight_scale_inv": s})["weight"]  # rows 96..127 use s[1]
    """
    w = _weights((192, 256), 7)
    q, s = fp8.quantize_fp8_block(w)
    ref = fp8.dequantize_fp8(q, s, block=(128, 128))
    out = tf_dequantize(q, s)
    # pin the exact misread: it equals the reference read with a 96-row block
    assert torch.equal(out.float(), fp8.dequantize_fp8(q, s, block=(96, 128)))
    assert torch.equal(out[:96], ref[:96]) and torch.equal(out[128:], ref[128:])
    assert torch.equal(out, ref)


@pytest.mark.skipif(not HAS_OPS, reason=f"transformers {transformers.__version__} has no Fp8Quantize op")
@pytest.mark.xfail(
    condition=(5, 0) <= TF < (5, 8),
    strict=True,
    reason="FINDING: transformers 5.0-5.7 Fp8Quantize.convert takes value[0]: a fused experts tensor [E, R, C] passed "
    "as a bare tensor (not a one-element list) is quantized as expert 0 only (the expert-0 bug)",
)
def test_fused_experts_tensor_is_quantized_whole():
    """Repro (5.0)::

    out = Fp8Quantize(hq).convert({"experts.gate_up_proj": torch.randn(4, 256, 256)})
    out["experts.gate_up_proj"].shape  # torch.Size([256, 256]): experts 1..3 are gone
    """
    w = _weights((4, 256, 256), 8)
    out = ffp8.Fp8Quantize(_quantizer()).convert({"experts.gate_up_proj": w})
    q, s = fp8.quantize_fp8_block(w)
    if TF < (5, 8):  # pin the exact failure
        assert out["experts.gate_up_proj"].shape == w.shape[1:]
        assert _codes_within_one_step(out["experts.gate_up_proj"], q[0])
    assert out["experts.gate_up_proj"].shape == w.shape
    assert _codes_within_one_step(out["experts.gate_up_proj"], q)
    assert out["experts.gate_up_proj_scale_inv"].shape == s.shape


@pytest.mark.skipif(not HAS_UE8M0, reason=f"transformers {transformers.__version__} has no scale_fmt='ue8m0'")
def test_ue8m0_matches():
    w = _weights((2, 256, 384), 9, zero_tile=True)
    out = tf_quantize(w, scale_fmt="ue8m0")
    q, s = fp8.quantize_fp8_block(w, ue8m0=True)
    s_tf = out["weight_scale_inv"]
    assert s_tf.dtype == s.dtype == torch.float8_e8m0fnu
    nonzero = w.reshape(2, 2, 128, 3, 128).abs().amax(dim=(-3, -1)) > 0
    # a power of two divides exactly, so w * (1/s) == w / s: with equal scales the codes are identical
    assert torch.equal(s_tf.float()[nonzero], s.float()[nonzero])
    assert torch.equal(out["weight"].view(torch.uint8), q.view(torch.uint8))
    # zero tiles: upstream 1.0, reference round_up_pow2(eps) = 2^-39; codes 0 either way
    assert bool((s_tf.float()[~nonzero] == 1.0).all()) and bool((s.float()[~nonzero] == 2.0**-39).all())
