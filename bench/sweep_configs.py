"""Tile-config sweep of the Triton grouped GEMM at Qwen3-30B-A3B shapes (one CUDA GPU); prints the best per case.

    python3 bench/sweep_configs.py [--tokens 64,16384] [--fmts bf16,nf4,fp8_block]

Used once to pick `impl.ops.kloop.default_config`; results go to stdout (and --json).
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from impl.ops.dispatch import grouped_mm  # noqa: E402
from impl.ops.formats import FMT_BF16, GroupedWeight  # noqa: E402
from impl.ops.kloop import TileConfig  # noqa: E402
from impl.ops.moe_layer import sort_pairs  # noqa: E402
from impl.ops.quant import quantize_fp8_block_experts, quantize_nf4_experts  # noqa: E402

T = TileConfig
DECODE = {
    "bf16": [T(16, 64, 256, 4, 3), T(16, 128, 64, 4, 5)],
    "nf4": [T(16, 128, 64, 4, 4, 2), T(16, 128, 64, 4, 1, 2), T(16, 128, 64, 4, 2, 2), T(16, 128, 64, 4, 4, 2, 1),
            T(16, 128, 64, 4, 1, 2, 1), T(16, 64, 128, 4, 1, 2), T(16, 128, 128, 8, 1, 2), T(16, 64, 64, 4, 4, 1),
            T(16, 64, 64, 4, 1, 1), T(16, 128, 64, 4, 2, 1, 1), T(16, 256, 64, 8, 2, 2), T(16, 64, 64, 2, 2, 2)],
    "fp8_block": [T(16, 256, 128, 8, 3)],
}
DECODE_T = {  # trans=True (input gradient): nf4 tiles are [BK, BN] with BN the contiguous axis
    "bf16": [T(16, 128, 64, 4, 5)],
    "nf4": [T(16, 64, 128, 2, 4), T(16, 64, 128, 2, 1), T(16, 64, 128, 4, 2), T(16, 64, 128, 2, 4, 1, 1),
            T(16, 64, 128, 2, 1, 1, 1), T(16, 64, 64, 4, 1), T(16, 128, 64, 4, 2)],
    "fp8_block": [T(16, 128, 128, 4, 4)],
}
PREFILL = {
    "bf16": [T(128, 256, 64, 8, 3)],
    "nf4": [T(64, 128, 64, 4, 3, 2), T(64, 128, 64, 4, 1, 2), T(64, 128, 64, 4, 2, 1), T(64, 64, 64, 4, 1, 1),
            T(64, 128, 64, 4, 2, 2, 1), T(128, 128, 64, 8, 1, 2), T(32, 128, 64, 4, 2, 2)],
    "fp8_block": [T(64, 128, 128, 4, 4)],
}
PREFILL_T = {
    "bf16": [T(128, 256, 64, 8, 3)],
    "nf4": [T(64, 64, 128, 4, 3), T(64, 64, 128, 4, 1), T(64, 64, 64, 4, 2), T(64, 64, 128, 4, 2, 1, 1),
            T(128, 64, 64, 8, 1)],
    "fp8_block": [T(128, 128, 128, 8, 3)],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="64,1024")
    ap.add_argument("--fmts", default="nf4")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    H, I, E, k = 2048, 768, 128, 8
    gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    Ws = {"bf16": GroupedWeight(FMT_BF16, tuple(gu.shape), gu), "nf4": quantize_nf4_experts(gu),
          "fp8_block": quantize_fp8_block_experts(gu)}
    results = []
    from impl.ops.nf4_dequant import nf4_dequantize
    nf = Ws["nf4"]
    out = torch.empty(nf.shape, dtype=torch.bfloat16, device="cuda")
    td = 1e3 * do_bench(lambda: nf4_dequantize(nf.data, nf.scale, nf.code, nf.shape, torch.bfloat16, out=out),
                        warmup=5, rep=20, return_mode="median")
    n = gu.numel()
    print(f"nf4_dequantize gate_up ({n / 1e6:.0f} M params): {td:.1f} us = {n * 2.5625 / td / 1e6:.2f} TB/s r+w", flush=True)
    for T in [int(t) for t in a.tokens.split(",")]:
        _, idx = torch.softmax(torch.randn(T, E, device="cuda"), -1).topk(k, dim=-1)
        _, _, offs = sort_pairs(idx, E)
        S = T * k
        for trans in (False, True):
            x = torch.randn(S, H if not trans else 2 * I, device="cuda", dtype=torch.bfloat16)
            ref_t = 1e3 * do_bench(lambda: torch._grouped_mm(x, gu.transpose(-2, -1) if not trans else gu, offs),
                                   warmup=5, rep=20, return_mode="median")
            print(f"T={T} trans={trans} torch._grouped_mm bf16: {ref_t:.1f} us", flush=True)
            for fmt in a.fmts.split(","):
                gw = Ws[fmt]
                best = None
                for cfg in ((DECODE_T if trans else DECODE) if S / E <= 16 else (PREFILL_T if trans else PREFILL))[fmt]:
                    if fmt == "fp8_block" and cfg.BK != 128:
                        continue
                    if fmt == "nf4" and (cfg.BN if trans else cfg.BK) % 64:
                        continue
                    try:
                        grouped_mm(x, gw, offs, trans=trans, config=cfg)
                        t = 1e3 * do_bench(lambda cfg=cfg: grouped_mm(x, gw, offs, trans=trans, config=cfg),
                                           warmup=5, rep=20, return_mode="median")
                    except Exception as exc:
                        print(f"   {fmt} {cfg}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        continue
                    results.append(dict(T=T, trans=trans, fmt=fmt, cfg=cfg.__dict__, us=t, torch_bf16_us=ref_t))
                    print(f"   {fmt:9s} {cfg}: {t:.1f} us (x{t / ref_t:.2f} of torch bf16)", flush=True)
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    print(f"BEST T={T} trans={trans} {fmt}: {best[1]} {best[0]:.1f} us", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
