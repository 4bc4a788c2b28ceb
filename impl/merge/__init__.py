"""Merge a PEFT LoRA adapter into a safetensors base checkpoint and write a new checkpoint.

``merge_adapter(base_dir, adapter_dir, out_dir, method=...)``:

- ``merged_16bit``: every merged weight is high precision. bf16/fp16/fp32 weights keep their on-disk dtype; FP8
  weights are dequantized (``W = float(q)·S``), merged and written as ``dtype`` (bf16 by default); their scale tensors
  and static activation scales are dropped and ``quantization_config`` is removed from config.json.
  **NF4 (QLoRA) bases:** the base checkpoint of a QLoRA run is the bf16 checkpoint on disk; NF4 exists only in memory
  (bitsandbytes quantizes at load). Merging onto the bf16 weights is the expected path: ``W16 + ΔW`` is what the
  adapter was trained to correct up to the NF4 rounding of W16. A bnb-serialized 4-bit checkpoint is refused.
- ``fp8``: FP8 base only. FP8 weights are dequantized, merged and requantized (``reference.fp8.requantize_fp8_block``,
  same block as the input) with new scales (fp32, or UE8M0 if the input scales were); config.json is kept.

Adapter (`impl.adapter_dir`): ``adapter_config.json`` + ``adapter_model.safetensors`` (header validated, factors 2-D
floating point, ``r`` / ``lora_alpha`` / patterns type-checked). ``target_parameters`` LoRA on 3-D experts
(``...mlp.experts.base_layer.lora_{A,B}.weight`` / ``...mlp.experts.lora_{A,B}.weight``; which wrapper is gate_up and
which is down is decided by the shapes, which always differ; ``r·E`` must match the config's r and the base's E) and
``target_modules`` LoRA on 2-D Linear weights (``ΔW = s·B A``). Scaling as PEFT: ``lora_alpha / r`` or ``/ sqrt(r)``
with ``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` matched by PEFT's ``get_pattern_key`` rule. Experts LoRA
orientation: `reference.layout.decide_orientation` with every source (param shapes from the base checkpoint's fused
view, the non-square sibling parameter, the ``moe_compat.json`` sidecar (`impl.sidecar`), ``peft_version``); any two
that disagree, or none deciding a square parameter, is refused. Per-expert deltas from `reference.lora` (``stride_e``
unless the sidecar says ``contiguous_r``). Every adapter tensor must be applied and every planned delta counted,
else MergeError. Merged values are checked finite before and after the cast to the output dtype.

Writing: shard by shard in the base's shard layout, tensor by tensor (`impl.checkpoint.write_shard`), into a temporary
directory ``.<out>.partial-<pid>-<hex>`` next to ``out_dir`` renamed to ``out_dir`` at the end; on any exception the
temporary directory is removed (a killed process cannot clean up: the next merge into the same ``out_dir`` removes
partial dirs whose process is gone). The source checkpoint and adapter are only read.

Modules: `impl.adapter_dir` (reading the adapter dir, PEFT scaling, orientation sources; shared with the live loader),
`impl.sidecar` (``moe_compat.json``), `impl.merge.plan` (adapter factors -> base tensors, orientation), `impl.merge.merger` (each output tensor),
`impl.merge.output` (temporary dir, shards, side files, publish).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from impl.adapter_dir import read_adapter
from impl.checkpoint import PER_EXPERT_RE, Checkpoint, open_checkpoint
from impl.errors import AdapterError, MergeError
from impl.merge.merger import FP8_METHOD, MERGED_16BIT, METHODS, Merger
from impl.merge.output import (
    check_applied,
    check_paths,
    publish,
    remove_stale_partials,
    write_shards,
    write_side_files,
)
from impl.merge.plan import DeltaRef, ExpertLora, MergePlan, plan_merge

_MERGEABLE_QUANT = (None, "fp8", "compressed-tensors", "fbgemm_fp8")
_PACKED_SUFFIXES = ("_blocks", ".weight_packed", ".qweight")  # mxfp4, compressed-tensors int packing, GPTQ/AWQ
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


@dataclass
class MergeReport:
    """What a merge did. expert_deltas: (expert, disk tensor) deltas applied (a fused 3-D tensor counts E);
    linear_deltas: 2-D LoRA deltas applied; dropped: keys not written (FP8 companions in merged_16bit)."""

    out_dir: str
    method: str
    expert_deltas: int
    linear_deltas: int
    shards: list[str]
    dropped: list[str]
    requantized_scales: list[str]
    seconds: float


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = MERGED_16BIT,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeReport:
    """Merge the adapter into the base checkpoint and write ``out_dir`` atomically (see module docstring).

    dtype: output dtype of dequantized FP8 weights in merged_16bit (other weights keep their dtype).
    overwrite: replace an existing ``out_dir`` (never the base or adapter dir). progress: one line per shard to stderr.
    """
    t0 = time.monotonic()
    base, adapter_root, out = Path(base_dir).resolve(), Path(adapter_dir).resolve(), Path(out_dir).resolve()
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; expected one of {METHODS}")
    check_paths(base, adapter_root, out, overwrite)
    ckpt = open_checkpoint(base)
    _refuse_unsupported_quant(ckpt)
    adapter = read_adapter(adapter_root)
    plan = plan_merge(ckpt, adapter)
    merger = Merger(ckpt, plan, method, dtype)
    if method == FP8_METHOD and not merger.fp8:
        raise MergeError(f"{base}: method 'fp8' needs an FP8 base checkpoint; it has no float8_e4m3fn weights")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        remove_stale_partials(out)
        tmp.mkdir(parents=True)
        shards = write_shards(ckpt, merger, tmp, progress)
        check_applied(plan, merger)
        write_side_files(ckpt, adapter, method, tmp, plan, merger)
        publish(tmp, out, overwrite)
    except OSError as err:  # read-only or full disk, file too large, ...: nothing is published
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(f"writing the merge next to {out} failed: {err}; nothing was published") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dropped = sorted(k for k in ckpt.tensors if merger.dropped(k))
    rescaled = sorted(k for k in merger.scale_units if merger._scale_changes(k))
    n_exp = sum(_expert_count(ref) for k in merger.applied for ref in plan.targets[k] if _is_expert_target(plan, k))
    n_lin = sum(n for k, n in merger.applied.items() if not _is_expert_target(plan, k))
    return MergeReport(str(out), method, n_exp, n_lin, shards, dropped, rescaled, time.monotonic() - t0)


def _expert_count(ref: DeltaRef) -> int:
    """A fused 3-D delta counts once per expert; a per-expert (or per-expert Linear) delta once."""
    return ref.lora.group.num_experts if isinstance(ref.lora, ExpertLora) and ref.expert is None else 1


def _is_expert_target(plan: MergePlan, key: str) -> bool:
    return isinstance(plan.targets[key][0].lora, ExpertLora) or PER_EXPERT_RE.match(key) is not None


def _refuse_unsupported_quant(ckpt: Checkpoint) -> None:
    """Only 16-bit and FP8 (finegrained ``fp8`` / compressed-tensors float / fbgemm) checkpoints are merged."""
    bnb = [k for k in ckpt.tensors if k.endswith(_BNB_SUFFIXES)]
    if ckpt.quant_method == "bitsandbytes" or bnb:
        raise MergeError(
            f"{ckpt.root}: a bitsandbytes-serialized checkpoint ({bnb[:2] or ckpt.quant_method}); NF4 is an in-memory "
            "format for QLoRA: merge onto the 16-bit base checkpoint the NF4 model was loaded from"
        )
    packed = [k for k in ckpt.tensors if k.endswith(_PACKED_SUFFIXES)]
    if ckpt.quant_method not in _MERGEABLE_QUANT or packed:
        raise MergeError(
            f"{ckpt.root}: quant_method {ckpt.quant_method!r} / packed tensors {packed[:2]} are not supported; "
            f"mergeable: 16-bit or FP8 e4m3 ({sorted(m for m in _MERGEABLE_QUANT if m)})"
        )


__all__ = [
    "FP8_METHOD", "MERGED_16BIT", "METHODS", "AdapterError", "MergeError", "MergeReport", "merge_adapter",
]  # fmt: skip
