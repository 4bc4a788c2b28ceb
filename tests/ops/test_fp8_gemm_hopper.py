"""The Hopper block-FP8 grouped GEMM (`impl.ops.fp8_gemm_hopper`) against `reference.fp8` on the same quantized values.

Error bounds (relative Frobenius norm ‖y − ref‖ / ‖ref‖; ref = float64 per-expert loop over the activation codes of
`reference.fp8.quantize_act_groups(x, 128)` and the weight codes of `quantize_fp8_block(w, (128, 128))`, dequantized):

| where | inputs | bound | why |
|---|---|---|---|
| CPU interpreter (TRITON_INTERPRET=1) | fp32 x and output, fp32 dots | 1e-4 | the activation codes equal the reference's bit for bit (`test_grouped_gemm.py::test_act_quant_1x128_matches_reference`), so only fp32 accumulation and the rescale form's ~2^-24 per K block remain (measured ~5e-8) |
| GPU (marker ``gpu``) | bf16 x and output, e4m3 wgmma | 1e-2 | the bf16 output rounding (~2e-3 typical), as tests/ops/test_gpu.py |

CPU shapes are small (one or two tiles per expert) so the module stays within ~30 s on 2 cores; every fixed case has
empty experts, row counts that are not multiples of the tile and dims that are not multiples of 128 (partial weight
and activation blocks).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from impl.ops.formats import FMT_BF16, FMT_FP8, GroupedWeight
from impl.ops.fp8_gemm_hopper import (  # noqa: E402
    DEFAULT_VARIANT,
    VARIANTS,
    HopperFp8Config,
    fp8_grouped_mm,
    unsupported_reason,
)
from impl.ops.kloop import quantize_act_1x128  # noqa: E402
from reference import fp8 as rfp8  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
GPU = torch.cuda.is_available() and not INTERP
cpu_only = pytest.mark.skipif(not INTERP, reason="CPU-interpreter test (TRITON_INTERPRET=1)")
pytestmark = [pytest.mark.triton]

CPU_TOL = 1e-4
GPU_TOL = 1e-2
COUNTS = [5, 0, 19, 3, 0, 9]  # E = 6: empty experts inside, counts not multiples of BM

# the structural axes of the kernel on CPU-sized tiles: BM 64, BN 128 / 256 (two weight-scale halves), promote and
# rescale, persistent grid-stride (4 programs) and one-tile-per-program grids, tile map and in-tile offsets
# scan, 64-wide accumulator chunks
SMALL = {
    "promote_64x128_scan": HopperFp8Config(64, 128, 4, 3, rescale=False, tile_map=False),
    "rescale_64x256": HopperFp8Config(64, 256, 4, 3, rescale=True),
    "rescale_64x128_persist": HopperFp8Config(64, 128, 4, 3, rescale=True, persistent=True),
    "promote_64x256_c64": HopperFp8Config(64, 256, 4, 3, CH=64),  # four 64-wide chunks, two per weight-scale block
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def offsets_of(counts: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32).to(device)


def fp8_weight(E: int, R: int, C: int, device="cpu") -> tuple[GroupedWeight, torch.Tensor]:
    q, s = rfp8.quantize_fp8_block(torch.randn(E, R, C), (128, 128))
    wd = rfp8.dequantize_fp8(q, s, (128, 128), torch.float64)
    return GroupedWeight(FMT_FP8, (E, R, C), q.to(device), s.to(device)), wd


def reference(x: torch.Tensor, wd: torch.Tensor, offs: torch.Tensor, trans: bool) -> torch.Tensor:
    """float64: rows of expert e (1x128-quantized by `reference.fp8`, dequantized) times W_e.T (or W_e)."""
    xq, xs = rfp8.quantize_act_groups(x.cpu().float(), 128)
    xd = rfp8.dequantize_fp8(xq, xs, (1, 128), torch.float64)
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(xd[start:end] @ (wd[e] if trans else wd[e].T))
        start = end
    return torch.cat(out)


def run_case(counts, R, C, trans, cfg, *, extra_rows=3, x_quant=False, seed=0):
    torch.manual_seed(seed)
    E = len(counts)
    gw, wd = fp8_weight(E, R, C)
    offs = offsets_of(counts)
    n = int(offs[-1])
    x = torch.randn(n + extra_rows, R if trans else C) * 3
    out = torch.full((x.shape[0], C if trans else R), float("nan"))
    xqs = quantize_act_1x128(x) if x_quant else None
    fp8_grouped_mm(x, gw, offs, trans=trans, out=out, config=cfg, x_quant=xqs)
    return out, n, reference(x[:n], wd, offs, trans)


# ----------------------------------------------------------------------------------------------- CPU interpreter


@cpu_only
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("name", list(SMALL))
def test_matches_reference(name, trans):
    # R = 144 and C = 208: partial 128-blocks on both weight axes (the K tail of either orientation, the N edge)
    out, n, ref = run_case(COUNTS, 144, 208, trans, SMALL[name])
    assert rel(out[:n], ref) < CPU_TOL
    assert torch.isnan(out[n:]).all()  # rows past offsets[-1] are not written


@cpu_only
def test_prequantized_x_is_the_same_function():
    cfg = SMALL["rescale_64x256"]
    out_a, n, ref = run_case(COUNTS, 144, 208, False, cfg, x_quant=False, seed=3)
    out_b, _, _ = run_case(COUNTS, 144, 208, False, cfg, x_quant=True, seed=3)
    assert torch.equal(out_a[:n], out_b[:n])
    assert rel(out_b[:n], ref) < CPU_TOL


@cpu_only
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 70), min_size=1, max_size=4), r_blocks=st.integers(1, 16),
       c_blocks=st.integers(1, 16), trans=st.booleans(), rescale=st.booleans())
@example(counts=[37], r_blocks=9, c_blocks=9, trans=False, rescale=True)  # E == 1, R == C = 144
@example(counts=[0, 0, 7], r_blocks=16, c_blocks=8, trans=True, rescale=False)  # empty prefix, 2I == H (256, 128)
@example(counts=[3, 0], r_blocks=1, c_blocks=13, trans=False, rescale=True)  # empty LAST expert, R = 16 < a block
def test_shapes_property(counts, r_blocks, c_blocks, trans, rescale):
    """Any expert counts (empty ones, E == 1) and dims (multiples of 16, the TMA stride rule; partial 128-blocks)."""
    if sum(counts) == 0:
        counts = counts + [1]
    R, C = 16 * r_blocks, 16 * c_blocks
    out, n, ref = run_case(counts, R, C, trans, HopperFp8Config(64, 256 if R > 128 else 128, 4, 3, rescale=rescale))
    assert rel(out[:n], ref) < CPU_TOL
    assert torch.isnan(out[n:]).all()


@cpu_only
def test_all_experts_empty_writes_nothing():
    gw, _ = fp8_weight(3, 128, 128)
    out = torch.full((4, 128), float("nan"))
    fp8_grouped_mm(torch.randn(4, 128), gw, offsets_of([0, 0, 0]), out=out, config=SMALL["promote_64x128_scan"])
    assert torch.isnan(out).all()


@cpu_only
def test_output_dtype_follows_x_or_fp32_out():
    gw, wd = fp8_weight(2, 128, 128)
    offs = offsets_of([3, 4])
    x = torch.randn(7, 128, dtype=torch.bfloat16)
    ref = reference(x, wd, offs, False)
    y = fp8_grouped_mm(x, gw, offs, config=SMALL["promote_64x128_scan"])
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < GPU_TOL  # bf16 output rounding
    y32 = fp8_grouped_mm(x, gw, offs, config=SMALL["promote_64x128_scan"], out=torch.empty(7, 128))
    assert rel(y32, ref) < CPU_TOL  # the unrounded accumulator (what bench/sweep_fp8.py's err_fp32 reads)
    with pytest.raises(ValueError, match="float32"):
        fp8_grouped_mm(x, gw, offs, out=torch.empty(7, 128, dtype=torch.float16))


# ----------------------------------------------------------------------------------------------- guards (any device)


def test_variants_are_valid_configs():
    assert DEFAULT_VARIANT in VARIANTS
    for cfg in VARIANTS.values():
        assert cfg.BN in (128, 256) and cfg.BM in (64, 128)
    with pytest.raises(ValueError, match="BN must be 128 or 256"):
        HopperFp8Config(128, 192)
    with pytest.raises(ValueError, match="BM must be 64 or 128"):
        HopperFp8Config(32, 128)


def test_unaligned_reduction_dim_is_refused_not_padded():
    """TMA needs 16-byte strides: K = 72 e4m3 codes per row is refused with the reason (route to grouped_mm)."""
    gw, _ = fp8_weight(2, 128, 72)
    x = torch.randn(4, 72)
    assert "multiple of 16" in unsupported_reason(x, gw, False)
    with pytest.raises(ValueError, match=r"reduction dim 72 .*use impl.ops.dispatch.grouped_mm"):
        fp8_grouped_mm(x, gw, offsets_of([2, 2]))
    gw_t, _ = fp8_weight(2, 72, 128)  # trans: the reduction runs over R
    assert "reduction dim 72" in unsupported_reason(torch.randn(4, 72), gw_t, True)
    assert unsupported_reason(torch.randn(4, 128), gw_t, False) is None


def test_argument_errors_name_the_cause():
    gw, _ = fp8_weight(2, 128, 128)
    bf = GroupedWeight(FMT_BF16, (2, 128, 128), torch.randn(2, 128, 128))
    with pytest.raises(ValueError, match="is not 'fp8_block'"):
        fp8_grouped_mm(torch.randn(4, 128), bf, offsets_of([2, 2]))
    with pytest.raises(ValueError, match=r"\(4, 100\)"):
        fp8_grouped_mm(torch.randn(4, 100), gw, offsets_of([2, 2]))
    with pytest.raises(ValueError, match="int32"):
        fp8_grouped_mm(torch.randn(4, 128), gw, torch.tensor([2, 4]))
    xq, xs = quantize_act_1x128(torch.randn(4, 128))
    with pytest.raises(ValueError, match="x_quant must be"):
        fp8_grouped_mm(torch.randn(4, 128), gw, offsets_of([2, 2]), x_quant=(xq, xs[:, :0]))
    with pytest.raises(KeyError):
        fp8_grouped_mm(torch.randn(4, 128), gw, offsets_of([2, 2]), config="no_such_variant")


# ----------------------------------------------------------------------------------------------- GPU, real shapes


_GPU_CASES: dict = {}


def _gpu_case(shape: str, trans: bool):
    """(gw, offs, x, fp32 reference) per (shape, trans), built once: 2 G-element weights take a second each."""
    if (shape, trans) not in _GPU_CASES:
        E, R, C, k = {"qwen_gate_up": (128, 1536, 2048, 8), "qwen_down": (128, 2048, 768, 8),
                      "gpt_oss_gate_up": (128, 5760, 2880, 4)}[shape]
        torch.manual_seed(0)
        q, s = rfp8.quantize_fp8_block(torch.randn(E, R, C, device="cuda") * 0.02, (128, 128))
        idx = torch.randn(4096, E, device="cuda").topk(k, dim=-1).indices.reshape(-1)
        counts = torch.zeros(E, dtype=torch.int64, device="cuda").scatter_add_(0, idx, torch.ones_like(idx))
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(idx.numel(), R if trans else C, device="cuda", dtype=torch.bfloat16)
        # the reference on CPU-computed codes: torch's CUDA `tensor / scalar` is a reciprocal multiply (test_gpu.py)
        xq, xs = (t.cuda() for t in rfp8.quantize_act_groups(x.cpu(), 128))
        xd = rfp8.dequantize_fp8(xq, xs, (1, 128), torch.float32)
        ref, start = torch.empty((x.shape[0], C if trans else R), device="cuda"), 0
        for e, end in enumerate(offs.tolist()):
            wd = rfp8.dequantize_fp8(q[e], s[e], (128, 128), torch.float32)
            ref[start:end] = xd[start:end] @ (wd if trans else wd.T)
            start = end
        _GPU_CASES[(shape, trans)] = (GroupedWeight(FMT_FP8, (E, R, C), q, s), offs, x, ref)
    return _GPU_CASES[(shape, trans)]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device (and not the interpreter)")
@pytest.mark.parametrize("variant,trans", [(v, False) for v in VARIANTS] + [
    (DEFAULT_VARIANT, True), ("t64x128_promote", True), ("t128x256_rescale", True)])  # trans: BM 64/128, BN 128/256
@pytest.mark.parametrize("shape", ["qwen_gate_up", "qwen_down", "gpt_oss_gate_up"])
def test_real_shapes_gpu(variant, shape, trans):
    """Qwen3-30B-A3B (E 128, H 2048, I 768) and GPT-OSS-120B-like (E 128, H = I = 2880: a partial 128-block on every
    axis) expert GEMMs at 4096 tokens x top-k rows: every variant forward, three of them in the input-gradient
    orientation, vs an fp32 loop on the same codes; the output is poisoned first and every row < offsets[-1] must be
    written. (bench/sweep_fp8.py checks every variant at 16k tokens on all three models too.)"""
    gw, offs, x, ref = _gpu_case(shape, trans)
    out = torch.full(ref.shape, float("nan"), device="cuda", dtype=torch.bfloat16)
    fp8_grouped_mm(x, gw, offs, trans=trans, out=out, config=variant)
    assert rel(out, ref) < GPU_TOL
