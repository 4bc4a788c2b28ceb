"""The NF4 decode kernel (`impl.ops.nf4_decode`) against a float64 per-expert loop on the SAME dequantized values
(`reference.nf4`), on CPU under TRITON_INTERPRET=1 with fp32 dots.

Bound: relative Frobenius norm 1e-5 (fp32 accumulation only; the dequantization ``code[q] * absmax`` is exact in fp32
and the split-K partials are summed in fp32). Every case has empty experts, counts that are not multiples of BM, a
reduction length that the split does not divide evenly, and (with LoRA) a rank that is not a multiple of 8.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter tests (TRITON_INTERPRET=1); on a GPU, tests/ops/test_gpu.py runs instead",
                allow_module_level=True)

pytest.importorskip("triton")

from impl.ops.formats import FMT_NF4, GroupedWeight  # noqa: E402
from impl.ops.nf4_decode import DecodeConfig, default_decode_config, nf4_decode_mm  # noqa: E402
from reference import nf4 as rnf4  # noqa: E402

pytestmark = [pytest.mark.triton]

CPU_TOL = 1e-5
COUNTS = [5, 0, 19, 3, 0, 1]  # E = 6: empty experts, one expert over one BM=16 tile, a single-row expert


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def nf4_weight(E: int, R: int, C: int, double_quant: bool) -> tuple[GroupedWeight, torch.Tensor]:
    w = torch.randn(E, R, C) * 0.05
    packed, st = rnf4.quantize_nf4(w, 64, double_quant=double_quant)
    gw = GroupedWeight(FMT_NF4, (E, R, C), packed, rnf4.absmax_of(st), rnf4.NF4_CODE.clone())
    return gw, rnf4.dequantize_nf4(packed, st, torch.float64).reshape(E, R, C)


def loop_ref(x, wd, offs, la=None, lb=None, s=1.0):
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        y = x[start:end].double() @ wd[e].T
        if la is not None:
            y = y + s * la[start:end].double() @ lb[e].double()
        out.append(y)
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("cfg", [
    DecodeConfig(BM=16, BN=32, BK=64, SPLIT=1),
    DecodeConfig(BM=16, BN=64, BK=128, SPLIT=2),  # 5 K tiles of 64 in 3 tiles of 128 over 2 splits (one partial)
    DecodeConfig(BM=32, BN=16, BK=64, SPLIT=3),  # 5 tiles over 3 splits of 2 iterations, the last one short
    DecodeConfig(BM=16, BN=32, BK=128, SPLIT=2, LUT=1),
])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_decode_matches_reference(cfg, double_quant):
    torch.manual_seed(7)
    E, R, C = len(COUNTS), 72, 320  # R not a multiple of BN; C = 5 NF4 blocks
    gw, wd = nf4_weight(E, R, C, double_quant)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    n = int(offs[-1])
    x = torch.randn(n + 3, C)  # rows past offsets[-1] are not written
    out = torch.full((n + 3, R), float("nan"))
    nf4_decode_mm(x, gw, offs, out=out, config=cfg)
    assert rel(out[:n], loop_ref(x[:n], wd, offs)) < CPU_TOL
    assert torch.isnan(out[n:]).all()


@pytest.mark.parametrize("split", [1, 4])
def test_nf4_decode_lora_epilogue(split):
    torch.manual_seed(8)
    E, R, C, r, s = len(COUNTS), 48, 256, 5, 0.75
    gw, wd = nf4_weight(E, R, C, False)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    n = int(offs[-1])
    x, la, lb = torch.randn(n, C), torch.randn(n, r), torch.randn(E, r, R)
    out = nf4_decode_mm(x, gw, offs, lora_in=la, lora_out=lb, lora_scale=s,
                        config=DecodeConfig(BM=16, BN=16, BK=64, SPLIT=split))
    assert rel(out, loop_ref(x, wd, offs, la, lb, s)) < CPU_TOL


def test_default_config_splits_only_when_few_programs():
    one_token = default_decode_config(rows=8, num_experts=128, R=1536, C=2048)
    many = default_decode_config(rows=512, num_experts=128, R=1536, C=2048)
    assert one_token.SPLIT > 1 and many.SPLIT == 1


def test_rejects_non_nf4_and_bad_shapes():
    gw, _ = nf4_weight(2, 16, 64, False)
    offs = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[S, 64\]"):
        nf4_decode_mm(torch.randn(2, 32), gw, offs)
    with pytest.raises(ValueError, match="BK % 64"):
        nf4_decode_mm(torch.randn(2, 64), gw, offs, config=DecodeConfig(BK=96))


def test_grouped_mm_routes_few_rows_to_the_decode_kernel():
    """`grouped_mm` (default tiles) hands an NF4 forward with <= 16 mean rows per expert to the decode kernel, LoRA
    included and unfused by rule; the result equals the float64 reference; the input gradient and larger problems
    stay on the K-loop kernel."""
    from impl.ops.dispatch import DECODE_REASON, grouped_lora_mm, grouped_mm, lora_path, nf4_decode_route

    torch.manual_seed(9)
    E, R, C, r, s = len(COUNTS), 48, 256, 3, 0.5
    gw, wd = nf4_weight(E, R, C, False)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    n = int(offs[-1])
    x, a, b = torch.randn(n, C), torch.randn(E, C, r), torch.randn(E, r, R)
    assert nf4_decode_route(gw, False, n, None) and nf4_decode_route(gw, False, 16 * E, None)
    assert not nf4_decode_route(gw, True, n, None) and not nf4_decode_route(gw, False, 16 * E + 1, None)
    assert lora_path(x, gw, fused=True) == f"unfused: {DECODE_REASON}"
    assert rel(grouped_mm(x, gw, offs), loop_ref(x, wd, offs)) < CPU_TOL
    y, mid = grouped_lora_mm(x, gw, offs, a, b, s, fused=True)
    la = loop_ref(x, a.transpose(1, 2).double(), offs)
    assert rel(mid, la) < CPU_TOL
    assert rel(y, loop_ref(x, wd, offs, la, b, s)) < CPU_TOL
