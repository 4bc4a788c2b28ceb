"""MoE expert benchmark on one CUDA GPU: the model's experts forward, whole layers and bare grouped GEMMs, bf16 / NF4
/ FP8, with and without LoRA, and transformers' own experts forward with PEFT's LoRA as the peer.

    python3 bench/bench_moe.py [--quick] [--models qwen3_30b_a3b,...] [--tokens 1,16,64,1024,16384] [--out reports/bench]

``--quick``: only the rows the targets need (tokens 16 / 64 forward, 16384 forward and fwd_bwd with and without LoRA;
layer scope; the variants the target table reads). Writes ``<out>/<gpu>-<date>[-tag].json`` ({gpu, torch, triton,
transformers, peft, cuda, commit, rows: [...], targets: [...]}) and a markdown table beside it. Each row: model, scope
(layer | gemm), gemm (gate_up | down | layer), tokens, mode (fwd | fwd_bwd), lora, variant, time_us
(``triton.testing.do_bench`` median, L2 flushed), ratio_vs_bf16 (time / time of ``bf16_grouped_mm`` with the same
model, scope, gemm, tokens, mode and lora; < 1 is faster), ratio_vs_bf16_gather (the same against
``bf16_grouped_mm+glue``, the baseline of the targets), pct_of_roofline (max(FLOPs / peak, bytes / HBM) / time), and
for layer fwd rows rel_err against a reference variant on the same weights (`STOCK_REF`).

Variants (layer glue = sort, gather, SiLU·up, weighted combine):
- bf16_grouped_mm: stock ``torch._grouped_mm``, LoRA as two more grouped GEMMs, stock glue (``index_add_``);
- bf16_grouped_mm+glue: the same GEMMs with our Triton glue: THE baseline of the targets (isolates the glue);
- nf4_dequant_grouped_mm: dequantize all experts with our Triton dequant (bitsandbytes is not on the device image; ours
  runs near HBM speed, faster than bnb's measured 2.2-2.5 TB/s), then ``torch._grouped_mm``, stock glue;
- bf16_fused_lora: our Triton grouped GEMM, bf16 weights, LoRA in the epilogue, our glue;
- nf4_fused: our NF4 path, policy "auto" (K-loop dequant up to 128 rows/expert, dequant-to-scratch above), our glue;
- nf4_kloop: our NF4 K-loop-dequant kernels at every size (policy "fused": the decode kernel up to 16 rows/expert);
- fp8_block_fused: our 128x128-block FP8 kernel (1x128 activation quant), our glue;
- fp8_rowwise_scaled: ``torch._scaled_grouped_mm`` row-wise (forward only, no LoRA), our glue;
- model_entry_bf16 / _nf4 / _fp8: `impl.forward.experts_forward`, the entry point a model calls, through a
  `QuantizedExperts` holding the same weights as bf16_fused_lora / nf4_fused / fp8_block_fused (backend "auto", which
  picks the Triton kernels on CUDA), the LoRA attached as PEFT's hook attaches it (`impl.forward.lora_attached`);
- hf_grouped_mm_peft: the peer, as a user gets it today: transformers' experts module
  (``Qwen3MoeExperts``, ``config._experts_implementation = "grouped_mm"``) on the bf16 weights, LoRA by PEFT
  ``target_parameters`` (``ParamWrapper``; the same factors, in PEFT's orientation).
Forward rows up to 1024 tokens are also timed as CUDA-graph replays (time_us_graph). Weights: random bf16 (std 0.02);
NF4 blocksize 64 with fp32 absmax (a double-quantized checkpoint is de-nested once at load: same kernel cost);
routing: top-k of a softmax over Gaussian logits. Rooflines: HBM 4.27 TB/s, bf16 786 TFLOP/s, FP8 1350 TFLOP/s.

``--device cpu`` (with TRITON_INTERPRET=1, ``--models tiny``) runs every code path once, untimed: the smoke test
tests/ops/test_bench.py uses it; ``--model-backend triton`` makes the model entries run the kernels there too.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from impl.forward import LoraSpec, lora_attached  # noqa: E402
from impl.ops.baselines import torch_grouped_linear  # noqa: E402
from impl.ops.formats import FMT_BF16, GroupedWeight  # noqa: E402
from impl.ops.fp8_rowwise import fp8_rowwise_linear, quantize_weight_rowwise  # noqa: E402
from impl.ops.grouped_lora import grouped_linear  # noqa: E402
from impl.ops.moe_layer import moe_layer, sort_pairs  # noqa: E402
from impl.ops.quant import quantize_fp8_block_experts, quantize_nf4_experts  # noqa: E402
from impl.quant_experts import QuantizedExperts  # noqa: E402
from impl.storage import DenseConfig, DenseWeight, FP8Config, FP8Weight, NF4Config, NF4Weight  # noqa: E402
from reference.layout import FUSED_LINEAR, Orientation, semantic_orientation  # noqa: E402
from reference.lora import STRIDE_E, convert_adapter  # noqa: E402

DEV = "cuda"  # --device
MODEL_BACKEND = "auto"  # --model-backend: what the model entries run ("auto" picks the Triton kernels on CUDA)
HBM = 4.27e12
PEAK = {"bf16": 786e12, "fp8": 1.35e15}
MODELS = {  # name: (H, I, E, top_k)
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "gpt_oss_120b_like": (2880, 2880, 128, 4),  # GPT-OSS-120B expert shapes in the fused_linear layout (SiLU-GLU, no bias)
    "deepseek_v3_like": (7168, 2048, 256, 8),  # all 256 routed experts (no shared expert)
    "tiny": (64, 64, 4, 2),  # CPU smoke runs only (TRITON_INTERPRET=1); not in the default list
}
DEFAULT_MODELS = ("qwen3_30b_a3b", "gpt_oss_120b_like", "deepseek_v3_like")
BASELINE = "bf16_grouped_mm+glue"  # the targets' baseline: stock GEMMs, our glue, measured in the same run
STOCK = "bf16_grouped_mm"
LAYER_VARIANTS = ["bf16_grouped_mm", "bf16_grouped_mm+glue", "nf4_dequant_grouped_mm", "bf16_fused_lora", "nf4_fused",
                  "nf4_kloop", "fp8_block_fused", "fp8_rowwise_scaled"]  # fmt: skip
# model entry variant -> the layer variant whose weights it holds (and whose kernels it must run)
MODEL_VARIANTS = {"model_entry_bf16": "bf16_fused_lora", "model_entry_nf4": "nf4_fused",
                  "model_entry_fp8": "fp8_block_fused"}  # fmt: skip
PEER = "hf_grouped_mm_peft"
VARIANTS = [*LAYER_VARIANTS, *MODEL_VARIANTS, PEER]
STOCK_COMBINE = ("bf16_grouped_mm", "nf4_dequant_grouped_mm")  # stock layers: stock glue (index_add_ combine)
BYTES_PER_PARAM = {"bf16_grouped_mm": 2.0, "bf16_grouped_mm+glue": 2.0, "bf16_fused_lora": 2.0, "nf4_dequant_grouped_mm": 0.5625,
                   "nf4_fused": 0.5625, "nf4_kloop": 0.5625, "fp8_block_fused": 1.0 + 4 / 16384, "fp8_rowwise_scaled": 1.0,
                   "model_entry_bf16": 2.0, "model_entry_nf4": 0.5625, "model_entry_fp8": 1.0 + 4 / 16384, PEER: 2.0}
RANK = 16
LORA_SCALE = 2.0
# rel_err reference of each variant's fwd output: the first of these that ran (same weights, except NF4/FP8 vs bf16)
STOCK_REF = {"nf4_kloop": ("nf4_dequant_grouped_mm",), "bf16_fused_lora": (STOCK,), BASELINE: (STOCK,),
             "nf4_fused": ("nf4_dequant_grouped_mm",), "nf4_dequant_grouped_mm": (STOCK,), "fp8_block_fused": (STOCK,),
             "fp8_rowwise_scaled": (STOCK,), "model_entry_bf16": ("bf16_fused_lora", STOCK),
             "model_entry_nf4": ("nf4_fused", "nf4_dequant_grouped_mm"), "model_entry_fp8": ("fp8_block_fused",),
             PEER: (STOCK,)}  # fmt: skip
MODES = ("fwd", "fwd_bwd")
# --quick: the (tokens, mode, lora) cases the target table reads, for these variants
QUICK_CASES = ((16, "fwd", False), (64, "fwd", False), (16384, "fwd", False), (16384, "fwd_bwd", False),
               (16384, "fwd_bwd", True))  # fmt: skip
QUICK_VARIANTS = [STOCK, BASELINE, "bf16_fused_lora", "nf4_fused", "fp8_block_fused", *MODEL_VARIANTS, PEER]


def log(*a):
    print(*a, flush=True)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def build_weights(H, I, E, variants):
    gu = torch.randn(E, 2 * I, H, device=DEV, dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, H, I, device=DEV, dtype=torch.bfloat16) * 0.02
    bf = (GroupedWeight(FMT_BF16, tuple(gu.shape), gu), GroupedWeight(FMT_BF16, tuple(dn.shape), dn))
    out = {"bf16_grouped_mm": bf, "bf16_fused_lora": bf, "bf16_grouped_mm+glue": bf, "model_entry_bf16": bf, PEER: bf}
    if {"nf4_fused", "nf4_dequant_grouped_mm", "nf4_kloop", "model_entry_nf4"} & set(variants):
        nf = (quantize_nf4_experts(gu), quantize_nf4_experts(dn))
        out["nf4_fused"] = out["nf4_dequant_grouped_mm"] = out["nf4_kloop"] = out["model_entry_nf4"] = nf
    if {"fp8_block_fused", "model_entry_fp8"} & set(variants):
        out["fp8_block_fused"] = out["model_entry_fp8"] = (quantize_fp8_block_experts(gu), quantize_fp8_block_experts(dn))
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
    if variant == "fp8_rowwise_scaled":  # torch._scaled_grouped_mm: CUDA SM90+, forward only
        return mode == "fwd" and not lora and DEV == "cuda"
    return True


def parse_cases(text: str) -> tuple[tuple[int, str, bool], ...]:
    """``"16:fwd:0,16384:fwd_bwd:1"`` -> ((16, "fwd", False), (16384, "fwd_bwd", True))."""
    out = []
    for item in filter(None, text.split(",")):
        T, mode, lora = item.split(":")
        if mode not in MODES or lora not in ("0", "1"):
            raise ValueError(f"case {item!r}: need TOKENS:fwd|fwd_bwd:0|1")
        out.append((int(T), mode, lora == "1"))
    return tuple(out)


# --- timing -----------------------------------------------------------------------------------------------------------


def time_us(fn, long: bool) -> float:
    if DEV != "cuda":  # smoke run: one call, not a measurement
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    from triton.testing import do_bench

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
    peak = PEAK["fp8"] if "fp8" in variant else PEAK["bf16"]
    return 100.0 * max(flops / peak, byts / HBM) / (t_us * 1e-6)


# --- the modules a model runs: impl's QuantizedExperts and transformers' experts with PEFT ----------------------------


def hf_experts(H, I, E, k, gate_up: torch.Tensor, down: torch.Tensor) -> nn.Module:
    """transformers' ``Qwen3MoeExperts`` (fused_linear, SiLU) on the given bf16 weights (no copy), set to the
    ``grouped_mm`` experts implementation."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                         hidden_act="silu")  # fmt: skip
    cfg._experts_implementation = "grouped_mm"
    if cfg._experts_implementation != "grouped_mm":
        raise RuntimeError(f"could not select the grouped_mm experts implementation: {cfg._experts_implementation}")
    with torch.device("meta"):
        ex = Qwen3MoeExperts(cfg)
    ex.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    ex.down_proj = nn.Parameter(down, requires_grad=False)
    return ex


