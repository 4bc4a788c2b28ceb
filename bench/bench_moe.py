"""MoE expert benchmark on one CUDA GPU: whole layers and bare grouped GEMMs, bf16 / NF4 / FP8, with and without LoRA.

    python3 bench/bench_moe.py [--models qwen3_30b_a3b,...] [--tokens 1,16,64,1024,16384] [--out reports/bench]

Writes ``<out>/<gpu>-<date>.json`` ({gpu, torch, triton, commit, rows: [...]}) and a markdown table beside it.
Each row: model, scope (layer | gemm), gemm (gate_up | down | layer), tokens, mode (fwd | fwd_bwd), lora, variant,
time_us (``triton.testing.do_bench`` median, L2 flushed), ratio_vs_bf16 (time / time of ``bf16_grouped_mm`` with the
same model, scope, gemm, tokens, mode and lora; < 1 is faster), pct_of_roofline (max(FLOPs / peak, bytes / HBM) /
time), and for layer fwd rows rel_err against the stock path on the same weights.

Variants (layer glue = sort, gather, SiLU·up, weighted combine):
- bf16_grouped_mm: stock ``torch._grouped_mm``, LoRA as two more grouped GEMMs, stock glue (``index_add_``): THE baseline;
- bf16_grouped_mm+glue: the same GEMMs with our Triton glue (isolates what the glue alone buys);
- nf4_dequant_grouped_mm: dequantize all experts with our Triton dequant (bitsandbytes is not on the device image; ours
  runs near HBM speed, faster than bnb's measured 2.2-2.5 TB/s), then ``torch._grouped_mm``, stock glue;
- bf16_fused_lora: our Triton grouped GEMM, bf16 weights, LoRA fused, our glue;
- nf4_fused: our NF4 path, policy "auto" (K-loop dequant up to 128 rows/expert, dequant-to-scratch above), our glue;
- nf4_kloop: our NF4 K-loop-dequant kernels at every size (policy "fused": the decode kernel up to 16 rows/expert);
- fp8_block_fused: our 128x128-block FP8 kernel (1x128 activation quant), our glue;
- fp8_rowwise_scaled: ``torch._scaled_grouped_mm`` row-wise (forward only, no LoRA), our glue.
Forward rows up to 1024 tokens are also timed as CUDA-graph replays (time_us_graph). Weights: random bf16 (std 0.02);
NF4 blocksize 64 with fp32 absmax (a double-quantized checkpoint is de-nested once at load: same kernel cost);
routing: top-k of a softmax over Gaussian logits. Rooflines: HBM 4.27 TB/s, bf16 786 TFLOP/s, FP8 1350 TFLOP/s.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import datetime as dt
import functools
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

from impl.ops.baselines import torch_grouped_linear  # noqa: E402
from impl.ops.formats import FMT_BF16, GroupedWeight  # noqa: E402
from impl.ops.fp8_rowwise import fp8_rowwise_linear, quantize_weight_rowwise  # noqa: E402
from impl.ops.grouped_lora import grouped_linear  # noqa: E402
from impl.ops.moe_layer import moe_layer, sort_pairs  # noqa: E402
from impl.ops.quant import quantize_fp8_block_experts, quantize_nf4_experts  # noqa: E402

DEV = "cuda"
HBM = 4.27e12
PEAK = {"bf16": 786e12, "fp8": 1.35e15}
MODELS = {  # name: (H, I, E, top_k)
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "gpt_oss_120b_like": (2880, 2880, 128, 4),  # GPT-OSS-120B expert shapes in the fused_linear layout (SiLU-GLU, no bias)
    "deepseek_v3_like": (7168, 2048, 256, 8),  # all 256 routed experts (no shared expert)
}
VARIANTS = ["bf16_grouped_mm", "bf16_grouped_mm+glue", "nf4_dequant_grouped_mm", "bf16_fused_lora", "nf4_fused",
            "nf4_kloop", "fp8_block_fused", "fp8_rowwise_scaled"]
STOCK_COMBINE = ("bf16_grouped_mm", "nf4_dequant_grouped_mm")  # stock layers: stock glue (index_add_ combine)
BYTES_PER_PARAM = {"bf16_grouped_mm": 2.0, "bf16_grouped_mm+glue": 2.0, "bf16_fused_lora": 2.0, "nf4_dequant_grouped_mm": 0.5625,
                   "nf4_fused": 0.5625, "nf4_kloop": 0.5625, "fp8_block_fused": 1.0 + 4 / 16384, "fp8_rowwise_scaled": 1.0}
RANK = 16
STOCK_REF = {"nf4_kloop": "nf4_dequant_grouped_mm", "bf16_fused_lora": "bf16_grouped_mm", "bf16_grouped_mm+glue": "bf16_grouped_mm", "nf4_fused": "nf4_dequant_grouped_mm",
             "nf4_dequant_grouped_mm": "bf16_grouped_mm", "fp8_block_fused": "bf16_grouped_mm",
             "fp8_rowwise_scaled": "bf16_grouped_mm"}


def log(*a):
    print(*a, flush=True)


def build_weights(H, I, E, variants):
    gu = torch.randn(E, 2 * I, H, device=DEV, dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, H, I, device=DEV, dtype=torch.bfloat16) * 0.02
    bf = (GroupedWeight(FMT_BF16, tuple(gu.shape), gu), GroupedWeight(FMT_BF16, tuple(dn.shape), dn))
    out = {"bf16_grouped_mm": bf, "bf16_fused_lora": bf, "bf16_grouped_mm+glue": bf}
    if {"nf4_fused", "nf4_dequant_grouped_mm", "nf4_kloop"} & set(variants):
        nf = (quantize_nf4_experts(gu), quantize_nf4_experts(dn))
        out["nf4_fused"] = out["nf4_dequant_grouped_mm"] = out["nf4_kloop"] = nf
    if "fp8_block_fused" in variants:
        out["fp8_block_fused"] = (quantize_fp8_block_experts(gu), quantize_fp8_block_experts(dn))
    if "fp8_rowwise_scaled" in variants:
        out["fp8_rowwise_scaled"] = (quantize_weight_rowwise(gu), quantize_weight_rowwise(dn))
    return out


def linear_of(variant):
    if variant in ("bf16_grouped_mm", "nf4_dequant_grouped_mm", "bf16_grouped_mm+glue"):
        return torch_grouped_linear
    if variant == "fp8_rowwise_scaled":
        return fp8_rowwise_linear
    if variant == "nf4_kloop":
        return functools.partial(grouped_linear, nf4_policy="fused")
    return grouped_linear


def supports(variant, mode, lora, T=0):
    if variant == "nf4_kloop" and T > 1024:  # 10-80x slower than bf16 there (reports/bench, first runs): skipped
        return False
    if variant == "fp8_rowwise_scaled":
        return mode == "fwd" and not lora
    return True


def time_us(fn, long: bool) -> float:
    return 1e3 * do_bench(fn, warmup=10 if long else 25, rep=40 if long else 100, return_mode="median")


def graph_time_us(fn) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph (no launch overhead: how decode runs in serving)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return time_us(g.replay, False)


def layer_cost(H, I, S, n_active, variant, mode, lora):
    flops = 2 * S * (H * 2 * I + I * H)
    lflops = 2 * S * RANK * ((H + 2 * I) + (I + H)) if lora else 0
    wbytes = n_active * 3 * H * I * BYTES_PER_PARAM[variant]
    abytes = 2 * S * (H + 2 * I + I + H)
    if mode == "fwd_bwd":
        flops, lflops, wbytes, abytes = 2 * flops, 3 * lflops, 2 * wbytes, 2 * abytes
    return flops + lflops, wbytes + abytes


def gemm_cost(R, C, S, n_active, variant, mode, lora):
    flops = 2 * S * R * C + (2 * S * RANK * (R + C) if lora else 0)
    byts = n_active * R * C * BYTES_PER_PARAM[variant] + 2 * S * (R + C)
    if mode == "fwd_bwd":
        flops, byts = 2 * flops + (2 * S * RANK * (R + C) * 2 if lora else 0), 2 * byts
    return flops, byts


def roofline_pct(flops, byts, variant, t_us):
    peak = PEAK["fp8"] if variant.startswith("fp8") else PEAK["bf16"]
    return 100.0 * max(flops / peak, byts / HBM) / (t_us * 1e-6)


def bench_model(name, tokens_list, variants, scopes, rows, long_tokens=4096, flush=lambda: None):
    H, I, E, k = MODELS[name]
    log(f"== {name}: H={H} I={I} E={E} top{k}")
    t0 = time.time()
    W = build_weights(H, I, E, variants)
    log(f"   weights built in {time.time() - t0:.1f}s")
    g = torch.Generator(device=DEV).manual_seed(0)
    loras = {
        "gate_up": ((torch.randn(RANK * E, H, device=DEV, generator=g) * 0.02).to(torch.bfloat16),
                    (torch.randn(2 * I, RANK * E, device=DEV, generator=g) * 0.02).to(torch.bfloat16), 2.0),
        "down": ((torch.randn(RANK * E, I, device=DEV, generator=g) * 0.02).to(torch.bfloat16),
                 (torch.randn(H, RANK * E, device=DEV, generator=g) * 0.02).to(torch.bfloat16), 2.0),
    }
    for T in tokens_list:
        logits = torch.randn(T, E, device=DEV, generator=g)
        w, idx = torch.softmax(logits, -1).topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=g)
        dy = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=g)
        order, tok, offs = sort_pairs(idx, E)
        S = T * k
        n_active = int((torch.diff(offs, prepend=offs.new_zeros(1)) > 0).sum())
        long = T >= long_tokens
        ref_out = {}
        for mode in ("fwd", "fwd_bwd"):
            for lora in (False, True):
                lmap = loras if lora else None
                base_t = {}
                for v in variants:
                    if not supports(v, mode, lora, T):
                        continue
                    gu, dn = W[v]
                    lin = linear_of(v)
                    cmode = "stock" if v in STOCK_COMBINE else "fast"
                    # ---- whole layer
                    if "layer" in scopes:
                        if mode == "fwd":
                            def fn(gu=gu, dn=dn, lin=lin, lmap=lmap, cmode=cmode):
                                with torch.no_grad():
                                    return moe_layer(x, idx, w, gu, dn, lmap, lin, cmode)
                        else:
                            leaves = [x.detach().clone().requires_grad_(True)]
                            lm = None
                            if lmap:
                                lm = {}
                                for key, (A, B, s) in lmap.items():
                                    A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
                                    leaves += [A_, B_]
                                    lm[key] = (A_, B_, s)

                            def fn(gu=gu, dn=dn, lin=lin, lm=lm, leaves=leaves, cmode=cmode):
                                out = moe_layer(leaves[0], idx, w, gu, dn, lm, lin, cmode)
                                return torch.autograd.grad(out, leaves, dy)
                        try:
                            res = fn()
                            torch.cuda.synchronize()
                            t = time_us(fn, long)
                        except Exception as exc:  # report, never hide: the row carries the error
                            log(f"   FAILED layer {name} T={T} {mode} lora={lora} {v}: {type(exc).__name__}: {exc}")
                            rows.append(dict(model=name, scope="layer", gemm="layer", tokens=T, mode=mode, lora=lora,
                                             variant=v, error=f"{type(exc).__name__}: {exc}"[:300]))
                            continue
                        fl, by = layer_cost(H, I, S, n_active, v, mode, lora)
                        row = dict(model=name, scope="layer", gemm="layer", tokens=T, mode=mode, lora=lora, variant=v,
                                   time_us=round(t, 2), pct_of_roofline=round(roofline_pct(fl, by, v, t), 1))
                        if mode == "fwd" and T <= 1024:
                            try:
                                tg = graph_time_us(fn)
                                row["time_us_graph"] = round(tg, 2)
                                row["pct_of_roofline_graph"] = round(roofline_pct(fl, by, v, tg), 1)
                                if v in ("bf16_grouped_mm", "bf16_grouped_mm+glue"):
                                    base_t[("graph", v)] = tg
                                bgr = base_t.get(("graph", "bf16_grouped_mm"))
                                row["ratio_vs_bf16_graph"] = round(tg / bgr, 3) if bgr else None
                            except Exception as exc:
                                row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
                        if mode == "fwd":
                            ref_out[(v, lora)] = res.float()
                            ref_v = STOCK_REF.get(v)
                            if ref_v and (ref_v, lora) in ref_out:
                                a, b = res.float(), ref_out[(ref_v, lora)]
                                row["rel_err"] = float((a - b).norm() / b.norm())
                                row["rel_err_vs"] = ref_v
                        if v in ("bf16_grouped_mm", "bf16_grouped_mm+glue"):
                            base_t[("layer", v)] = t
                        bt = base_t.get(("layer", "bf16_grouped_mm"))
                        row["ratio_vs_bf16"] = round(t / bt, 3) if bt else None
                        bg = base_t.get(("layer", "bf16_grouped_mm+glue"))
                        row["ratio_vs_bf16_gather"] = round(t / bg, 3) if bg else None
                        rows.append(row)
                        log(f"   layer T={T:6d} {mode:7s} lora={int(lora)} {v:24s} {t:10.1f} us  "
                            f"x{row['ratio_vs_bf16']}  {row['pct_of_roofline']}%  graph={row.get('time_us_graph', '')} "
                            f"{row.get('graph_error', '')} err={row.get('rel_err', '')}")
                    # ---- bare GEMMs (sorted rows as input)
                    if "gemm" in scopes and v != "bf16_grouped_mm+glue":
                        for proj, gw in (("gate_up", gu), ("down", dn)):
                            _, R, C = gw.shape
                            xs = torch.randn(S, C, device=DEV, dtype=torch.bfloat16, generator=g)
                            dys = torch.randn(S, R, device=DEV, dtype=torch.bfloat16, generator=g)
                            la = loras[proj] if lora else (None, None, 1.0)
                            if mode == "fwd":
                                def gfn(gw=gw, lin=lin, la=la, xs=xs):
                                    with torch.no_grad():
                                        return lin(xs, gw, offs, *la)
                            else:
                                gl = [xs.clone().requires_grad_(True)]
                                la2 = la
                                if lora:
                                    A_, B_ = la[0].clone().requires_grad_(True), la[1].clone().requires_grad_(True)
                                    gl += [A_, B_]
                                    la2 = (A_, B_, la[2])

                                def gfn(gw=gw, lin=lin, la2=la2, gl=gl, dys=dys):
                                    return torch.autograd.grad(lin(gl[0], gw, offs, *la2), gl, dys)
                            try:
                                gfn()
                                torch.cuda.synchronize()
                                t = time_us(gfn, long)
                            except Exception as exc:
                                log(f"   FAILED gemm {proj} {name} T={T} {mode} lora={lora} {v}: {exc}")
                                rows.append(dict(model=name, scope="gemm", gemm=proj, tokens=T, mode=mode, lora=lora,
                                                 variant=v, error=f"{type(exc).__name__}: {exc}"[:300]))
                                continue
                            fl, by = gemm_cost(R, C, S, n_active, v, mode, lora)
                            key = ("gemm", proj)
                            if v == "bf16_grouped_mm":
                                base_t[key] = t
                            bt = base_t.get(key)
                            rows.append(dict(model=name, scope="gemm", gemm=proj, tokens=T, mode=mode, lora=lora,
                                             variant=v, time_us=round(t, 2),
                                             ratio_vs_bf16=round(t / bt, 3) if bt else None,
                                             pct_of_roofline=round(roofline_pct(fl, by, v, t), 1)))
                            log(f"   gemm {proj:7s} T={T:6d} {mode:7s} lora={int(lora)} {v:24s} {t:10.1f} us  "
                                f"x{rows[-1]['ratio_vs_bf16']}  {rows[-1]['pct_of_roofline']}%")
        del ref_out
        torch.cuda.empty_cache()
        flush()
    del W
    torch.cuda.empty_cache()


def markdown(meta, rows) -> str:
    lines = [f"# MoE expert benchmark — {meta['gpu']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. Times in µs (do_bench median); "
             "in brackets the ratio to `bf16_grouped_mm` (same model/scope/tokens/mode/LoRA; < 1 is faster). "
             "`—`: not supported (row-wise FP8 is forward-only without LoRA) or not run.", ""]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lines.append("| model | scope | tokens | mode | LoRA | " + " | ".join(variants) + " |")
    lines.append("|---|---|---:|---|---|" + "---:|" * len(variants))
    keys = []
    for r in rows:
        kk = (r["model"], r["gemm"], r["tokens"], r["mode"], r["lora"])
        if kk not in keys:
            keys.append(kk)
    for kk in keys:
        cells = []
        for v in variants:
            m = [r for r in rows if (r["model"], r["gemm"], r["tokens"], r["mode"], r["lora"], r["variant"]) == (*kk, v)]
            if not m:
                cells.append("—")
            elif "error" in m[0]:
                cells.append("error")
            else:
                ratio = m[0].get("ratio_vs_bf16")
                cells.append(f"{m[0]['time_us']:.0f}" + (f" ({ratio:.2f})" if ratio is not None else ""))
        lines.append(f"| {kk[0]} | {kk[1]} | {kk[2]} | {kk[3]} | {'r16' if kk[4] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets(rows) -> str:
    """The issue's target figures, per model, against the stock bf16 layer and the bf16 layer with our combine."""
    def t(model, T, mode, lora, v, graph=False):
        m = [r for r in rows if r["scope"] == "layer" and r["model"] == model and r["tokens"] == T
             and r["mode"] == mode and r["lora"] == lora and r["variant"] == v and "time_us" in r]
        if not m:
            return None
        return m[0].get("time_us_graph") if graph else m[0]["time_us"]

    def fmt(a, b, inv=False):
        if a is None or b is None:
            return "n/a"
        return f"{(b / a if inv else a / b):.2f}"

    out = ["", "## Target figures (layer scope)", "",
           "| model | figure | target | vs stock bf16 layer | vs bf16 layer with our glue (same GEMMs as stock) |",
           "|---|---|---|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        B, G = "bf16_grouped_mm", "bf16_grouped_mm+glue"
        for T in (16, 64):
            n = t(model, T, "fwd", False, "nf4_fused", True)
            out.append(f"| {model} | NF4 decode fwd {T} tokens, speedup, CUDA graph replay | >= 2x | "
                       f"{fmt(n, t(model, T, 'fwd', False, B, True), True)} | "
                       f"{fmt(n, t(model, T, 'fwd', False, G, True), True)} |")
        nl = t(model, 16384, "fwd_bwd", True, "nf4_fused")
        out.append(f"| {model} | NF4+LoRA fwd_bwd 16384, time ratio (LoRA baseline) | <= 0.85 | "
                   f"{fmt(nl, t(model, 16384, 'fwd_bwd', True, B))} | {fmt(nl, t(model, 16384, 'fwd_bwd', True, G))} |")
        for v in ("bf16_fused_lora", "nf4_fused"):
            a, b = t(model, 16384, "fwd_bwd", True, v), t(model, 16384, "fwd_bwd", False, v)
            ov = f"{100 * (a / b - 1):.1f} %" if a and b else "n/a"
            out.append(f"| {model} | LoRA overhead fwd_bwd 16384, {v} | <= 8 % | {ov} | (same) |")
        for T in (16, 64):
            n = t(model, T, "fwd", False, "nf4_fused")
            out.append(f"| {model} | NF4 decode fwd {T} tokens, speedup, eager | >= 2x | "
                       f"{fmt(n, t(model, T, 'fwd', False, B), True)} | {fmt(n, t(model, T, 'fwd', False, G), True)} |")
        f8 = t(model, 16384, "fwd", False, "fp8_block_fused")
        out.append(f"| {model} | FP8 block fwd 16384, speedup | >= 1.5x | "
                   f"{fmt(f8, t(model, 16384, 'fwd', False, B), True)} | {fmt(f8, t(model, 16384, 'fwd', False, G), True)} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="1,16,64,1024,16384")
    ap.add_argument("--tokens-for", default="", help="per-model override, e.g. deepseek_v3_like=16,1024,16384;...")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--scopes", default="layer,gemm")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    ap.add_argument("--commit", default=os.environ.get("BENCH_COMMIT", "unknown"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    per_model = {}
    for item in filter(None, args.tokens_for.split(";")):
        m, ts = item.split("=")
        per_model[m] = [int(t) for t in ts.split(",")]
    variants = args.variants.split(",")
    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, commit=args.commit,
                date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
                cuda=torch.version.cuda, tokens=args.tokens, tokens_for=per_model)
    rows: list[dict] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = gpu.lower().replace(" ", "_") + "-" + meta["date"] + (f"-{args.tag}" if args.tag else "")
    t0 = time.time()
    def flush():
        meta["elapsed_s"] = round(time.time() - t0, 1)
        (out_dir / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        (out_dir / f"{stem}.md").write_text(markdown(meta, rows) + targets(rows))

    for m in args.models.split(","):
        tokens = per_model.get(m, [int(t) for t in args.tokens.split(",")])
        bench_model(m, tokens, variants, args.scopes.split(","), rows, flush=flush)
    log(f"wrote {out_dir / stem}.json/.md in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
