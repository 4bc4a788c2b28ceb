"""Where the LoRA overhead of a training step goes: each launch of the Qwen3-30B-A3B expert GEMMs at 16384 tokens
timed alone (one CUDA GPU), base vs fused vs unfused LoRA (r = 16), plus the two weight-gradient reductions.

    python3 bench/lora_breakdown.py [--tokens 16384] [--out FILE]

Rows: launch, projection, time_us (`triton.testing.do_bench` median, L2 flushed), and the HBM floor of the extra bytes
the LoRA launch reads (activations at 4.27 TB/s). Prints a table; --out writes JSON.
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from impl.ops.dispatch import grouped_lora_mm, grouped_mm  # noqa: E402
from impl.ops.formats import FMT_BF16, GroupedWeight  # noqa: E402
from impl.ops.grouped_wgrad import grouped_wgrad  # noqa: E402
from impl.ops.moe_layer import sort_pairs  # noqa: E402

DEV = "cuda"


def t_us(fn) -> float:
    return 1e3 * do_bench(fn, warmup=10, rep=50, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    H, I, E, K, r, s = 2048, 768, 128, 8, 16, 2.0
    torch.manual_seed(0)
    idx = torch.softmax(torch.randn(a.tokens, E, device=DEV), -1).topk(K, -1).indices
    _, _, offs = sort_pairs(idx, E)
    S = idx.numel()
    rows = []
    for proj, (R, C) in {"gate_up": (2 * I, H), "down": (H, I)}.items():
        w = torch.randn(E, R, C, device=DEV, dtype=torch.bfloat16) * 0.02
        gw = GroupedWeight(FMT_BF16, (E, R, C), w)
        x = torch.randn(S, C, device=DEV, dtype=torch.bfloat16)
        dy = torch.randn(S, R, device=DEV, dtype=torch.bfloat16)
        A = torch.randn(E, r, C, device=DEV, dtype=torch.bfloat16) * 0.02  # A_e [r, C]
        B = torch.randn(E, R, r, device=DEV, dtype=torch.bfloat16) * 0.02  # B_e [R, r]
        xa = torch.randn(S, r, device=DEV, dtype=torch.bfloat16)
        dyb = torch.randn(S, r, device=DEV, dtype=torch.bfloat16)
        cases = {
            "fwd base": lambda: grouped_mm(x, gw, offs),
            "fwd +LoRA fused": lambda: grouped_lora_mm(x, gw, offs, A.transpose(1, 2), B.transpose(1, 2), s, fused=True),
            "fwd +LoRA unfused": lambda: grouped_lora_mm(x, gw, offs, A.transpose(1, 2), B.transpose(1, 2), s,
                                                         fused=False),
            "fwd xa = x @ A_e.T alone": lambda: grouped_mm(x, GroupedWeight(FMT_BF16, (E, r, C), A), offs),
            "dX base": lambda: grouped_mm(dy, gw, offs, trans=True),
            "dX +LoRA fused": lambda: grouped_lora_mm(dy, gw, offs, B, A, s, trans=True, fused=True),
            "dX +LoRA unfused": lambda: grouped_lora_mm(dy, gw, offs, B, A, s, trans=True, fused=False),
            "dA = dyb.T @ x": lambda: grouped_wgrad(dyb, x, offs, scale=s, out_dtype=torch.bfloat16),
            "dB = dy.T @ xa": lambda: grouped_wgrad(dy, xa, offs, scale=s, out_dtype=torch.bfloat16),
        }
        for name, fn in cases.items():
            t = t_us(fn)
            rows.append(dict(proj=proj, launch=name, time_us=round(t, 1)))
            print(f"{proj:8s} {name:28s} {t:9.1f} us", flush=True)
        act = {"x": S * C * 2, "dy": S * R * 2}
        print(f"{proj:8s} HBM floor of one read: x {act['x'] / 4.27e6:.0f} us, dy {act['dy'] / 4.27e6:.0f} us", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "tokens": a.tokens, "rows": rows},
                                          indent=1))


if __name__ == "__main__":
    main()
