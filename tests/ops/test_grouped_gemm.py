"""Triton grouped GEMM / LoRA / layer kernels against `reference/` on random inputs (CPU: TRITON_INTERPRET=1).

Error bounds (relative Frobenius norm ‖out − ref‖ / ‖ref‖, the reference in float64 on the SAME quantized values):

| where | inputs | bound | why |
|---|---|---|---|
| CPU interpreter | fp32 x, fp32 dots | 1e-5 | fp32 accumulation only (the format's dequantization is exact in fp32) |
| CPU interpreter, fp8_block | fp32 x, e4m3 grid emulated in fp32 | 1e-4 | activation codes equal the reference's (ties to even) |
| GPU (tests/ops/test_gpu.py) | bf16 x, bf16 / fp8 tensor-core dots | 1e-2 | bf16 rounding of operands and of the output (≈ 2e-3 typical) |

Shapes are small (a few programs) so the whole module runs in seconds on 2 cores; every case has at least one expert
with no rows, counts that are not multiples of the tile, and a LoRA rank that is not a multiple of 8.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter tests (TRITON_INTERPRET=1); on a GPU, tests/ops/test_gpu.py runs instead",
                allow_module_level=True)

pytest.importorskip("triton")

from impl.ops.combine import combine, inverse_order  # noqa: E402
from impl.ops.glue import gather_rows, silu_mul  # noqa: E402
from impl.ops.grouped_gemm import (  # noqa: E402
    FMT_BF16,
    FMT_FP8,
    FMT_NF4,
    GroupedWeight,
    TileConfig,
    grouped_mm,
    quantize_act_1x128,
)
from impl.ops.grouped_lora import grouped_linear  # noqa: E402
from impl.ops.grouped_wgrad import grouped_wgrad  # noqa: E402
from impl.ops.moe_layer import moe_layer, sort_pairs  # noqa: E402
from impl.ops.nf4_dequant import nf4_dequantize  # noqa: E402
from reference import dispatch as rdispatch  # noqa: E402
from reference import fp8 as rfp8  # noqa: E402
from reference import nf4 as rnf4  # noqa: E402
from reference.experts import fused_linear_experts  # noqa: E402
from reference.layout import Orientation  # noqa: E402
from reference.lora import STRIDE_E, LoraFactors, lora_forward_delta  # noqa: E402

pytestmark = [pytest.mark.triton]

CPU_TOL = 1e-5
FP8_CPU_TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def loop_ref(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, trans: bool) -> torch.Tensor:
    """float64 per-expert loop: rows of expert e times W_e.T (or W_e)."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        we = w[e].double()
        out.append(x[start:end].double() @ (we if trans else we.T))
        start = end
    return torch.cat(out)


def nf4_weight(E: int, R: int, C: int, double_quant: bool = False) -> tuple[GroupedWeight, torch.Tensor]:
    w = torch.randn(E, R, C) * 0.05
    packed, st = rnf4.quantize_nf4(w, 64, double_quant=double_quant)
    gw = GroupedWeight(FMT_NF4, (E, R, C), packed, rnf4.absmax_of(st), rnf4.NF4_CODE.clone())
    return gw, rnf4.dequantize_nf4(packed, st, torch.float64).reshape(E, R, C)


def fp8_weight(E: int, R: int, C: int) -> tuple[GroupedWeight, torch.Tensor]:
    w = torch.randn(E, R, C)
    q, s = rfp8.quantize_fp8_block(w, (128, 128))
    return GroupedWeight(FMT_FP8, (E, R, C), q, s), rfp8.dequantize_fp8(q, s, (128, 128), torch.float64)


COUNTS = [5, 0, 19, 3, 0, 9]  # E = 6; two empty experts; counts not multiples of BM


@pytest.mark.parametrize("trans", [False, True])
def test_dense_grouped_mm(trans):
    torch.manual_seed(1)
    E, R, C = len(COUNTS), 80, 72
    offs = offsets_of(COUNTS)
    S = int(offs[-1]) + 3  # rows past offsets[-1] are not touched
    w = torch.randn(E, R, C)
    x = torch.randn(S, R if trans else C)
    out = torch.full((S, C if trans else R), float("nan"))
    grouped_mm(x, GroupedWeight(FMT_BF16, (E, R, C), w), offs, trans=trans, out=out, config=TileConfig(16, 32, 32))
    n = int(offs[-1])
    assert rel(out[:n], loop_ref(x, w, offs, trans)) < CPU_TOL
    assert torch.isnan(out[n:]).all()