def model_experts(variant: str, H, I, E, k, W: dict) -> QuantizedExperts:
    """The `QuantizedExperts` a model loaded with impl holds, on the bench's weights of ``variant`` (no copy); the
    transformers experts module it replaces holds the bf16 weights (only its shapes and attributes are read)."""
    gu, dn = W[variant]
    names = ("gate_up_proj", "down_proj")
    if variant == "model_entry_bf16":
        cfg, store = DenseConfig(torch.bfloat16), {n: DenseWeight(w.data) for n, w in zip(names, (gu, dn))}
    elif variant == "model_entry_nf4":
        cfg = NF4Config(64, False, torch.bfloat16)
        store = {n: NF4Weight.from_state(w.data, w.scale, w.shape, 64) for n, w in zip(names, (gu, dn))}
    elif variant == "model_entry_fp8":
        cfg = FP8Config((128, 128), torch.bfloat16)
        store = {n: FP8Weight(w.data, w.scale, (128, 128)) for n, w in zip(names, (gu, dn))}
    else:
        raise ValueError(f"not a model entry variant: {variant!r}")
    original = hf_experts(H, I, E, k, W[STOCK][0].data, W[STOCK][1].data)
    return QuantizedExperts(original, cfg, weights=store, backend=MODEL_BACKEND)


