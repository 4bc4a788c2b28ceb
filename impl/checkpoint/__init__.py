"""Safetensors checkpoints on disk, by concern:

- `impl.checkpoint.header`: shard header scan (validated at scan time), `Checkpoint`, `TensorReader`, dtypes;
- `impl.checkpoint.expert_keys`: expert key schemes (per-expert / fused) and `ExpertGroup`;
- `impl.checkpoint.fp8_scales`: FP8 scale discovery and validation, and the fused FP8 experts reader;
- `impl.checkpoint.shard_writer`: the streaming safetensors shard writer.

The names below are re-exported so callers import from ``impl.checkpoint``.
"""

from impl.checkpoint.expert_keys import (
    FUSED_OF_ROLE,
    FUSED_RE,
    PER_EXPERT_RE,
    ROLE_OF_PROJ,
    ExpertGroup,
    check_against_config,
    find_expert_groups,
    module_path_of,
)
from impl.checkpoint.fp8_scales import (
    ACTIVATION_SCALE_SUFFIXES,
    DEFAULT_FP8_BLOCK,
    SCALE_SUFFIXES,
    FP8Entry,
    discover_fp8,
    expand_scale_rows,
    fp8_block_size,
    fp8_companion_keys,
    read_fp8_experts,
)
from impl.checkpoint.header import (
    DTYPE_NAMES,
    DTYPE_SIZES,
    FP8_DTYPES,
    FP8_E4M3,
    FP8_E5M2,
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    SINGLE_NAME,
    Checkpoint,
    CheckpointError,
    FP8CheckpointError,
    TensorInfo,
    TensorReader,
    open_checkpoint,
    read_header,
    read_json,
    reader,
)
from impl.checkpoint.shard_writer import OutSpec, write_shard

__all__ = [
    "ACTIVATION_SCALE_SUFFIXES", "DEFAULT_FP8_BLOCK", "DTYPE_NAMES", "DTYPE_SIZES", "FP8_DTYPES", "FP8_E4M3",
    "FP8_E5M2", "FUSED_OF_ROLE", "FUSED_RE", "INDEX_NAME", "PER_EXPERT_RE", "ROLE_OF_PROJ", "SAFETENSORS_DTYPES",
    "SCALE_SUFFIXES", "SINGLE_NAME", "Checkpoint", "CheckpointError", "ExpertGroup", "FP8CheckpointError", "FP8Entry",
    "OutSpec", "TensorInfo", "TensorReader", "check_against_config", "discover_fp8", "expand_scale_rows",
    "find_expert_groups", "fp8_block_size", "fp8_companion_keys", "module_path_of", "open_checkpoint",
    "read_fp8_experts", "read_header", "read_json", "reader", "write_shard",
]  # fmt: skip
