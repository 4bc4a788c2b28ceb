"""Compile the Hopper FP8 grouped GEMM variants for sm_90a on a machine WITHOUT a GPU and print what the SASS says.

    python3 bench/fp8_hopper_sass.py [--variants t128x256_rescale,...] [--trans 0,1] [--current] [--dump DIR]

For each variant: registers per thread, spilled bytes (stack), dynamic shared memory, and the instruction mix of the
hottest loop (the K loop: the innermost backward branch with QGMMA in it): QGMMA count, WARPGROUP.DEPBAR (a wait
for the tensor cores), BAR.SYNC, FFMA/FMUL (the scale promotion), TMA (UTMALDG) vs cp.async (LDGSTS) loads, local
memory (STL/LDL = spills). ``--current`` also compiles the K-loop kernel of `impl.ops.kloop` (its fp8_block
prefill configs) for comparison. Uses Triton's own compile pipeline with target cuda:90 and the ptxas/cuobjdump
that ship in Triton's wheel, with the argument specialization the JIT would apply (alignment, ints divisible by 16).
The numbers are static (no timing): use them to read the sweep (bench/sweep_fp8.py), not instead of it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from triton.tools.tensor_descriptor import TensorDescriptor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from impl.ops import fp8_gemm_hopper as hop  # noqa: E402
from impl.ops import kloop as gg  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_for_sm90(kernel, *args, **kwargs):
    """`triton.compile` of ``kernel`` specialized on these arguments (CPU tensors stand in for device ones)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def sass_of(cubin: bytes, dump: Path | None, name: str) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([BIN / "cuobjdump", "-sass", path], capture_output=True, text=True, check=True).stdout
    if dump is not None:
        (dump / f"{name}.sass").write_text(sass)
    return res, sass


def hot_loop(sass: str) -> collections.Counter:
    """Opcode counts of the innermost backward-branch loop that contains a QGMMA (the K loop)."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,5})\*/\s+([^;]*);", sass)]
    best = None
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            if any("GMMA" in t for t in body) and (best is None or len(body) < len(best)):
                best = body
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in (best or []))
    ops["_total"] = len(best or [])
    return ops


def summarize(name: str, cc, dump: Path | None) -> None:
    res, sass = sass_of(cc.asm["cubin"], dump, name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    loop = hot_loop(sass)
    keys = ["QGMMA", "WARPGROUP", "BAR", "FFMA", "FMUL", "UTMALDG", "LDGSTS", "LDG", "LDS", "STL", "LDL"]
    print(f"{name:34s} regs {m.group(1):>3} spill {m.group(2):>4} B  smem {cc.metadata.shared // 1024:>3} KiB | K loop "
          f"{loop['_total']:>4} instr: " + " ".join(f"{k}={loop[k]}" for k in keys), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(hop.VARIANTS))
    ap.add_argument("--trans", default="0")
    ap.add_argument("--current", action="store_true")
    ap.add_argument("--dump", default="")
    a = ap.parse_args()
    dump = Path(a.dump) if a.dump else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    S, H, I2, E = 131072, 2048, 1536, 128  # Qwen3-30B-A3B gate_up at 16k tokens (only shapes/strides matter)
    offs = torch.empty(E, dtype=torch.int32)
    for trans in [bool(int(t)) for t in a.trans.split(",")]:
        K, N = (I2, H) if trans else (H, I2)
        xq = torch.empty(S, K, dtype=torch.float8_e4m3fn)
        xs = torch.empty(S, K // 128)
        w = torch.empty(E * I2, H, dtype=torch.float8_e4m3fn)
        sw = torch.empty(E, I2 // 128, H // 128)
        y = torch.empty(S, N, dtype=torch.bfloat16)
        tiles = torch.empty(2000, 4, dtype=torch.int32)
        sw_strides = (sw.stride(1), sw.stride(2)) if trans else (sw.stride(2), sw.stride(1))  # (K block, N block)
        for v in a.variants.split(","):
            cfg = hop.VARIANTS[v]
            extra = {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}
            cc = compile_for_sm90(
                hop._fp8_hopper_kernel, TensorDescriptor.from_tensor(xq, [cfg.BM, 128]), xs, K // 128, 1,
                TensorDescriptor.from_tensor(w, [128, cfg.CH] if trans else [cfg.CH, 128]), sw, sw.stride(0), *sw_strides, y, N, 1, offs, tiles, 2000,
                S, E, I2, N, K,
                N // cfg.BN, 1000, K_LOOP=0, WORK_LOOP=0, TILE_MAP=cfg.tile_map, TRANS=trans, BM=cfg.BM, BN=cfg.BN,
                CH=cfg.CH, E_P2=E,
                RESCALE=cfg.rescale, PERSISTENT=cfg.persistent, NPROG=132 * cfg.ctas_per_sm, DOT_FP32=False,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)
            summarize(f"{v}{'_T' if trans else ''}", cc, dump)
        if a.current:
            code = torch.empty(1)
            ld = torch.empty(1, 1, 1, dtype=torch.bfloat16)
            wc = w.view(E, I2, H)
            for cfg in (gg.TileConfig(64, 128, 128, 4, 4), gg.TileConfig(128, 128, 128, 8, 3)):
                cc = compile_for_sm90(
                    gg._grouped_gemm_kernel, xq, K, 1, xs, K // 128, 1, wc, *wc.stride(), sw, *sw.stride(), code,
                    y, N, 1, offs, y, N, 1, ld, 1, 1, 1, ld, 1, 1, 1, 1.0, 0, E, I2, H, N, K, 0,
                    WFMT=2, TRANS=trans, HAS_LORA=False, LORA_FUSED=False, RANK_P=16, E_P2=E, BM=cfg.BM, BN=cfg.BN,
                    BK=128, DOT_FP32=False, NF4_MODE=1, X_FP8=True, NF4_SELECT=2,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                summarize(f"current_{cfg.BM}x{cfg.BN}_w{cfg.num_warps}s{cfg.num_stages}{'_T' if trans else ''}", cc, dump)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