def peer_model(H, I, E, k, weights, loras):
    """(PEFT model, its experts module): transformers' grouped_mm experts with PEFT LoRA holding ``loras``' factors."""
    import peft

    from impl.peft_integration import wrapper_orientation
    from tests.support.zoo import Holder

    ex = hf_experts(H, I, E, k, weights[0].data, weights[1].data)
    pm = peft.get_peft_model(Holder(ex), peft.LoraConfig(r=RANK, lora_alpha=int(RANK * LORA_SCALE),
                                                         target_parameters=["experts.gate_up_proj", "experts.down_proj"]))  # fmt: skip
    src = semantic_orientation(FUSED_LINEAR)  # the bench's factors: PEFT's fused_linear swapped, stride-E
    for wrapper in (m for m in pm.modules() if isinstance(m, peft.tuners.lora.ParamWrapper)):
        A, B, s = loras["gate_up" if wrapper.parameter_name == "gate_up_proj" else "down"]
        if float(wrapper.scaling["default"]) != s:
            raise RuntimeError(f"PEFT scaling {wrapper.scaling['default']} != {s}")
        dst = Orientation(wrapper_orientation(wrapper, "default"))
        a, b = convert_adapter(A.float(), B.float(), E, src_orientation=src, dst_orientation=dst)
        with torch.no_grad():
            wrapper.lora_A["default"].weight.copy_(a)
            wrapper.lora_B["default"].weight.copy_(b)
    return pm.to(DEV), ex


