"""Sweep of the Hopper block-FP8 grouped GEMM variants (impl/ops/fp8_gemm_hopper.py) at 16k tokens, one CUDA GPU.

    python3 bench/sweep_fp8.py [--models qwen3_30b_a3b,gpt_oss_120b_like,deepseek_v3_like] [--tokens 16384]
                               [--variants all|name,...] [--no-trans]

For every model of bench/bench_moe.py MODELS, the forward gate_up (x [S, H] -> [S, 2I]) and down ([S, I] -> [S, H])
grouped GEMMs with S = tokens * top_k rows routed by top-k of a softmax over Gaussian logits (bench_moe's routing),
random bf16 weights (std 0.02) quantized 128x128 block e4m3 and random bf16 activations:

- correctness: every output is poisoned (NaN) first; rel_err = ||y - ref|| / ||ref|| over the rows < offsets[-1],
  ref = fp32 per-expert loop over the dequantized SAME codes (the 1x128 activation codes of `quantize_act_1x128` and
  the weight codes), must be finite and <= 1e-2 (bf16 output; the GPU tests' bound) — a failing variant is marked
  FAIL and never counted as fastest;
- timing: ``triton.testing.do_bench`` median (L2 flushed between reps), for
  ``act_quant``  `quantize_act_1x128` alone (the separate activation pass every prequant path pays),
  ``current``    `grouped_mm` FP8 path as routed today (act quant + the K-loop kernel),
  ``current_inkq`` the same kernel quantizing x inside its K loop (Qwen only; measures in-kernel quantization),
  ``bf16``       ``torch._grouped_mm`` on the bf16 weights (what `bf16_grouped_mm+glue` runs),
  each variant   `fp8_grouped_mm` with x pre-quantized (``us``: the GEMM alone) and with its own act quant
                 (``us_total``: the drop-in cost, compared to ``current`` and ``bf16``);
- a trans=True check (input-gradient orientation) of DEFAULT_VARIANT on Qwen down (correctness + time only).

Prints one line per measurement as it goes and the compact table last; writes $OUT/sweep-fp8.json (if OUT is set)
after every GEMM, so a run cut short still leaves its rows. Expect ~2-3 minutes on an H200 (compiles included).
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_moe import MODELS  # noqa: E402
from impl.ops.dispatch import grouped_mm  # noqa: E402
from impl.ops.fp8_gemm_hopper import DEFAULT_VARIANT, VARIANTS, fp8_grouped_mm  # noqa: E402
from impl.ops.kloop import quantize_act_1x128  # noqa: E402
from impl.ops.moe_layer import sort_pairs  # noqa: E402
from impl.ops.quant import quantize_fp8_block_experts  # noqa: E402

DEV = "cuda"
TOL = 1e-2
LOSSY_FACTOR = 2.0
FP8_PEAK = 1.35e15  # measured dense FP8 on the H200 (shared facts sheet)


def log(*a):
    print(*a, flush=True)


def bench_us(fn) -> float:
    return 1e3 * do_bench(fn, warmup=10, rep=60, return_mode="median")


def reference(xq, xs, gw, offs, trans):
    """fp32 per-expert product of the dequantized codes: rows of expert e times W_e.T (or W_e)."""
    S, K = xq.shape
    xd = xq.float() * xs.repeat_interleave(128, dim=1)[:, :K]
    E, R, C = gw.shape
    out = torch.empty((S, C if trans else R), dtype=torch.float32, device=DEV)
    ends = offs.tolist()
    start = 0
    for e in range(E):
        end = ends[e]
        if end > start:
            w = gw.data[e].float() * gw.scale[e].repeat_interleave(128, 0)[:R].repeat_interleave(128, 1)[:, :C]
            out[start:end] = xd[start:end] @ (w if trans else w.T)
        start = end
    return out, ends[-1]


def verdict(err: float, err32: float, err32_current: float) -> str:
    """FAIL: bf16-output error over TOL (or NaN: an unwritten row). LOSSY: the fp32-output (accumulation) error is
    over LOSSY_FACTOR x the current kernel's on the same GEMM, i.e. worse numerics than today's route (the
    fast-accumulation "rescale" variants); not eligible as the default. ok: neither."""
    if not err <= TOL:
        return "FAIL"
    if not err32 <= LOSSY_FACTOR * err32_current:
        return "LOSSY"
    return "ok"


def rel_err(y, ref, n) -> float:
    y = y[:n].float()
    if not torch.isfinite(y).all():
        return float("nan")
    return float((y - ref[:n]).norm() / ref[:n].norm())


def sweep_gemm(model, gemm, R, C, E, offs, S, variants, record, g, trans_check):
    """Check and time every variant on one GEMM ``[S, C] x W [E, R, C] -> [S, R]`` (see the module docstring)."""
    t0 = time.time()
    w = torch.randn(E, R, C, device=DEV, dtype=torch.bfloat16, generator=g) * 0.02
    gw = quantize_fp8_block_experts(w)
    x = torch.randn(S, C, device=DEV, dtype=torch.bfloat16, generator=g)
    xq, xs = quantize_act_1x128(x)
    ref, n = reference(xq, xs, gw, offs, False)
    flops = 2.0 * n * R * C
    base = dict(model=model, gemm=gemm, S=S, N=R, K=C, E=E)
    log(f"== {model} {gemm}: S={S} N={R} K={C} E={E} ({flops / 1e9:.0f} GFLOP; setup {time.time() - t0:.1f}s)")
    y = torch.empty((S, R), device=DEV, dtype=torch.bfloat16)
    y32 = torch.empty((S, R), device=DEV, dtype=torch.float32)

    def errors(call):
        """(bf16-output rel err, fp32-output rel err = the accumulation alone); outputs poisoned first."""
        y.fill_(float("nan"))
        call(y)
        y32.fill_(float("nan"))
        call(y32)
        return rel_err(y, ref, n), rel_err(y32, ref, n)

    tq = bench_us(lambda: quantize_act_1x128(x))
    record(**base, variant="act_quant", us=tq, gbps=(x.numel() * 3 + xs.numel() * 4) / tq / 1e3)
    wt = w.transpose(-2, -1)
    tb = bench_us(lambda: torch._grouped_mm(x, wt, offs))
    err_b = rel_err(torch._grouped_mm(x, wt, offs), ref, n)  # vs the FP8 reference: the quantization error, info
    record(**base, variant="bf16", us=tb, us_total=tb, tflops=flops / tb / 1e6, rel_err=err_b,
           status="info: err = bf16 weights vs the fp8 codes (quantization)")
    err_c, err32_c = errors(lambda o: grouped_mm(x, gw, offs, out=o))
    tc = bench_us(lambda: grouped_mm(x, gw, offs, out=y))
    record(**base, variant="current", us=tc - tq, us_total=tc, tflops=flops / max(tc - tq, 1e-3) / 1e6,
           rel_err=err_c, err32=err32_c, status=verdict(err_c, err32_c, err32_c), speedup_vs_bf16=tb / tc)
    if model == "qwen3_30b_a3b":
        err_i, err32_i = errors(lambda o: grouped_mm(x, gw, offs, out=o, act_prequant=False))
        ti = bench_us(lambda: grouped_mm(x, gw, offs, out=y, act_prequant=False))
        record(**base, variant="current_inkq", us=ti, us_total=ti, tflops=flops / ti / 1e6, rel_err=err_i,
               err32=err32_i, status=verdict(err_i, err32_i, err32_c), speedup_vs_current=tc / ti,
               speedup_vs_bf16=tb / ti)
    for v in variants:
        try:
            tc0 = time.time()
            fp8_grouped_mm(x, gw, offs, out=y, config=v, x_quant=(xq, xs))
            torch.cuda.synchronize()
            compile_s = time.time() - tc0
            err, err32 = errors(lambda o: fp8_grouped_mm(x, gw, offs, out=o, config=v, x_quant=(xq, xs)))
            tv = bench_us(lambda: fp8_grouped_mm(x, gw, offs, out=y, config=v, x_quant=(xq, xs)))
            tt = bench_us(lambda: fp8_grouped_mm(x, gw, offs, out=y, config=v))
        except (RuntimeError, ValueError, triton.CompilationError, triton.OutOfResources) as exc:
            # a variant that does not build or launch is reported in the table, never timed
            record(**base, variant=v, us=float("nan"), status=f"ERROR {type(exc).__name__}: {str(exc)[:160]}")
            continue
        record(**base, variant=v, us=tv, us_total=tt, tflops=flops / tv / 1e6, rel_err=err, err32=err32,
               status=verdict(err, err32, err32_c), speedup_vs_current=tc / tt, speedup_vs_bf16=tb / tt,
               first_call_s=compile_s)
    if trans_check:  # the input-gradient orientation: dy [S, R] -> [S, C]
        dy = torch.randn(S, R, device=DEV, dtype=torch.bfloat16, generator=g)
        dq, ds = quantize_act_1x128(dy)
        ref_t, _ = reference(dq, ds, gw, offs, True)
        yt = torch.full((S, C), float("nan"), device=DEV, dtype=torch.bfloat16)
        fp8_grouped_mm(dy, gw, offs, trans=True, out=yt, x_quant=(dq, ds))
        err_t = rel_err(yt, ref_t, n)
        tt = bench_us(lambda: fp8_grouped_mm(dy, gw, offs, trans=True, out=yt, x_quant=(dq, ds)))
        tct = bench_us(lambda: grouped_mm(dy, gw, offs, trans=True, out=yt))
        record(**{**base, "gemm": "down_T"}, variant=f"{DEFAULT_VARIANT}_trans", us=tt, tflops=flops / tt / 1e6,
               rel_err=err_t, status="ok" if err_t <= TOL else "FAIL", current_trans_total_us=tct)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--variants", default="all")
    ap.add_argument("--no-trans", action="store_true")
    a = ap.parse_args()
    variants = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
    out_dir = os.environ.get("OUT")
    t_start = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                tokens=a.tokens, commit=os.environ.get("BENCH_COMMIT", "unknown"))
    log(f"{meta}")
    rows: list[dict] = []

    def record(**r):
        rows.append(r)
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        log(f"  {r['model']:18s} {r['gemm']:8s} {r['variant']:28s} {r['us']:9.1f} us  total {r.get('us_total') or 0:9.1f}"
            f"  {tf:>5} TF/s  err {r.get('rel_err', float('nan')):.1e}  {r.get('status', '')}")

    def save():
        if out_dir:
            Path(out_dir, "sweep-fp8.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))

    g = torch.Generator(device=DEV).manual_seed(0)
    for model in a.models.split(","):
        H, I, E, k = MODELS[model]
        logits = torch.randn(a.tokens, E, device=DEV, generator=g)
        _, idx = torch.softmax(logits, -1).topk(k, dim=-1)
        _, _, offs = sort_pairs(idx, E)
        for gemm, (R, C) in (("gate_up", (2 * I, H)), ("down", (H, I))):
            sweep_gemm(model, gemm, R, C, E, offs, a.tokens * k, variants, record, g,
                       trans_check=gemm == "down" and model == "qwen3_30b_a3b" and not a.no_trans)
            torch.cuda.empty_cache()
            save()
    log(f"\ndone in {time.time() - t_start:.0f}s on {meta['gpu']}")
    summary(rows, variants)
    save()


def _f(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def summary(rows: list[dict], variants: list[str]) -> None:
    """The compact table (the reply shows the end of the output) and the per-variant sums over all GEMMs."""
    log("model              gemm     variant                    us(gemm) us(+quant) TFLOP/s %FP8pk  err_bf16  err_fp32 "
        "x_curr x_bf16 status")
    for r in rows:
        if r["variant"] == "act_quant":
            log(f"{r['model']:18s} {r['gemm']:8s} {'act_quant':26s} {r['us']:8.1f}  ({r['gbps']:.0f} GB/s r+w)")
            continue
        tfl = r.get("tflops")
        status = r.get("status", "")
        log(f"{r['model']:18s} {r['gemm']:8s} {r['variant']:26s} {_f(r['us'], '8.1f')} {_f(r.get('us_total'), '9.1f')} "
            f"{_f(tfl, '7.0f')} {_f(tfl and 100 * tfl * 1e12 / FP8_PEAK, '5.0f')}%  {_f(r.get('rel_err'), '8.1e')}  "
            f"{_f(r.get('err32'), '8.1e')} {_f(r.get('speedup_vs_current'), '5.2f')}x {_f(r.get('speedup_vs_bf16'), '5.2f')}x "
            f"{'' if status.startswith('info') else status[:40]}")
    best = {}
    for r in rows:
        if r["variant"] in VARIANTS and r.get("status") == "ok":
            key = (r["model"], r["gemm"])
            if key not in best or r["us_total"] < best[key]["us_total"]:
                best[key] = r
    log("\nfastest non-lossy variant per GEMM (us incl. act quant): " + "; ".join(
        f"{m} {gm}: {r['variant']} {r['us_total']:.0f}" for (m, gm), r in best.items()))
    cur = {(r["model"], r["gemm"]): r["us_total"] for r in rows if r["variant"] == "current"}
    bf = {(r["model"], r["gemm"]): r["us_total"] for r in rows if r["variant"] == "bf16"}
    log("sum over the forward GEMMs, incl. act quant (a variant that is not ok on every GEMM is flagged):")
    for v in ["current"] + variants:
        mine = [r for r in rows if r["variant"] == v and r["gemm"] in ("gate_up", "down")]
        if not mine:
            continue
        keys = [(r["model"], r["gemm"]) for r in mine]
        bad = sorted({r.get("status", "")[:5] for r in mine if r.get("status") != "ok"})
        log(f"  {v:26s} {sum(r.get('us_total') or float('nan') for r in mine):9.0f} us  current "
            f"{sum(cur[k] for k in keys):9.0f}  bf16 {sum(bf[k] for k in keys):9.0f}  ({len(mine)} GEMMs"
            f"{', ' + '/'.join(bad) if bad else ''})")


if __name__ == "__main__":
    main()
