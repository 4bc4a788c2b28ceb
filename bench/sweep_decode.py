"""Config sweep of the NF4 decode kernel (`impl.ops.nf4_decode`) on one CUDA GPU; prints and writes JSON.

    python3 bench/sweep_decode.py [--out FILE] [--models qwen3_30b_a3b,...]

For each model projection (gate_up, down) and tokens 1 / 16 / 64 (top-k routing of Gaussian logits), times with the L2
flushed before every CUDA-graph replay: ``torch._grouped_mm`` bf16 (the baseline GEMM), the generic K-loop NF4 kernel
(`grouped_mm` default config) and each decode config; every decode output is checked against the generic kernel
(relative norm <= 1e-2: both dequantize the same NF4 values, bf16 operands). Stage A scans tiles at 64 tokens with no
split, stage B the best tiles with K splits at every token count. Used to pick `default_decode_config`; the kernel
variants measured and dropped (prefetch, pair table, per-byte absmax, even/odd dots, FMA, diagnostics) are in the
history of impl/ops/nf4_decode.py (commits 5ee6e6e..60bd952) and their outputs in reports/bench/raw/sweep-decode-*.
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from impl.ops.dispatch import grouped_mm  # noqa: E402
from impl.ops.moe_layer import sort_pairs  # noqa: E402
from impl.ops.nf4_decode import DecodeConfig, default_decode_config, nf4_decode_mm  # noqa: E402
from impl.ops.quant import quantize_nf4_experts  # noqa: E402

DEV = "cuda"
MODELS = {"qwen3_30b_a3b": (2048, 768, 128, 8), "gpt_oss_120b_like": (2880, 2880, 128, 4),
          "deepseek_v3_like": (7168, 2048, 256, 8)}
_FLUSH = None


def flushed_graph_us(fn, reps: int = 30) -> float:
    """Median of CUDA-graph replays of ``fn``, L2 flushed (256 MB memset) before each, events around the replay only."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps + 3):
        _FLUSH.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times = sorted(times[3:])
    return times[len(times) // 2]


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--models", default="qwen3_30b_a3b")
    ap.add_argument("--tokens", default="1,16,64")
    args = ap.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        H, I, E, K = MODELS[model]
        torch.manual_seed(0)
        projs = {}
        for name, (R, C) in {"gate_up": (2 * I, H), "down": (H, I)}.items():
            w = torch.randn(E, R, C, device=DEV, dtype=torch.bfloat16) * 0.02
            projs[name] = (w, quantize_nf4_experts(w))
        tokens = [int(t) for t in args.tokens.split(",")]
        D = DecodeConfig
        stage_a = [D(16, 64, 128, 1, 4), D(16, 32, 256, 1, 4), D(16, 64, 256, 1, 4), D(16, 128, 128, 1, 4),
                   D(16, 128, 128, 1, 8), D(16, 128, 256, 1, 8), D(32, 64, 128, 1, 4), D(16, 64, 64, 1, 4),
                   D(16, 64, 128, 1, 4, LUT=1), D(16, 128, 128, 1, 8, LUT=1), D(16, 64, 256, 1, 4, LUT=1)]
        best: dict[str, list[DecodeConfig]] = {}
        for T in sorted(tokens, key=lambda t: -t):
            logits = torch.randn(T, E, device=DEV)
            idx = torch.softmax(logits, -1).topk(K, -1).indices
            _, token_idx, offs = sort_pairs(idx, E)
            n_active = int((torch.bincount(idx.reshape(-1), minlength=E) > 0).sum())
            for name, (w, gw) in projs.items():
                R, C = w.shape[1], w.shape[2]
                x = torch.randn(T * K, C, device=DEV, dtype=torch.bfloat16)
                offs64 = offs.to(torch.int32)
                t_bf16 = flushed_graph_us(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs64))
                ref = grouped_mm(x, gw, offs64)
                t_gen = flushed_graph_us(lambda: grouped_mm(x, gw, offs64))
                nf4_bytes = n_active * R * C * 0.5625
                base = dict(model=model, gemm=name, tokens=T, n_active=n_active, bf16_us=t_bf16, generic_nf4_us=t_gen)
                print(f"{model} {name} T={T} active={n_active}: bf16 {t_bf16:.1f} us, generic nf4 {t_gen:.1f} us", flush=True)
                if T == max(tokens):
                    cands = stage_a
                else:
                    cands = []
                    for c in best.get(name, [])[:2]:
                        for sp in (1, 2, 4, 8):
                            cands.append(DecodeConfig(c.BM, c.BN, c.BK, sp, c.num_warps, c.num_stages, c.LUT))
                    cands.append(default_decode_config(T * K, E, R, C))
                timed = []
                for cfg in cands:
                    try:
                        out = nf4_decode_mm(x, gw, offs64, config=cfg)
                        err = rel(out, ref)
                        t = flushed_graph_us(lambda: nf4_decode_mm(x, gw, offs64, config=cfg))
                    except Exception as exc:  # a config Triton cannot compile is a sweep result, recorded and printed
                        print(f"   {cfg}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        rows.append({**base, "cfg": cfg.__dict__, "error": f"{type(exc).__name__}: {exc}"[:500]})
                        continue
                    ok = err <= 1e-2
                    timed.append((t if ok else float("inf"), cfg))
                    rows.append({**base, "cfg": cfg.__dict__, "us": t, "rel_err": err,
                                 "nf4_TBps": nf4_bytes / (t * 1e-6) / 1e12, "speedup_vs_bf16": t_bf16 / t})
                    print(f"   {cfg}: {t:.1f} us  x{t_bf16 / t:.2f} vs bf16  {nf4_bytes / t / 1e6:.2f} TB/s  "
                          f"err {err:.1e}{'' if ok else '  WRONG'}", flush=True)
                timed.sort(key=lambda p: p[0])
                if T == max(tokens):
                    best[name] = [c for _, c in timed]
                if timed:
                    print(f"BEST {model} {name} T={T}: {timed[0][1]} {timed[0][0]:.1f} us", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
