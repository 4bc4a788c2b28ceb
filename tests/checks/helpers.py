"""Shared machinery of the end-to-end checks: a tiny zoo model per (family, base kind), LoRA on its experts,
training on the codename task, adapter save, merge, plain-transformers reload.

Base kinds: ``bf16`` (the model as transformers builds it, experts bf16, PEFT's own ParamWrapper path), ``nf4`` and
``fp8`` (experts swapped for `impl.quant_experts.QuantizedExperts` by `impl.loading`; on transformers 4.57
ModuleList experts NF4 comes from bitsandbytes ``Linear4bit`` via `impl.loading.load_model`, FP8 from
`impl.fp8_linear.FP8Linear` per routed expert Linear, also via `impl.loading.load_model`).
Every kind starts from the same bf16 weights (same zoo seed) and the same LoRA init (torch seeded before
``get_peft_model``; the adapter shapes are the same for every kind).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from impl import compat, loading
from impl.quant_experts import QuantizedExperts
from impl.storage import DenseConfig, FP8Config, NF4Config
from tests.support import train as tr
from tests.support import zoo

SEED = 0
VARIANT = "2i_ne_h"
DTYPE = torch.bfloat16
# The zoo's default init (std 0.02) leaves the lm_head logits within about ±0.6 of each other after the final norm,
# so no adapter on the experts can push the loss far below ln(V): the task would be "learned" by argmax only.
# std 0.3 gives logits a usable range (measured: Qwen3-MoE loss 6.9 -> 0.05 in 100 steps).
INIT_RANGE = 0.3
LORA_R = 8
LORA_ALPHA = 16
LR = 1e-2
STEPS_FULL = 100
STEPS_QUICK = 60
KINDS = ("bf16", "nf4", "fp8")
# FP8 blocks: the tiny dims (H=32, I=24) are not multiples of 128; 8x8 divides H, I and 2I so the fused [E, 2I, H]
# blocks coincide with per-expert [I, H] blocks and the on-disk FP8 checkpoint holds exactly the live codes.
FP8_BLOCK = (8, 8)
NF4_BLOCKSIZE = 64
TASK = dict(n_prompts=8, prompt_len=6, cont_len=6, n_heldout=4)


def families(quick: bool) -> list[str]:
    """Families of the installed transformers; under --quick only qwen3_moe (or the first available)."""
    fams = zoo.families()
    if not quick:
        return fams
    return [compat.QWEN3_MOE] if compat.QWEN3_MOE in fams else fams[:1]


def steps(quick: bool) -> int:
    return STEPS_QUICK if quick else STEPS_FULL


@contextlib.contextmanager
def single_thread():
    """Run with one intra-op thread: the models are tiny, and on a shared 2-core box extra threads only spin.

    Also makes reductions run in one fixed order (same seed, same machine -> same numbers).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_base(family: str, variant: str = VARIANT, **overrides):
    """The bf16 zoo model every kind starts from (seeded)."""
    return zoo.build_model(family, variant, seed=SEED, dtype=DTYPE, initializer_range=INIT_RANGE, **overrides)


def layout_of(family: str) -> str:
    """The installed transformers' expert layout of ``family`` (not read from a model: bnb-loaded 4.57 experts hold
    packed ``(n/2, 1)`` weights that `zoo.describe`'s shape check rejects)."""
    return compat.expert_layout(family, zoo.installed_version())