# --- one layer row ----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """The inputs of one (model, tokens) step: x [T, H], routing idx / w [T, k], upstream gradient dy [T, H]."""

    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    dy: torch.Tensor
    loras: dict


def layer_fn(v: str, W: dict, modules: dict, case: Case, mode: str, lora: bool):
    """The callable timed for one layer row: fwd (no grad) or fwd_bwd (``autograd.grad`` of x and the LoRA factors)."""
    x, idx, w, dy = case.x, case.idx, case.w, case.dy
    lmap = case.loras if lora else None
    if v == PEER:
        pm, ex = modules[PEER]
        run = (lambda xx: pm(xx, idx, w)) if lora else (lambda xx: ex(xx, idx, w))
        leaves = [x.detach().clone().requires_grad_(mode == "fwd_bwd")]
        if lora:
            leaves += [p for n, p in pm.named_parameters() if "lora_" in n]
    elif v in MODEL_VARIANTS:
        q = modules[v]
        leaves = [x.detach().clone().requires_grad_(mode == "fwd_bwd")]
        specs = {}
        if lora:
            orient = semantic_orientation(FUSED_LINEAR).value
            for key, name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                A, B, s = lmap[key]
                A_, B_ = A.clone().requires_grad_(mode == "fwd_bwd"), B.clone().requires_grad_(mode == "fwd_bwd")
                leaves += [A_, B_]
                specs[name] = [LoraSpec(A_, B_, s, orient, STRIDE_E)]

        def run(xx):
            with contextlib.ExitStack() as stack:
                for name, sp in specs.items():
                    stack.enter_context(lora_attached(q, name, sp))
                return q(xx, idx, w)
    else:
        gu, dn = W[v]
        lin = linear_of(v)
        cmode = "stock" if v in STOCK_COMBINE else "fast"
        leaves = [x.detach().clone().requires_grad_(mode == "fwd_bwd")]
        lm = None
        if lmap:
            lm = {}
            for key, (A, B, s) in lmap.items():
                A_, B_ = A.clone().requires_grad_(mode == "fwd_bwd"), B.clone().requires_grad_(mode == "fwd_bwd")
                leaves += [A_, B_]
                lm[key] = (A_, B_, s)

        def run(xx):
            return moe_layer(xx, idx, w, gu, dn, lm, lin, cmode)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return run(leaves[0])
    else:
        def fn():
            return torch.autograd.grad(run(leaves[0]), leaves, dy)
    return fn


