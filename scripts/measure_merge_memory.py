"""Measure the peak memory of `impl.merge.merge_adapter` on a synthetic multi-shard MoE checkpoint.

    .venv/bin/python scripts/measure_merge_memory.py [--shards 4] [--shard-mib 48] [--json out.json]

Builds a base checkpoint (per-expert ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``, bf16, one group
of layers per shard) plus an FP8 copy (``weight_scale_inv``, 128×128 blocks) and a PEFT-format experts adapter
(``target_parameters`` gate_up/down, PEFT 0.21 orientation), then runs each merge in a fresh subprocess. The child
resets the kernel's peak-RSS counter after its imports (``/proc/self/clear_refs`` = 5) and reports ``VmHWM`` after the
merge, so ``peak − baseline`` is what the merge itself added (tensors, and the shard pages mmapped by safe_open).
Like the CLI, the child pins glibc's mmap threshold (``MOE_COMPAT_DYNAMIC_MALLOC=1`` measures without it).

`build_synthetic` is also used by tests/impl/test_merge_faults.py (the killed-subprocess test).

Measured 2026-11-29 (torch 2.13 CPU, 2 shared cores at load ~7; 4 shards, 16 experts, H=1024, I=512; baseline RSS
after imports 222 MiB; seconds are wall time on the loaded machine):

    base  method        largest shard  peak RSS  added by the merge                                   time
    bf16  merged_16bit  48.0 MiB       294 MiB   71.6 MiB = 1.49x largest shard                        9 s
    fp8   merged_16bit  24.0 MiB       270 MiB   48.1 MiB = 2.00x (= 1.0x of the 48 MiB bf16 output)   28 s
    fp8   fp8           24.0 MiB       278 MiB   56.0 MiB = 2.33x                                      115 s
    fp8   fp8, glibc's dynamic mmap threshold (MOE_COMPAT_DYNAMIC_MALLOC=1; 2 shards): 223 MiB = 9.28x
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_synthetic(
    root: Path, *, shards: int = 4, layers_per_shard: int = 1, E: int = 16, H: int = 512, I: int = 256, r: int = 4,
    fp8: bool = False, seed: int = 0,
) -> tuple[Path, Path]:  # fmt: skip
    """Write ``root/base`` (``shards`` safetensors shards + index + config) and ``root/adapter``; returns both paths.

    Per layer: E experts × (gate [I, H], up [I, H], down [H, I]) in bf16, or e4m3 + fp32 ``weight_scale_inv`` grids
    when ``fp8``. Adapter: ``lora_A [r·E, H]`` / ``lora_B [2I, r·E]`` (gate_up, swapped) and ``[r·E, I]`` /
    ``[H, r·E]`` (down), random normal·0.02.
    """
    from safetensors.torch import save_file

    from reference.fp8 import quantize_fp8_block

    gen = torch.Generator().manual_seed(seed)
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    weight_map, lora = {}, {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for layer in range(s * layers_per_shard, (s + 1) * layers_per_shard):
            p = f"model.layers.{layer}.mlp.experts"
            for e in range(E):
                for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                    w = torch.randn(shape, generator=gen) * 0.02
                    key = f"{p}.{e}.{proj}.weight"
                    if fp8:
                        tensors[key], tensors[f"{key}_scale_inv"] = quantize_fp8_block(w)
                    else:
                        tensors[key] = w.to(torch.bfloat16)
            m = f"base_model.model.{p}"
            for infix, (a, b) in (("base_layer.", (H, 2 * I)), ("", (I, H))):
                lora[f"{m}.{infix}lora_A.weight"] = torch.randn(r * E, a, generator=gen) * 0.02
                lora[f"{m}.{infix}lora_B.weight"] = torch.randn(b, r * E, generator=gen) * 0.02
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "qwen3_moe", "num_experts": E, "hidden_size": H, "moe_intermediate_size": I}
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(config))
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "peft_version": "0.21.2", "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    }  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    return base, adapter


def _vm(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(base: str, adapter: str, out: str, method: str) -> None:
    from impl.merge import merge_adapter
    from impl.merge_cli import pin_malloc_mmap_threshold

    if os.environ.get("MOE_COMPAT_DYNAMIC_MALLOC") != "1":
        pin_malloc_mmap_threshold()  # as the CLI does
    baseline = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    report = merge_adapter(base, adapter, out, method=method)
    print(json.dumps({"baseline": baseline, "peak": _vm("VmHWM"), "seconds": report.seconds}))


def measure(base: Path, adapter: Path, out: Path, method: str) -> dict:
    """Run one merge in a subprocess; returns baseline / peak RSS (bytes), the merge's addition and shard sizes."""
    code = "import sys; from scripts.measure_merge_memory import _child; _child(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code, str(base), str(adapter), str(out), method],
        env=env, cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    row = json.loads(res.stdout.strip().splitlines()[-1])
    sizes = [p.stat().st_size for p in base.glob("*.safetensors")]
    row.update(method=method, added=row["peak"] - row["baseline"], largest_shard=max(sizes), total=sum(sizes))
    row["added_over_largest_shard"] = round(row["added"] / row["largest_shard"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fp8, method in ((False, "merged_16bit"), (True, "merged_16bit"), (True, "fp8")):
            root = Path(tmp) / f"{'fp8' if fp8 else 'bf16'}-{method}"
            base, adapter = build_synthetic(root, shards=args.shards, E=args.experts, H=1024, I=512, fp8=fp8)
            row = measure(base, adapter, root / "out", method)
            row["base"] = "fp8" if fp8 else "bf16"
            rows.append(row)
            mib = 2**20
            print(
                f"{row['base']:>4} {method:>12}: shards {args.shards} × {row['largest_shard'] / mib:.1f} MiB, "
                f"baseline RSS {row['baseline'] / mib:.0f} MiB, peak {row['peak'] / mib:.0f} MiB, "
                f"added {row['added'] / mib:.1f} MiB = {row['added_over_largest_shard']}× largest shard, "
                f"{row['seconds']:.1f} s"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
