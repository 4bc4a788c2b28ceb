"""GPU check of NF4 tensors with >= 2^31 elements (DeepSeek-V3-like experts: gate_up [256, 4096, 7168] = 7.5 G, down
[256, 7168, 2048] = 3.8 G elements), the sizes where 32-bit offsets overflow.

    python3 bench/check_large_nf4.py [--out FILE]

Checks on the same random weights:
1. `nf4_dequantize` of the whole tensor == ``code[q] * absmax`` computed in torch per 16-expert chunk (bitwise);
2. the K-loop NF4 grouped GEMM (`grouped_mm`, default tiles) and the decode kernel (`nf4_decode_mm`) against
   ``torch._grouped_mm`` on the dequantized bf16 weight, at 1, 16, 64 and 1024 tokens routed top-8 over all 256
   experts (so the last experts, whose bytes start past 2^31, are hit): relative norm <= 1e-2 (bf16 operands);
3. `grouped_linear` with the NF4 policy "dequant" at 16384 tokens against the same.
Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import impl.ops.dispatch as gg  # noqa: E402
from impl.ops.grouped_lora import grouped_linear  # noqa: E402
from impl.ops.moe_layer import sort_pairs  # noqa: E402
from impl.ops.nf4_decode import nf4_decode_mm  # noqa: E402
from impl.ops.nf4_dequant import nf4_dequantize  # noqa: E402
from impl.ops.quant import quantize_nf4_experts  # noqa: E402

DEV = "cuda"


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    H, I, E, K = 7168, 2048, 256, 8
    results, ok = [], True

    def record(name, value, bound, passed):
        nonlocal ok
        ok &= passed
        results.append(dict(check=name, value=value, bound=bound, passed=passed))
        print(f"{'PASS' if passed else 'FAIL'} {name}: {value} (bound {bound})", flush=True)

    torch.manual_seed(0)
    for proj, (R, C) in {"down": (H, I), "gate_up": (2 * I, H)}.items():
        w = torch.randn(E, R, C, device=DEV, dtype=torch.bfloat16) * 0.02
        gw = quantize_nf4_experts(w)
        del w
        wd = nf4_dequantize(gw.data, gw.scale, gw.code, gw.shape, torch.bfloat16)
        same = True
        per = R * C
        for e0 in range(0, E, 16):
            b = gw.data[e0 * per // 2:(e0 + 16) * per // 2].to(torch.int64)
            q = torch.stack(((b >> 4) & 15, b & 15), -1).reshape(-1)
            am = gw.scale[e0 * per // 64:(e0 + 16) * per // 64].repeat_interleave(64)
            ref = (gw.code[q] * am).to(torch.bfloat16)
            same &= bool(torch.equal(wd[e0:e0 + 16].reshape(-1), ref))
        record(f"{proj} {tuple(gw.shape)} nf4_dequantize bitwise (numel {E * per})", same, True, same)
        for T in (1, 16, 64, 1024):
            idx = torch.softmax(torch.randn(T, E, device=DEV), -1).topk(K, -1).indices
            _, _, offs = sort_pairs(idx, E)
            x = torch.randn(T * K, C, device=DEV, dtype=torch.bfloat16)
            ref = torch._grouped_mm(x, wd.transpose(1, 2), offs=offs)
            last = int(idx.max())
            e_gen = rel(gg.grouped_mm(x, gw, offs), ref)
            record(f"{proj} T={T} K-loop grouped_mm vs torch._grouped_mm (max expert {last})", e_gen, 1e-2, e_gen <= 1e-2)
            if T <= 64:
                e_dec = rel(nf4_decode_mm(x, gw, offs), ref)
                record(f"{proj} T={T} nf4_decode_mm vs torch._grouped_mm", e_dec, 1e-2, e_dec <= 1e-2)
        T = 16384
        idx = torch.softmax(torch.randn(T, E, device=DEV), -1).topk(K, -1).indices
        _, _, offs = sort_pairs(idx, E)
        x = torch.randn(T * K, C, device=DEV, dtype=torch.bfloat16)
        ref = torch._grouped_mm(x, wd.transpose(1, 2), offs=offs)
        e_lin = rel(grouped_linear(x, gw, offs, nf4_policy="dequant"), ref)
        record(f"{proj} T={T} grouped_linear nf4_policy=dequant", e_lin, 1e-2, e_lin <= 1e-2)
        del wd, gw, x, ref
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
