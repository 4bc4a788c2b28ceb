"""Kernel-level breakdown (torch.profiler, CUDA time per kernel) of a few Qwen3-30B-A3B layer cases, to see where the
time of a variant goes (e.g. the LoRA launches at decode, the combine at 16k tokens).

    python3 bench/profile_cases.py [--cases bf16_fused_lora:16:fwd:1,...]
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_moe as bm  # noqa: E402

from impl.ops.moe_layer import moe_layer  # noqa: E402

DEFAULT = ("bf16_fused_lora:16:fwd:0,bf16_fused_lora:16:fwd:1,bf16_fused_lora:16:fwd_bwd:1,bf16_grouped_mm:16:fwd_bwd:1,"
           "nf4_fused:64:fwd:0,bf16_grouped_mm:16384:fwd:0,fp8_block_fused:16384:fwd:0,nf4_fused:16384:fwd_bwd:1,"
           "bf16_fused_lora:16384:fwd_bwd:1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=DEFAULT)
    ap.add_argument("--rows", type=int, default=12)
    a = ap.parse_args()
    H, I, E, k = bm.MODELS["qwen3_30b_a3b"]
    cases = [c.split(":") for c in a.cases.split(",")]
    W = bm.build_weights(H, I, E, {c[0] for c in cases})
    r = bm.RANK
    loras = {"gate_up": (torch.randn(r * E, H, device="cuda", dtype=torch.bfloat16) * 0.02,
                         torch.randn(2 * I, r * E, device="cuda", dtype=torch.bfloat16) * 0.02, 2.0),
             "down": (torch.randn(r * E, I, device="cuda", dtype=torch.bfloat16) * 0.02,
                      torch.randn(H, r * E, device="cuda", dtype=torch.bfloat16) * 0.02, 2.0)}
    for v, T, mode, lora in cases:
        T, lora = int(T), lora == "1"
        w, idx = torch.softmax(torch.randn(T, E, device="cuda"), -1).topk(k, dim=-1)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=mode == "fwd_bwd")
        dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        gu, dn = W[v]
        lin = bm.linear_of(v)
        cmode = "stock" if v in bm.STOCK_COMBINE else "fast"
        lm = None
        leaves = [x]
        if lora:
            lm = {}
            for key, (A, B, s) in loras.items():
                A_, B_ = A.clone().requires_grad_(mode == "fwd_bwd"), B.clone().requires_grad_(mode == "fwd_bwd")
                lm[key] = (A_, B_, s)
                leaves += [A_, B_]

        def fn():
            if mode == "fwd":
                with torch.no_grad():
                    return moe_layer(x, idx, w, gu, dn, lm, lin, cmode)
            return torch.autograd.grad(moe_layer(x, idx, w, gu, dn, lm, lin, cmode), leaves, dy)

        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"\n===== {v} T={T} {mode} lora={int(lora)} (5 iterations)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