def bench_model(name, tokens_list, variants, scopes, rows, long_tokens=4096, flush=lambda: None, cases=None):
    """Rows for one model. ``cases``: the (tokens, mode, lora) to run (None: every combination)."""
    H, I, E, k = MODELS[name]
    log(f"== {name}: H={H} I={I} E={E} top{k}")
    t0 = time.time()
    W = build_weights(H, I, E, variants)
    g = torch.Generator(device=DEV).manual_seed(0)
    loras = {
        "gate_up": ((torch.randn(RANK * E, H, device=DEV, generator=g) * 0.02).to(torch.bfloat16),
                    (torch.randn(2 * I, RANK * E, device=DEV, generator=g) * 0.02).to(torch.bfloat16), LORA_SCALE),
        "down": ((torch.randn(RANK * E, I, device=DEV, generator=g) * 0.02).to(torch.bfloat16),
                 (torch.randn(H, RANK * E, device=DEV, generator=g) * 0.02).to(torch.bfloat16), LORA_SCALE),
    }
    modules = {v: model_experts(v, H, I, E, k, W) for v in variants if v in MODEL_VARIANTS}
    if PEER in variants:
        modules[PEER] = peer_model(H, I, E, k, W[PEER], loras)
    log(f"   weights and modules built in {time.time() - t0:.1f}s")
    for T in tokens_list:
        logits = torch.randn(T, E, device=DEV, generator=g)
        w, idx = torch.softmax(logits, -1).topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=g)
        dy = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=g)
        case = Case(x, idx, w, dy, loras)
        order, tok, offs = sort_pairs(idx, E)
        S = T * k
        n_active = int((torch.diff(offs, prepend=offs.new_zeros(1)) > 0).sum())
        long = T >= long_tokens
        ref_out = {}
        for mode in MODES:
            for lora in (False, True):
                if cases is not None and (T, mode, lora) not in cases:
                    continue
                base_t = {}
                for v in variants:
                    if not supports(v, mode, lora, T):
                        continue
                    if "layer" in scopes:
                        layer_row(name, v, W, modules, case, T, mode, lora, H, I, S, n_active, long, base_t, ref_out,
                                  rows)  # fmt: skip
                    if "gemm" in scopes and v in LAYER_VARIANTS and v != BASELINE:
                        gemm_rows(name, v, W, loras, T, mode, lora, S, n_active, long, offs, g, base_t, rows)
        del ref_out
        empty_cache()
        flush()
    del W, modules
    empty_cache()