@pytest.mark.parametrize("trans,cfg", [(False, TileConfig(16, 32, 64, nf4_mode=0)),
                                       (False, TileConfig(16, 64, 128, nf4_mode=0)),
                                       (False, TileConfig(16, 32, 128, nf4_mode=1)),
                                       (False, TileConfig(16, 64, 64, nf4_mode=2)),
                                       (False, TileConfig(16, 64, 64, nf4_mode=2, nf4_select=1)),
                                       (True, TileConfig(16, 64, 32, nf4_select=1)),
                                       (True, TileConfig(16, 64, 32)), (True, TileConfig(32, 128, 64))])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_grouped_mm(trans, cfg, double_quant):
    torch.manual_seed(2)
    E, R, C = len(COUNTS), 72, 192  # R not a multiple of any tile; C = 3 NF4 blocks
    gw, wd = nf4_weight(E, R, C, double_quant)
    offs = offsets_of(COUNTS)
    x = torch.randn(int(offs[-1]), R if trans else C)
    out = grouped_mm(x, gw, offs, trans=trans, config=cfg)
    assert rel(out, loop_ref(x, wd, offs, trans)) < CPU_TOL


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("prequant", [False, True])
def test_fp8_block_grouped_mm(trans, prequant):
    torch.manual_seed(3)
    E, R, C = len(COUNTS), 200, 256  # R: a partial 128-block
    gw, wd = fp8_weight(E, R, C)
    offs = offsets_of(COUNTS)
    x = torch.randn(int(offs[-1]), R if trans else C) * 3
    out = grouped_mm(x, gw, offs, trans=trans, config=TileConfig(16, 64, 128), act_prequant=prequant)
    # reference: 1x128 activation quant (reference.fp8), dequantized, times the dequantized weight, in float64
    xq, xs = rfp8.quantize_act_groups(x, 128)
    xd = rfp8.dequantize_fp8(xq, xs, (1, 128), torch.float64)
    assert rel(out, loop_ref(xd, wd, offs, trans)) < FP8_CPU_TOL


def test_act_quant_1x128_matches_reference():
    torch.manual_seed(8)
    x = torch.randn(37, 200) * 5
    q, s = quantize_act_1x128(x)
    rq, rs = rfp8.quantize_act_groups(x, 128)
    assert torch.equal(s, rs)
    assert torch.equal(q.float(), rq.float())  # round-half-even emulated without libdevice: ties included
    t = torch.tensor([248.0, -248.0, 232.0, -232.0, 17.0, -9.0, 1.5 * 2**-9, -2.5 * 2**-9] * 16)  # ties, both signs
    t[0] = 448.0  # scale 1: every entry above is an exact e4m3 rounding tie
    q, s = quantize_act_1x128(t[None, :])
    rq, rs = rfp8.quantize_act_groups(t[None, :], 128)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())


def test_fp8_block_rejects_bad_tile():
    gw, _ = fp8_weight(2, 128, 128)
    with pytest.raises(ValueError, match="BK == 128"):
        grouped_mm(torch.randn(4, 128), gw, offsets_of([2, 2]), config=TileConfig(16, 64, 64))