def expert_lora_targets(family: str) -> dict:
    """LoRA on the routed experts only: 3-D params via ``target_parameters``; 4.57 per-expert Linears by regex."""
    if layout_of(family) == "module_list":
        return dict(target_modules=r".*\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)")
    return dict(target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def quant_config(kind: str):
    if kind == "nf4":
        return NF4Config(blocksize=NF4_BLOCKSIZE, double_quant=False, compute_dtype=DTYPE)
    if kind == "fp8":
        return FP8Config(block=FP8_BLOCK, compute_dtype=DTYPE)
    return DenseConfig(compute_dtype=DTYPE)


@dataclass
class Prepared:
    """A live model of one (family, kind) ready for LoRA: ``model`` (not yet PEFT), the dirs of its base checkpoint."""

    family: str
    kind: str
    layout: str
    model: torch.nn.Module
    bf16_dir: Path
    merge_base_dir: Path  # holds exactly the live base values: bf16; NF4 dequantized to bf16; the live FP8 codes
    quant_bytes: tuple[int, int] | None = None  # expert storage bytes before / after quantization


def prepare(family: str, kind: str, workdir: Path, variant: str = VARIANT, **overrides) -> Prepared:
    """Build the bf16 base, save it, and turn it into the live model of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown base kind {kind!r}; expected one of {KINDS}")
    base = build_base(family, variant, **overrides)
    layout = layout_of(family)
    bf16_dir = workdir / f"{family}-bf16-base"
    if not bf16_dir.exists():
        base.save_pretrained(bf16_dir)
    if kind == "bf16":
        return Prepared(family, kind, layout, base, bf16_dir, bf16_dir)
    cfg = quant_config(kind)
    rep = None
    if layout == "module_list":
        model, rep = loading.load_model(str(bf16_dir), cfg, dtype=DTYPE)
        rep = rep if kind == "fp8" else None  # the NF4 path's report is empty (bitsandbytes quantizes at load)
        disable_bnb_cpu_repack(model)
        model.eval()
    else:
        model, rep = base, loading.quantize_experts(base, cfg)
    merge_dir = workdir / f"{family}-{kind}-base"
    if kind == "fp8":
        write_fp8_checkpoint(model, bf16_dir, merge_dir)
    else:
        write_dequantized_checkpoint(model, bf16_dir, merge_dir)
    quant_bytes = (rep.bytes_before, rep.bytes_after) if rep is not None else None
    return Prepared(family, kind, layout, model, bf16_dir, merge_dir, quant_bytes)


def disable_bnb_cpu_repack(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU inference repack on every Linear4bit (returns how many).

    bnb 0.50.2 crashes in that repack when in_features < blocksize (hidden 32 < 64 in the zoo); the check
    ``finding_bnb_cpu_inference_repack`` records the bug. With the flag off bnb uses its generic CPU dequant path.
    """
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def add_lora(model, family: str, *, r: int = LORA_R, alpha: int = LORA_ALPHA, seed: int = SEED, **targets):
    """``get_peft_model`` with the expert targets, torch seeded first so every kind gets the same lora_A init."""
    from peft import LoraConfig, get_peft_model

    targets = targets or expert_lora_targets(family)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, **targets))


def make_task():
    return tr.make_codename_task(zoo.VOCAB, seed=SEED, **TASK)


# --- FP8 checkpoint holding the live codes ---------------------------------------------------------------------


def write_fp8_checkpoint(model, bf16_dir: Path, dst: Path) -> None:
    """A finegrained-FP8 checkpoint whose routed-expert weights are the live FP8 codes.

    Fused `QuantizedExperts`: the layout transformers 5.24 saves FP8 experts in: per-expert fp8 weights under the bf16
    checkpoint's keys and a fused ``<prefix>.gate_up_proj_scale_inv`` / ``down_proj_scale_inv`` (fused-on-disk
    GPT-OSS: ``<key>_scale_inv``). 4.57 ModuleList experts (`FP8Linear`): the DeepSeek / transformers per-expert
    format, ``...experts.{e}.<proj>.weight`` float8_e4m3fn + ``...experts.{e}.<proj>.weight_scale_inv`` fp32.
    Everything else is copied from ``bf16_dir``.
    """
    from safetensors.torch import save_file

    from impl.checkpoint import find_expert_groups, open_checkpoint

    tensors = _read_tensors(bf16_dir)
    if layout_of(compat.family_of_model_type(model.config.model_type)) == "module_list":
        tensors.update(_fp8_linear_tensors(model, tensors))
    else:
        for g in find_expert_groups(open_checkpoint(bf16_dir)).values():
            live = model.get_submodule(g.module_path)
            if not isinstance(live, QuantizedExperts):
                raise TypeError(f"{g.module_path} is {type(live).__name__}, not QuantizedExperts")
            tensors.update(_fp8_group_tensors(g, live))
    dst.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(FP8_BLOCK),
        "modules_to_not_convert": ["lm_head", "embed_tokens", "self_attn", "mlp.gate", "router", "shared_expert"],
    }
    (dst / "config.json").write_text(json.dumps(cfg))