def layer_row(name, v, W, modules, case, T, mode, lora, H, I, S, n_active, long, base_t, ref_out, rows):
    key = dict(model=name, scope="layer", gemm="layer", tokens=T, mode=mode, lora=lora, variant=v)
    try:
        fn = layer_fn(v, W, modules, case, mode, lora)
        res = fn()
        sync()
        t = time_us(fn, long)
    except Exception as exc:  # report, never hide: the row carries the error
        log(f"   FAILED layer {name} T={T} {mode} lora={lora} {v}: {type(exc).__name__}: {exc}")
        rows.append(dict(key, error=f"{type(exc).__name__}: {exc}"[:300]))
        empty_cache()
        return
    fl, by = layer_cost(H, I, S, n_active, v, mode, lora)
    row = dict(key, time_us=round(t, 2), pct_of_roofline=round(roofline_pct(fl, by, v, t), 1))
    if mode == "fwd" and T <= 1024 and DEV == "cuda":
        try:
            tg = graph_time_us(fn)
            row["time_us_graph"] = round(tg, 2)
            row["pct_of_roofline_graph"] = round(roofline_pct(fl, by, v, tg), 1)
            if v in (STOCK, BASELINE):
                base_t[("graph", v)] = tg
            bgr, bgg = base_t.get(("graph", STOCK)), base_t.get(("graph", BASELINE))
            row["ratio_vs_bf16_graph"] = round(tg / bgr, 3) if bgr else None
            row["ratio_vs_bf16_gather_graph"] = round(tg / bgg, 3) if bgg else None
        except Exception as exc:  # a path that cannot be captured: recorded on the row
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if mode == "fwd":
        ref_out[(v, lora)] = res.float()
        ref_v = next((c for c in STOCK_REF.get(v, ()) if (c, lora) in ref_out), None)
        if ref_v is not None:
            a, b = res.float(), ref_out[(ref_v, lora)]
            row["rel_err"] = float((a - b).norm() / b.norm())
            row["rel_err_vs"] = ref_v
    if v in (STOCK, BASELINE):
        base_t[("layer", v)] = t
    bt, bg = base_t.get(("layer", STOCK)), base_t.get(("layer", BASELINE))
    row["ratio_vs_bf16"] = round(t / bt, 3) if bt else None
    row["ratio_vs_bf16_gather"] = round(t / bg, 3) if bg else None
    rows.append(row)
    log(f"   layer T={T:6d} {mode:7s} lora={int(lora)} {v:24s} {t:10.1f} us  x{row['ratio_vs_bf16']}  "
        f"{row['pct_of_roofline']}%  graph={row.get('time_us_graph', '')} {row.get('graph_error', '')} "
        f"err={row.get('rel_err', '')}")


def gemm_rows(name, v, W, loras, T, mode, lora, S, n_active, long, offs, g, base_t, rows):
    """Bare grouped GEMMs of one layer variant (sorted rows as input)."""
    gu, dn = W[v]
    lin = linear_of(v)
    for proj, gw in (("gate_up", gu), ("down", dn)):
        _, R, C = gw.shape
        xs = torch.randn(S, C, device=DEV, dtype=torch.bfloat16, generator=g)
        dys = torch.randn(S, R, device=DEV, dtype=torch.bfloat16, generator=g)
        la = loras[proj] if lora else (None, None, 1.0)
        if mode == "fwd":
            def gfn(gw=gw, la=la, xs=xs):
                with torch.no_grad():
                    return lin(xs, gw, offs, *la)
        else:
            gl = [xs.clone().requires_grad_(True)]
            la2 = la
            if lora:
                A_, B_ = la[0].clone().requires_grad_(True), la[1].clone().requires_grad_(True)
                gl += [A_, B_]
                la2 = (A_, B_, la[2])

            def gfn(gw=gw, la2=la2, gl=gl, dys=dys):
                return torch.autograd.grad(lin(gl[0], gw, offs, *la2), gl, dys)
        try:
            gfn()
            sync()
            t = time_us(gfn, long)
        except Exception as exc:  # report, never hide: the row carries the error
            log(f"   FAILED gemm {proj} {name} T={T} {mode} lora={lora} {v}: {exc}")
            rows.append(dict(model=name, scope="gemm", gemm=proj, tokens=T, mode=mode, lora=lora, variant=v,
                             error=f"{type(exc).__name__}: {exc}"[:300]))  # fmt: skip
            continue
        fl, by = gemm_cost(R, C, S, n_active, v, mode, lora)
        key = ("gemm", proj)
        if v == STOCK:
            base_t[key] = t
        bt = base_t.get(key)
        rows.append(dict(model=name, scope="gemm", gemm=proj, tokens=T, mode=mode, lora=lora, variant=v,
                         time_us=round(t, 2), ratio_vs_bf16=round(t / bt, 3) if bt else None,
                         pct_of_roofline=round(roofline_pct(fl, by, v, t), 1)))  # fmt: skip
        log(f"   gemm {proj:7s} T={T:6d} {mode:7s} lora={int(lora)} {v:24s} {t:10.1f} us  "
            f"x{rows[-1]['ratio_vs_bf16']}  {rows[-1]['pct_of_roofline']}%")


# --- reports ----------------------------------------------------------------------------------------------------------


