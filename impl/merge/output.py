"""The merged checkpoint directory: shards streamed into a temporary directory next to ``out_dir``, side files
(config, tokenizer, provenance), the applied-delta check, and the atomic publish (rename); stale partial dirs of
killed merges are removed."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from impl.adapter_dir import Adapter
from impl.checkpoint import INDEX_NAME, Checkpoint, write_shard
from impl.errors import MergeError
from impl.merge.merger import MERGED_16BIT, Merger
from impl.merge.plan import MergePlan

PROVENANCE = "moe_compat_merge.json"
COPY_PATTERNS = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)  # fmt: skip


def check_paths(base: Path, adapter: Path, out: Path, overwrite: bool) -> None:
    """``out`` must be neither a source nor inside / around one; an existing ``out`` needs ``overwrite`` and must be
    a directory (overwrite replaces a previous output directory, never a file)."""
    for src in (base, adapter):
        if out == src or src in out.parents or out in src.parents:
            raise MergeError(f"output dir {out} must not be, contain or be inside the source {src}")
    check_replaceable(out, overwrite)


def check_replaceable(out: Path, overwrite: bool) -> None:
    """An existing ``out`` needs ``overwrite`` and must be a directory."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MergeError(f"output dir {out} exists; pass overwrite=True (--overwrite) to replace it")
        if not out.is_dir():
            raise MergeError(
                f"output path {out} exists and is not a directory; --overwrite replaces a previous output directory, "
                "not a file: choose another path or remove it"
            )


def write_shards(ckpt: Checkpoint, merger: Merger, tmp: Path, progress: bool) -> list[str]:
    weight_map, total, written = {}, 0, []
    for i, shard in enumerate(ckpt.shards):
        t = time.monotonic()
        specs = [merger.spec(k) for k in ckpt.keys_in(shard) if not merger.dropped(k)]
        if not specs:  # e.g. a shard that held only FP8 scales, all dropped by merged_16bit
            if progress:
                print(
                    f"[moe-compat-merge] shard {i + 1}/{len(ckpt.shards)} {shard}: nothing left, not written",
                    file=sys.stderr,
                )
            continue
        written.append(shard)
        try:
            nbytes = write_shard(tmp / shard, specs, merger.produce, {"format": "pt"})
        finally:
            merger.end_shard()
        total += nbytes
        weight_map.update({s.key: shard for s in specs})
        if progress:
            print(
                f"[moe-compat-merge] shard {i + 1}/{len(ckpt.shards)} {shard}: {len(specs)} tensors, "
                f"{nbytes / 2**20:.1f} MiB, {time.monotonic() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    if ckpt.indexed:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return written


def check_applied(plan: MergePlan, merger: Merger) -> None:
    """Every planned delta applied exactly once (a dropped or doubly written key would show here)."""
    wrong = {
        k: (merger.applied.get(k, 0), len(v)) for k, v in plan.targets.items() if merger.applied.get(k, 0) != len(v)
    }
    if wrong:
        raise MergeError(
            f"deltas applied != planned for {len(wrong)} tensors (applied, planned): {dict(list(wrong.items())[:5])}"
        )


def write_side_files(ckpt: Checkpoint, adapter: Adapter, method: str, tmp: Path, plan: MergePlan, merger) -> None:
    if (ckpt.root / "config.json").is_file():
        config = dict(ckpt.config)
        if method == MERGED_16BIT:
            config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in COPY_PATTERNS:
        if (ckpt.root / name).is_file():
            shutil.copy2(ckpt.root / name, tmp / name)
    provenance = {
        "method": method,
        "base": str(ckpt.root),
        "adapter": str(adapter.root),
        "peft_version": adapter.peft_version,
        "lora_B_convention": adapter.convention,
        "orientations": {
            f"{lo.group.module_path}.{lo.param}_proj": lo.decision.orientation.value for lo in plan.expert_loras
        },
        "deltas_applied": sum(merger.applied.values()),
    }
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove ``.<out>.partial-<pid>-<hex>`` dirs left by a merge process that no longer runs (killed: no cleanup
    handler runs on SIGKILL). Dirs of live processes are kept. Returns the removed paths."""
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.partial-(\d+)-[0-9a-f]{{8}}$")
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m[1])):
            shutil.rmtree(p)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir to ``out``. An existing ``out`` directory (overwrite) is moved aside first and
    put back if the rename fails; once published it is removed (a failure there is reported, naming the path)."""
    old = None
    if out.exists() or out.is_symlink():
        check_replaceable(out, overwrite)  # checked before the merge, but it may have appeared since
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as err:
            raise MergeError(
                f"the merge is published at {out}, but the previous output moved to {old} could not be removed "
                f"({err}); remove it by hand"
            ) from err