def _fp8_linear_tensors(model, bf16: dict) -> dict[str, torch.Tensor]:
    """``<module>.weight`` e4m3 codes [out, in] and ``<module>.weight_scale_inv`` fp32 grids of every live `FP8Linear`
    (keys as ``save_pretrained`` names the bf16 weights: ``...experts.{e}.<proj>``); each must replace a bf16 key."""
    from impl.fp8_linear import FP8Linear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            key = f"{name}.weight"
            if key not in bf16 or tuple(bf16[key].shape) != tuple(m.q.shape):
                raise KeyError(f"FP8Linear {name} {tuple(m.q.shape)} has no matching {key} in the bf16 checkpoint")
            out[key], out[key + "_scale_inv"] = m.q, m.weight_scale_inv
    if not out:
        raise TypeError(f"{type(model).__name__} holds no FP8Linear experts")
    return out


def _fp8_group_tensors(g, live: QuantizedExperts) -> dict[str, torch.Tensor]:
    gu, dn = live.storage("gate_up_proj"), live.storage("down_proj")
    if g.scheme == "fused":
        return {
            g.keys["gate_up"]: gu.q, g.keys["gate_up"] + "_scale_inv": gu.scale_inv,
            g.keys["down"]: dn.q, g.keys["down"] + "_scale_inv": dn.scale_inv,
        }  # fmt: skip
    inter = gu.q.shape[1] // 2
    out = {f"{g.prefix}.gate_up_proj_scale_inv": gu.scale_inv, f"{g.prefix}.down_proj_scale_inv": dn.scale_inv}
    for e in range(g.num_experts):
        out[g.keys["gate"][e]] = gu.q[e, :inter]
        out[g.keys["up"][e]] = gu.q[e, inter:]
        out[g.keys["down"][e]] = dn.q[e]
    return out


def write_dequantized_checkpoint(model, bf16_dir: Path, dst: Path) -> None:
    """The bf16 checkpoint with every quantized weight of the live ``model`` replaced by its bf16 dequantization.

    Fused `QuantizedExperts` (NF4/FP8 storage) are split back into the checkpoint's expert keys; bitsandbytes
    ``Linear4bit`` modules (transformers 4.57 NF4 path, which also quantizes attention) are dequantized under
    ``<module>.weight``. A merge into this checkpoint sees exactly the base values the live model computed with.
    """
    import bitsandbytes as bnb
    from safetensors.torch import save_file

    from impl.checkpoint import find_expert_groups, open_checkpoint

    tensors = _read_tensors(bf16_dir)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}
    groups = {g.module_path: g for g in find_expert_groups(open_checkpoint(bf16_dir)).values()}
    missing = sorted(set(quantized) - set(groups))
    if missing:
        raise KeyError(f"QuantizedExperts {missing} have no expert group in {bf16_dir} (groups: {sorted(groups)})")
    for path, live in quantized.items():
        tensors.update(_dense_group_tensors(groups[path], live))
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            key = f"{name}.weight"
            if key not in tensors:
                raise KeyError(f"Linear4bit {name} has no {key} in {bf16_dir}")
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            tensors[key] = w.to(tensors[key].dtype)
    dst.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    (dst / "config.json").write_text((bf16_dir / "config.json").read_text())


def _read_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    if not tensors:
        raise FileNotFoundError(f"no safetensors in {ckpt_dir}")
    return tensors


def _dense_group_tensors(g, live: QuantizedExperts) -> dict[str, torch.Tensor]:
    gu, dn = live.storage("gate_up_proj").dequantize(DTYPE), live.storage("down_proj").dequantize(DTYPE)
    if g.scheme == "fused":
        return {g.keys["gate_up"]: gu, g.keys["down"]: dn}
    inter = gu.shape[1] // 2
    out = {}
    for e in range(g.num_experts):
        out[g.keys["gate"][e]], out[g.keys["up"][e]], out[g.keys["down"][e]] = gu[e, :inter], gu[e, inter:], dn[e]
    return out


# --- one trained run per (family, kind), shared by loss_parity and token_overlap --------------------------------


@dataclass
class Run:
    prepared: Prepared
    peft_model: torch.nn.Module
    task: tr.CodenameTask
    result: tr.TrainResult
    extra: dict = field(default_factory=dict)


def train_run(family: str, kind: str, workdir: Path, quick: bool) -> Run:
    """Prepare, add LoRA, train ``steps(quick)`` steps on the codename task (single thread)."""
    with single_thread():
        prep = prepare(family, kind, workdir)
        pm = add_lora(prep.model, family)
        task = make_task()
        result = tr.train_lora(pm, task, steps=steps(quick), lr=LR, seed=SEED)
    return Run(prep, pm, task, result)


def finite(x: float) -> bool:
    return math.isfinite(x)


def skip_if_no_peft():
    pytest.importorskip("peft")