def markdown(meta, rows) -> str:
    lines = [f"# MoE expert benchmark — {meta['gpu']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta.get('transformers')}, peft "
             f"{meta.get('peft')}, commit {meta['commit']}. Times in µs (do_bench median); "
             f"in brackets the ratio to `{BASELINE}` (same model/scope/tokens/mode/LoRA; < 1 is faster; bare-GEMM "
             f"rows: to `{STOCK}`). `—`: not supported (row-wise FP8 is forward-only without LoRA) or not run.", ""]
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
                ratio = m[0].get("ratio_vs_bf16_gather") if kk[1] == "layer" else m[0].get("ratio_vs_bf16")
                cells.append(f"{m[0]['time_us']:.0f}" + (f" ({ratio:.2f})" if ratio is not None else ""))
        lines.append(f"| {kk[0]} | {kk[1]} | {kk[2]} | {kk[3]} | {'r16' if kk[4] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The targets of issue 13, against the glue-fixed bf16 layer measured in the same run: (figure, variants, target).
TARGET_VARIANTS = {
    "nf4_lora_fwd_bwd_16k": ("model_entry_nf4", "nf4_fused", PEER),
    "fp8_fwd_16k": ("model_entry_fp8", "fp8_block_fused", PEER),
    "nf4_decode_16": ("model_entry_nf4", "nf4_fused", PEER),
    "nf4_decode_64": ("model_entry_nf4", "nf4_fused", PEER),
    "lora_overhead_fwd_bwd_16k": ("model_entry_nf4", "nf4_fused", "model_entry_bf16", "bf16_fused_lora", BASELINE, PEER),
}
TARGETS = {  # figure: (what, bound, how the value compares: "<=" or ">=")
    "nf4_lora_fwd_bwd_16k": ("NF4+LoRA fwd_bwd @16384: time / glue bf16+LoRA", 0.80, "<="),
    "fp8_fwd_16k": ("FP8 block fwd @16384: time / glue bf16", 0.70, "<="),
    "nf4_decode_16": ("NF4 decode fwd @16 (graph replay): speedup over glue bf16", 2.0, ">="),
    "nf4_decode_64": ("NF4 decode fwd @64 (graph replay): speedup over glue bf16", 2.0, ">="),
    "lora_overhead_fwd_bwd_16k": ("LoRA overhead fwd_bwd @16384, % (same variant without LoRA)", 8.0, "<="),
}
TARGETED = ("model_entry_nf4", "nf4_fused", "model_entry_fp8", "fp8_block_fused", "model_entry_bf16", "bf16_fused_lora")


def _time(rows, model, T, mode, lora, v, graph=False):
    m = [r for r in rows if r["scope"] == "layer" and r["model"] == model and r["tokens"] == T and r["mode"] == mode
         and r["lora"] == lora and r["variant"] == v and "time_us" in r]  # fmt: skip
    if not m:
        return None
    return m[0].get("time_us_graph") if graph else m[0]["time_us"]


def target_value(rows, model, figure, v) -> float | None:
    """The figure's value for variant ``v`` of ``model`` from ``rows`` (None: a row it needs is missing)."""
    t = functools.partial(_time, rows, model)
    if figure == "nf4_lora_fwd_bwd_16k":
        a, b = t(16384, "fwd_bwd", True, v), t(16384, "fwd_bwd", True, BASELINE)
        return None if a is None or b is None else a / b
    if figure == "fp8_fwd_16k":
        a, b = t(16384, "fwd", False, v), t(16384, "fwd", False, BASELINE)
        return None if a is None or b is None else a / b
    if figure in ("nf4_decode_16", "nf4_decode_64"):
        T = int(figure.rsplit("_", 1)[1])
        a, b = t(T, "fwd", False, v, graph=True), t(T, "fwd", False, BASELINE, graph=True)
        return None if not a or b is None else b / a
    if figure == "lora_overhead_fwd_bwd_16k":
        a, b = t(16384, "fwd_bwd", True, v), t(16384, "fwd_bwd", False, v)
        return None if a is None or not b else 100.0 * (a / b - 1)
    raise KeyError(figure)


def target_rows(rows) -> list[dict]:
    """One entry per model, figure and variant: value, target, and met (None for context rows / missing data)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for figure, (what, bound, op) in TARGETS.items():
            for v in TARGET_VARIANTS[figure]:
                val = target_value(rows, model, figure, v)
                met = None
                if val is not None and v in TARGETED:
                    met = val <= bound if op == "<=" else val >= bound
                out.append(dict(model=model, figure=figure, what=what, variant=v, value=val,
                                target=f"{op} {bound:g}", met=met))  # fmt: skip
    return out


def targets(rows) -> str:
    out = ["", f"## Targets (layer scope, against `{BASELINE}` measured in the same run)", "",
           "model_entry_* is what a model loaded with impl runs (`impl.forward.experts_forward`); the layer variants "
           "use the same kernels; hf_grouped_mm_peft (transformers + PEFT) and the baseline are context.", "",
           "| model | figure | variant | value | target | met |", "|---|---|---|---:|---|---|"]
    for e in target_rows(rows):
        val = "n/a" if e["value"] is None else f"{e['value']:.2f}"
        met = {True: "yes", False: "**no**", None: "—"}[e["met"]]
        out.append(f"| {e['model']} | {e['what']} | {e['variant']} | {val} | {e['target']} | {met} |")
    return "\n".join(out) + "\n"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="only the target rows: layer scope, tokens 16/64 fwd, 16384 fwd and fwd_bwd (+/- LoRA)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--tokens", default="1,16,64,1024,16384")
    ap.add_argument("--tokens-for", default="", help="per-model override, e.g. deepseek_v3_like=16,1024,16384;...")
    ap.add_argument("--cases", default="", help="only these TOKENS:MODE:LORA, e.g. 16:fwd:0,16384:fwd_bwd:1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--scopes", default="layer,gemm")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke run under TRITON_INTERPRET=1")
    ap.add_argument("--model-backend", default="auto", help="experts backend of the model_entry variants (on CPU "
                    "'auto' is grouped_mm; 'triton' runs the kernels under the interpreter)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    ap.add_argument("--commit", default=os.environ.get("BENCH_COMMIT"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    args.models = args.models.split(",")
    args.variants = args.variants.split(",")
    args.scopes = args.scopes.split(",")
    args.cases = parse_cases(args.cases) or None
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        args.cases = QUICK_CASES
        args.tokens = sorted({T for T, _, _ in QUICK_CASES})
        args.variants = [v for v in args.variants if v in QUICK_VARIANTS]
        args.scopes = ["layer"]
    unknown = sorted(set(args.variants) - set(VARIANTS)) + sorted(set(args.models) - set(MODELS))
    if unknown:
        ap.error(f"unknown variants / models: {unknown}")
    per_model = {}
    for item in filter(None, args.tokens_for.split(";")):
        m, ts = item.split("=")
        per_model[m] = [int(t) for t in ts.split(",")]
    args.tokens_for = per_model
    return args


def main(argv=None):
    global DEV, MODEL_BACKEND
    args = parse_args(argv)
    DEV, MODEL_BACKEND = args.device, args.model_backend
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_moe.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 for a smoke run)")
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu-smoke"
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, transformers=_version("transformers"),
                peft=_version("peft"), commit=_commit(args.commit), date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
                cuda=torch.version.cuda, quick=args.quick, tokens=args.tokens, tokens_for=args.tokens_for,
                variants=args.variants, model_backend=args.model_backend)  # fmt: skip
    rows: list[dict] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = gpu.lower().replace(" ", "_") + "-" + meta["date"] + ("-quick" if args.quick else "") + (
        f"-{args.tag}" if args.tag else "")
    t0 = time.time()

    def flush():
        meta["elapsed_s"] = round(time.time() - t0, 1)
        (out_dir / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows, "targets": target_rows(rows)}, indent=1))
        (out_dir / f"{stem}.md").write_text(markdown(meta, rows) + targets(rows))

    for m in args.models:
        tokens = args.tokens_for.get(m, args.tokens)
        bench_model(m, tokens, args.variants, args.scopes, rows, flush=flush, cases=args.cases)
    flush()
    log(f"wrote {out_dir / stem}.json/.md in {time.time() - t0:.0f}s")
    return out_dir / f"{stem}.json"


if __name__ == "__main__":
    main()