def test_shape_errors_name_shapes():
    gw, _ = nf4_weight(2, 64, 128)
    with pytest.raises(ValueError, match=r"\(4, 100\)"):
        grouped_mm(torch.randn(4, 100), gw, offsets_of([2, 2]))
    with pytest.raises(ValueError, match="int32"):
        grouped_mm(torch.randn(4, 128), gw, torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        GroupedWeight(FMT_NF4, (2, 64, 96), torch.zeros(2 * 64 * 48, dtype=torch.uint8), torch.zeros(192),
                      rnf4.NF4_CODE)


def test_nf4_refuses_2pow31_elements():
    """NF4 tensors of >= 2^31 elements gave wrong results on the GPU (DeepSeek-V3 shapes): refused, not silent."""
    with pytest.raises(ValueError, match="2\\^31"):
        GroupedWeight(FMT_NF4, (256, 4096, 7168), torch.zeros(2, dtype=torch.uint8), torch.zeros(1), rnf4.NF4_CODE)
    with pytest.raises(ValueError, match="2\\^31"):
        nf4_dequantize(torch.zeros(2, dtype=torch.uint8), torch.zeros(1), rnf4.NF4_CODE, (256, 2048, 7168))


def test_nf4_dequantize_bitwise():
    torch.manual_seed(4)
    w = torch.randn(3, 40, 128)
    packed, st = rnf4.quantize_nf4(w, 64, double_quant=True)
    ours = nf4_dequantize(packed, rnf4.absmax_of(st), rnf4.NF4_CODE, tuple(w.shape), torch.float32)
    assert torch.equal(ours, rnf4.dequantize_nf4(packed, st, torch.float32).reshape(w.shape))


def test_grouped_wgrad_empty_experts():
    torch.manual_seed(5)
    offs = offsets_of(COUNTS)
    S = int(offs[-1])
    p, q = torch.randn(S, 5), torch.randn(S, 40)
    out = grouped_wgrad(p, q, offs, scale=0.5)
    start = 0
    for e, end in enumerate(offs.tolist()):
        ref = 0.5 * p[start:end].double().T @ q[start:end].double()
        if end == start:
            assert torch.equal(out[e], torch.zeros_like(out[e]))
        else:
            assert rel(out[e], ref) < CPU_TOL
        start = end


def _peft_factors(E: int, r: int, R: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r * E, C) * 0.3, torch.randn(R, r * E) * 0.3


@pytest.mark.parametrize("fmt,policy", [(FMT_BF16, "auto"), (FMT_NF4, "fused"), (FMT_NF4, "dequant")])
def test_grouped_linear_lora_fwd_bwd(fmt, policy):
    """Forward and all three gradients (x, lora_A, lora_B) against float64 autograd through reference.lora."""
    torch.manual_seed(6)
    E, R, C, r, s = len(COUNTS), 72, 128, 5, 0.75  # rank 5: not a multiple of 8
    if fmt == FMT_NF4:
        gw, wd = nf4_weight(E, R, C)
    else:
        wd = torch.randn(E, R, C).double()
        gw = GroupedWeight(FMT_BF16, (E, R, C), wd.float())
    offs = offsets_of(COUNTS)
    S = int(offs[-1])
    A, B = _peft_factors(E, r, R, C)
    x = torch.randn(S, C)
    dy = torch.randn(S, R)

    xk, Ak, Bk = (t.clone().requires_grad_(True) for t in (x, A, B))
    y = grouped_linear(xk, gw, offs, Ak, Bk, s, nf4_policy=policy)
    y.backward(dy)

    x64, A64, B64 = (t.double().requires_grad_(True) for t in (x, A, B))
    y64 = loop_ref(x64, wd, offs, False) + lora_forward_delta(
        x64, A64, B64, None, E, s, orientation=Orientation.SWAPPED, expert_layout="fused_linear", convention=STRIDE_E,
        offsets=offs)
    y64.backward(dy.double())
    assert rel(y, y64) < CPU_TOL
    assert rel(xk.grad, x64.grad) < CPU_TOL
    assert rel(Ak.grad, A64.grad) < CPU_TOL
    assert rel(Bk.grad, B64.grad) < CPU_TOL


@pytest.mark.parametrize("w_grad", [False, True])
def test_combine_fwd_bwd(w_grad):
    torch.manual_seed(9)
    T, k, H, E = 9, 3, 40, 5
    idx = torch.randint(0, E, (T, k))
    order, token_idx, _ = sort_pairs(idx, E)
    y = torch.randn(T * k, H, requires_grad=True)
    w = torch.rand(T, k, requires_grad=w_grad)
    out = combine(y, w, order, token_idx)
    d = rdispatch.sort_by_expert(idx, E)
    y64, w64 = y.detach().double().requires_grad_(True), w.detach().double().requires_grad_(w_grad)
    ref = rdispatch.combine(y64, d, w64, T, accum_dtype=torch.float64)
    assert rel(out, ref) < CPU_TOL
    dout = torch.randn(T, H)
    out.backward(dout)
    ref.backward(dout.double())
    assert rel(y.grad, y64.grad) < CPU_TOL
    if w_grad:
        assert rel(w.grad, w64.grad) < CPU_TOL


def test_glue_fwd_bwd():
    """gather_rows and silu_mul (and their backward) against torch autograd in float64."""
    torch.manual_seed(10)
    T, k, H, E, I = 7, 2, 24, 4, 40
    idx = torch.randint(0, E, (T, k))
    order, token_idx, _ = sort_pairs(idx, E)
    x = torch.randn(T, H, requires_grad=True)
    xs = gather_rows(x, token_idx, inverse_order(order), k)
    d = torch.randn_like(xs)
    xs.backward(d)
    x64 = x.detach().double().requires_grad_(True)
    x64[token_idx].backward(d.double())
    assert torch.equal(xs, x.detach()[token_idx])
    assert rel(x.grad, x64.grad) < CPU_TOL
    h = torch.randn(T * k, 2 * I, requires_grad=True)
    a = silu_mul(h)
    da = torch.randn_like(a)
    a.backward(da)
    h64 = h.detach().double().requires_grad_(True)
    a64 = torch.nn.functional.silu(h64[:, :I]) * h64[:, I:]
    a64.backward(da.double())
    assert rel(a, a64) < CPU_TOL
    assert rel(h.grad, h64.grad) < CPU_TOL


@pytest.mark.parametrize("glue", ["fast", "stock"])
def test_moe_layer_matches_reference(glue):
    """Whole layer (NF4 base + LoRA on both projections) against reference.experts.fused_linear_experts in float64."""
    torch.manual_seed(7)
    E, H, I, T, k, r = 6, 128, 64, 7, 2, 3
    gu, gu_d = nf4_weight(E, 2 * I, H)
    dn, dn_d = nf4_weight(E, H, I)
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    w, idx = torch.softmax(logits, -1).topk(k, dim=-1)
    idx[0, 0] = 0  # make sure expert 5 gets nothing for a few seeds is not guaranteed; keep routing random otherwise
    A1, B1 = _peft_factors(E, r, 2 * I, H)
    A2, B2 = _peft_factors(E, r, H, I)
    out = moe_layer(x, idx, w, gu, dn, lora={"gate_up": (A1, B1, 0.5), "down": (A2, B2, 0.5)},
                    glue=glue)
    lora = {"gate_up": LoraFactors(A1.double(), B1.double(), 0.5, Orientation.SWAPPED),
            "down": LoraFactors(A2.double(), B2.double(), 0.5, Orientation.SWAPPED)}
    ref = fused_linear_experts(x.double(), idx, w.double(), gu_d, dn_d, "silu", lora=lora)
    assert rel(out, ref) < CPU_TOL
