"""impl.merge fault handling (issue 12; the table is docs/FAULTS.md).

Every bad input fails with a named error that says the cause, the key / shapes and the rule broken; through the CLI
that is exit status 2 and exactly one line on stderr (``moe-compat-merge: error: <ErrorName>: <cause>``), never a
traceback. After any merge, failed or not, the source checkpoint and adapter are byte-identical (sha256 of every
file) and no output (or partial) directory is left. A failure mid-write (a shard that fails after earlier shards
were written) or a killed process leaves no output directory. `test_cli_fault` runs each case of `FAULTS` through
the CLI in-process (so an uncaught exception fails the test); a few cases run as a real subprocess.

Synthetic inputs (`scripts.measure_merge_memory.build_synthetic`, SMALL): 3 shards, one layer each, per-expert bf16
experts E=4, H=64, I=32 (2I == H: gate_up is square, down is not), a PEFT 0.21.2-format adapter (swapped, r=2).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from impl import merge_cli  # noqa: E402
from impl.merge import MergeError, merge_adapter  # noqa: E402
from impl.merge_cli import main as cli_main  # noqa: E402
from reference.fp8 import quantize_fp8_block  # noqa: E402
from scripts.measure_merge_memory import build_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(shards=3, E=4, H=64, I=32, r=2)
K0 = "model.layers.0.mlp.experts.0.gate_proj.weight"
LAST_SHARD = "model-00003-of-00003.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
GATE_UP_A = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
DOWN_KEYS = [f"base_model.model.model.layers.{i}.mlp.experts.lora_{x}.weight" for i in range(3) for x in "AB"]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def load_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_tensors_file(f))
    return out


def _rewrite(path: Path, mutate) -> None:
    """Apply ``mutate(dict)`` to the tensors of one safetensors file and write it back (test setup only)."""
    ts = load_tensors_file(path)
    mutate(ts)
    save_file(ts, str(path), metadata={"format": "pt"})


def load_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _shard_of(base: Path, key: str) -> Path:
    wm = json.loads((base / INDEX).read_text())["weight_map"]
    return base / wm[key]


def _sources(tmp_path: Path) -> dict:
    return {d: tree_digest(tmp_path / d) for d in ("base", "adapter") if (tmp_path / d).is_dir()}


def _assert_failed_cleanly(tmp_path: Path, before: dict, out: Path) -> None:
    assert _sources(tmp_path) == before
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _run_failing(tmp_path, base, adapter, exc, match, **kw):
    before = _sources(tmp_path)
    with pytest.raises(exc, match=match):
        merge_adapter(base, adapter, tmp_path / "out", **kw)
    _assert_failed_cleanly(tmp_path, before, tmp_path / "out")


@pytest.fixture
def small(tmp_path):
    return build_synthetic(tmp_path, **SMALL)


# --- fault-injection helpers (test setup only) ------------------------------------------------------------------


def _raw_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _header_edit(edit: Callable[[dict, list[str]], None], data_edit=lambda d: d, shard: str = LAST_SHARD):
    """A mutation of one shard's raw header (``edit(header, keys by offset)``) and data bytes."""

    def mutate(base: Path, adapter: Path, tmp: Path) -> None:
        path = base / shard if (base / shard).exists() else adapter / shard
        header, data = _raw_header(path)
        edit(header, _by_offset(header))
        _write_raw(path, header, data_edit(data))

    return mutate


def _shift(header: dict, key: str, by: int) -> None:
    header[key]["data_offsets"] = [o + by for o in header[key]["data_offsets"]]


def _set_field(key_index: int, name: str, value):
    def edit(header, keys):
        header[keys[key_index]][name] = value

    return edit


def _bytes_header(raw: bytes, length: int | None = None, shard: str = LAST_SHARD):
    def mutate(base: Path, adapter: Path, tmp: Path) -> None:
        path = base / shard if (base / shard).exists() else adapter / shard
        _, data = _raw_header(path)
        _write_raw(path, raw, data, length)

    return mutate


def _json_file(name: str, change: Callable[[dict], object] | None = None, text: str | None = None, where="base"):
    """Rewrite ``<where>/<name>``: ``change(obj)`` edits the JSON object in place (its return value is ignored),
    ``text`` replaces the file; both None deletes it."""

    def mutate(base: Path, adapter: Path, tmp: Path) -> None:
        path = (base if where == "base" else adapter) / name
        if text is not None:
            path.write_text(text)
        elif change is None:
            path.unlink()
        else:
            obj = json.loads(path.read_text())
            change(obj)
            path.write_text(json.dumps(obj))

    return mutate


def _adapter_tensors(mutate_ts: Callable[[dict], None]):
    def mutate(base: Path, adapter: Path, tmp: Path) -> None:
        _rewrite(adapter / ADAPTER_FILE, mutate_ts)

    return mutate


def _base_tensors(key: str, mutate_ts: Callable[[dict], None], index_add: tuple[str, ...] = ()):
    def mutate(base: Path, adapter: Path, tmp: Path) -> None:
        shard = _shard_of(base, key)
        _rewrite(shard, mutate_ts)
        index = json.loads((base / INDEX).read_text())
        index["weight_map"].update(dict.fromkeys(index_add, shard.name))
        (base / INDEX).write_text(json.dumps(index))

    return mutate


def _index_map(key: str, shard: str):
    return _json_file(INDEX, lambda ix: ix["weight_map"].update({key: shard}))


def _adapter_for_other_e(E: int):
    """Replace the adapter by one built for a model with ``E`` experts (same H, I, r)."""

    def mutate(base: Path, adapter: Path, tmp: Path) -> None:
        _, other = build_synthetic(tmp / "other", **{**SMALL, "E": E})
        for name in (ADAPTER_FILE, "adapter_config.json"):
            shutil.copy(other / name, adapter / name)

    return mutate


def _sidecar(content: dict | str):
    text = content if isinstance(content, str) else json.dumps(content)
    return _json_file("moe_compat.json", text=text, where="adapter")


def _format_1(targets: dict) -> dict:
    return {"format": 1, "lora_B_convention": "stride_e", "peft_version": "0.21.2", "adapters": {"default": targets}}


def _scale_factors(factor: float):
    def mutate_ts(ts):
        for k in ts:
            ts[k] = ts[k] * factor

    return _adapter_tensors(mutate_ts)


def _drop_down_lora(ts: dict) -> None:
    for k in DOWN_KEYS:
        ts.pop(k)


def _both(*mutations):
    def mutate(base: Path, adapter: Path, tmp: Path) -> None:
        for m in mutations:
            m(base, adapter, tmp)

    return mutate


def _out_is_file(base: Path, adapter: Path, tmp: Path) -> None:
    (tmp / "out").write_text("not a directory\n")


def _set_nan(key: str):
    def mutate_ts(ts):
        ts[key][0, 0] = float("nan")

    return mutate_ts


# --- the fault table (docs/FAULTS.md lists every case with its node id) ------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One bad input: ``mutate(base, adapter, tmp_path)`` makes it; the CLI must exit 2 with ``error: match``."""

    id: str
    mutate: Callable[[Path, Path, Path], None]
    error: str
    match: str
    fp8: bool = False
    args: tuple[str, ...] = ()
    build: dict = field(default_factory=dict)


FAULTS = [
    # checkpoint scan: every shard's header is validated before anything is written (here: the last shard)
    Fault("header-overlap", _header_edit(lambda h, ks: _shift(h, ks[1], -4), lambda d: d[:-4]),
          "CheckpointError", r"data_offsets \[\d+, \d+\) overlaps the previous tensor"),
    Fault("header-hole", _header_edit(lambda h, ks: _shift(h, ks[-1], 8), lambda d: d + b"\0" * 8),
          "CheckpointError", r"leaves a hole"),
    Fault("header-out-of-range", _header_edit(lambda h, ks: None, lambda d: d[:-8]),
          "CheckpointError", r"runs past the end of the file"),
    Fault("header-trailing-bytes", _header_edit(lambda h, ks: None, lambda d: d + b"\0" * 16),
          "CheckpointError", r"leaves 16 trailing bytes"),
    Fault("header-negative-offset", _header_edit(lambda h, ks: h[ks[0]].update(data_offsets=[-8, 0])),
          "CheckpointError", r"data_offsets \[-8, 0\] are not two integers >= 0"),
    Fault("header-float-offset",
          _header_edit(lambda h, ks: h[ks[0]].update(data_offsets=[float(o) for o in h[ks[0]]["data_offsets"]])),
          "CheckpointError", r"data_offsets \[0.0, \d+.0\] are not two integers"),
    Fault("header-missing-dtype", _header_edit(lambda h, ks: h[ks[0]].pop("dtype")),
          "CheckpointError", r"lacks dtype, shape or data_offsets"),
    Fault("header-missing-offsets", _header_edit(lambda h, ks: h[ks[2]].pop("data_offsets")),
          "CheckpointError", r"lacks dtype, shape or data_offsets"),
    Fault("header-float-shape", _header_edit(_set_field(0, "shape", [32.0, 64])),
          "CheckpointError", r"shape \[32.0, 64\] is not a list of integers"),
    Fault("header-negative-shape", _header_edit(_set_field(0, "shape", [-32, 64])),
          "CheckpointError", r"shape \[-32, 64\] is not a list of integers >= 0"),
    Fault("header-unknown-dtype", _header_edit(_set_field(0, "dtype", "F99")),
          "CheckpointError", r"unsupported dtype 'F99'"),
    Fault("header-size-mismatch", _header_edit(_set_field(0, "shape", [32, 63])),
          "CheckpointError", r"needs 4032 bytes but data_offsets are \[0, 4096\)"),
    Fault("header-not-json", _bytes_header(b"{not json"), "CheckpointError", r"header is not valid JSON"),
    Fault("header-not-object", _bytes_header(b"[1, 2]"), "CheckpointError", r"header is not a JSON object"),
    Fault("header-duplicate-key", _bytes_header(
        b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
        b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'),
          "CheckpointError", r"duplicate keys \['a'\]"),
    Fault("header-not-utf8", _bytes_header(b'{"\xff": 1}'), "CheckpointError", r"header is not valid JSON"),
    Fault("header-metadata-not-strings", _header_edit(lambda h, ks: h.update(__metadata__={"format": 1})),
          "CheckpointError", r"__metadata__ must be an object of strings"),
    Fault("header-length-past-file", _bytes_header(b"{}", length=10**9),
          "CheckpointError", r"header length 1000000000 exceeds the file"),
    Fault("shard-shorter-than-8-bytes", lambda b, a, t: (b / LAST_SHARD).write_bytes(b"\x01\x02"),
          "CheckpointError", r"shorter than the 8-byte safetensors header length"),
    # index
    Fault("index-not-json", _json_file(INDEX, text="{"), "CheckpointError", r"model.safetensors.index.json: not valid JSON"),
    Fault("index-no-weight-map", _json_file(INDEX, lambda ix: ix.pop("weight_map")),
          "CheckpointError", r"no 'weight_map' object"),
    Fault("index-path-traversal", _index_map(K0, "../adapter/adapter_model.safetensors"),
          "CheckpointError", r"path traversal refused: .* maps to '\.\./adapter/adapter_model\.safetensors'"),
    Fault("index-absolute-path", _index_map(K0, "/etc/passwd"),
          "CheckpointError", r"path traversal refused: .* maps to '/etc/passwd'"),
    Fault("index-missing-shard", _index_map(K0, "model-00009-of-00009.safetensors"),
          "CheckpointError", r"shard model-00009-of-00009.safetensors listed in the index does not exist"),
    Fault("index-wrong-shard", _index_map(K0, LAST_SHARD),
          "CheckpointError", rf"maps '{K0}' to {LAST_SHARD} but its header is in model-00001"),
    Fault("index-unlisted-tensor", _json_file(INDEX, lambda ix: ix["weight_map"].pop(K0)),
          "CheckpointError", r"shard tensors missing from the weight_map"),
    # config.json and the base directory
    Fault("config-not-json", _json_file("config.json", text="{'model_type': 'qwen3_moe'}"),
          "CheckpointError", r"config.json: not valid JSON"),
    Fault("config-num-experts-mismatch", _json_file("config.json", lambda c: c.update(num_experts=8)),
          "CheckpointError", r"has E = 4 experts on disk but config.json says num_experts = 8"),
    Fault("config-hidden-size-mismatch", _json_file("config.json", lambda c: c.update(hidden_size=32)),
          "CheckpointError", r"gives hidden_size = 64, config.json says 32"),
    Fault("base-not-a-directory", lambda b, a, t: shutil.rmtree(b), "CheckpointError", r"base: not a directory"),
    Fault("base-no-safetensors", lambda b, a, t: [p.unlink() for p in b.iterdir()],
          "CheckpointError", r"neither model.safetensors.index.json nor model.safetensors found"),
    Fault("base-bnb-serialized", _base_tensors(K0, lambda ts: ts.update({K0 + ".absmax": torch.ones(4)}),
                                               (K0 + ".absmax",)),
          "MergeError", r"bitsandbytes-serialized .* merge onto the 16-bit base"),
    Fault("base-mxfp4", _json_file("config.json", lambda c: c.update(quantization_config={"quant_method": "mxfp4"})),
          "MergeError", r"quant_method 'mxfp4' .* not supported"),
    # FP8 bases
    Fault("fp8-missing-scale", _both(_base_tensors(K0, lambda ts: ts.pop(K0 + "_scale_inv")),
                                     _json_file(INDEX, lambda ix: ix["weight_map"].pop(K0 + "_scale_inv"))),
          "FP8CheckpointError", rf"{K0}: FP8 weight \[32, 64\] has no scale tensor", fp8=True),
    Fault("fp8-scale-grid", _base_tensors(K0, lambda ts: ts.update({K0 + "_scale_inv": torch.ones(2, 2)})),
          "FP8CheckpointError", r"scale grid \[2, 2\] for weight .*\[32, 64\] matches no rule", fp8=True),
    Fault("fp8-e5m2", _base_tensors(K0, lambda ts: ts.update({K0: ts[K0].float().to(torch.float8_e5m2)})),
          "FP8CheckpointError", rf"{K0}: dtype F8_E5M2 \[32, 64\]", fp8=True),
    Fault("fp8-nan-scale", _base_tensors(K0, lambda ts: ts[K0 + "_scale_inv"].fill_(float("nan"))),
          "FP8CheckpointError", rf"{K0}_scale_inv: 1 of 1 scale values \[1, 1\] are NaN or inf", fp8=True),
    Fault("fp8-inf-scale", _base_tensors(K0, lambda ts: ts[K0 + "_scale_inv"].fill_(float("inf"))),
          "FP8CheckpointError", r"are NaN or inf", fp8=True),
    Fault("fp8-expert-shape-mismatch",
          _base_tensors(K0, lambda ts: ts.update(zip((K0, K0 + "_scale_inv"), quantize_fp8_block(torch.randn(32, 48))))),
          "CheckpointError", r"per-expert shapes disagree", fp8=True),
    Fault("fp8-method-on-bf16-base", lambda b, a, t: None, "MergeError", r"method 'fp8' needs an FP8 base",
          args=("--method", "fp8")),
    Fault("fp16-overflow", _scale_factors(1e4), "MergeError",
          r"values overflow torch.float16 \(largest \|W \+ ΔW\| = .*, torch.float16 max 65504\)", fp8=True,
          args=("--dtype", "float16")),
    # adapter_config.json
    Fault("adapter-config-missing", _json_file("adapter_config.json", where="adapter"),
          "AdapterError", r"adapter_config.json not found"),
    Fault("adapter-config-not-json", _json_file("adapter_config.json", text="r: 2", where="adapter"),
          "AdapterError", r"adapter_config.json: not valid JSON"),
    Fault("adapter-config-not-object", _json_file("adapter_config.json", text="[2]", where="adapter"),
          "AdapterError", r"must be a JSON object, got list"),
    Fault("adapter-config-missing-r", _json_file("adapter_config.json", lambda c: c.pop("r"), where="adapter"),
          "AdapterError", r"missing 'r'"),
    Fault("adapter-config-missing-alpha",
          _json_file("adapter_config.json", lambda c: c.pop("lora_alpha"), where="adapter"),
          "AdapterError", r"missing 'lora_alpha'"),
    Fault("adapter-config-r-not-int", _json_file("adapter_config.json", lambda c: c.update(r="2"), where="adapter"),
          "AdapterError", r"r must be an integer >= 1, got '2'"),
    Fault("adapter-config-alpha-nan",
          _json_file("adapter_config.json", text='{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}', where="adapter"),
          "AdapterError", r"lora_alpha must be a positive finite number, got nan"),
    Fault("adapter-config-bad-rank-pattern",
          _json_file("adapter_config.json", lambda c: c.update(rank_pattern={"experts.(gate": 4}), where="adapter"),
          "AdapterError", r"rank_pattern key 'experts.\(gate' is not a valid regular expression"),
    Fault("adapter-config-dora", _json_file("adapter_config.json", lambda c: c.update(use_dora=True), where="adapter"),
          "AdapterError", r"use_dora=True"),
    Fault("adapter-config-modules-to-save",
          _json_file("adapter_config.json", lambda c: c.update(modules_to_save=["lm_head"]), where="adapter"),
          "AdapterError", r"modules_to_save=\['lm_head'\]"),
    # adapter tensors
    Fault("adapter-weights-missing", lambda b, a, t: (a / ADAPTER_FILE).unlink(),
          "AdapterError", r"adapter_model.safetensors not found"),
    Fault("adapter-header-corrupt", _header_edit(lambda h, ks: None, lambda d: d + b"\0" * 8, shard=ADAPTER_FILE),
          "AdapterError", r"adapter_model.safetensors: the tensors cover .* \(leaves 8 trailing bytes\)"),
    Fault("adapter-no-lora-tensors", lambda b, a, t: save_file({}, str(a / ADAPTER_FILE)),
          "AdapterError", r"holds no LoRA tensors"),
    Fault("adapter-integer-factors", _adapter_tensors(lambda ts: ts.update({GATE_UP_A: ts[GATE_UP_A].to(torch.int32)})),
          "AdapterError", rf"{GATE_UP_A} is I32 \[8, 64\]; LoRA factors must be 2-D floating point"),
    Fault("adapter-lora-A-without-B", _adapter_tensors(lambda ts: ts.pop(GATE_UP_A.replace("lora_A", "lora_B"))),
          "AdapterError", r"has lora_\['A'\] but not both A and B"),
    Fault("adapter-unknown-tensor",
          _adapter_tensors(lambda ts: ts.update({"base_model.model.model.layers.0.mlp.experts.lora_magnitude_vector":
                                                 torch.ones(3)})),
          "AdapterError", r"not LoRA A/B weights .*lora_magnitude_vector"),
    Fault("adapter-for-4-experts-on-8", _adapter_for_other_e(4), "AdapterError",
          r"r·E = 8 rows: with r = 2 \(adapter_config\) that is E = 4 experts, but .* has E = 8", build={"E": 8}),
    Fault("adapter-rank-mismatch", _json_file("adapter_config.json", lambda c: c.update(r=3), where="adapter"),
          "AdapterError", r"r·E = 8 rows: with r = 3 \(adapter_config\) that is no whole number of experts .* or r = 2"),
    Fault("adapter-factors-fit-no-param",
          _adapter_tensors(lambda ts: ts.update({DOWN_KEYS[2]: torch.zeros(8, 40)})),
          "AdapterError", r"fit no expert param of model.layers.1.mlp.experts"),
    Fault("adapter-module-not-in-base",
          _adapter_tensors(lambda ts: ts.update({
              "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)})),
          "AdapterError", r"no base tensor for LoRA module 'model.layers.0.self_attn.q_proj'"),
    Fault("adapter-nan-factor", _adapter_tensors(_set_nan(DOWN_KEYS[5])), "MergeError",
          r"'model.layers.2.mlp.experts.0.down_proj.weight' \[64, 32\] has \d+ non-finite values"),
    # orientation sources
    Fault("sidecar-not-json", _sidecar("{orientation: swapped}"), "AdapterError", r"moe_compat.json: not valid JSON"),
    Fault("sidecar-unknown-format", _sidecar({"format": 7, "adapters": {}}), "AdapterError",
          r"unknown sidecar format 7"),
    Fault("sidecar-bad-convention", _sidecar({"lora_B_convention": "rank_major"}), "AdapterError",
          r"lora_B_convention 'rank_major' is not one of"),
    Fault("sidecar-bad-orientation", _sidecar({"orientation": "sideways"}), "OrientationError",
          r"moe_compat.json records orientation 'sideways'"),
    Fault("sidecar-contradicts-shapes", _sidecar({"orientation": {"down_proj": "standard"}}), "OrientationError",
          r"model.layers.0.mlp.experts.down_proj: orientation sources disagree: the shapes say swapped; "
          r"moe_compat.json says standard"),
    Fault("sidecar-contradicts-sibling", _sidecar({"orientation": {"gate_up_proj": "standard"}}), "OrientationError",
          r"experts.gate_up_proj: orientation sources disagree: the non-square sibling down_proj .* says swapped; "
          r"moe_compat.json says standard; peft_version 0.21.2"),
    Fault("sidecar-records-other-shapes", _sidecar(_format_1({
        "base_model.model.model.layers.0.mlp.experts:down_proj": {"orientation": "swapped", "lora_A_shape": [8, 64]}})),
          "OrientationError", r"down_proj: moe_compat.json records lora_A_shape \[8, 64\] but the adapter / base has "
          r"\[8, 32\]"),
    Fault("sidecar-peft-version-differs", _sidecar({**_format_1({}), "peft_version": "0.18.1"}), "OrientationError",
          r"adapter_config.json says peft_version 0.21.2 but moe_compat.json says 0.18.1"),
    Fault("peft-version-contradicts-shapes",
          _json_file("adapter_config.json", lambda c: c.update(peft_version="0.18.1"), where="adapter"),
          "OrientationError", r"down_proj: orientation sources disagree: the shapes say swapped; "
          r"peft_version 0.18.1 \(is_transposed=False\) says standard"),
    Fault("square-undecidable", _both(_adapter_tensors(_drop_down_lora),
                                      _json_file("adapter_config.json", lambda c: c.pop("peft_version"),
                                                 where="adapter")),
          "OrientationError", r"experts.gate_up_proj: ambiguous: d1 == d2 == 64 .* no source decides"),
    # output directory
    Fault("out-exists", lambda b, a, t: (t / "out").mkdir(), "MergeError", r"exists; pass overwrite=True"),
    Fault("out-inside-base", lambda b, a, t: None, "MergeError", r"must not be, contain or be inside the source",
          args=("--out-inside-base",)),
    Fault("overwrite-onto-file", _out_is_file, "MergeError",
          r"exists and is not a directory; --overwrite replaces a previous output directory", args=("--overwrite",)),
    # command line
    Fault("cli-unknown-method", lambda b, a, t: None, "UsageError",
          r"argument --method: invalid choice: 'fp4'", args=("--method", "fp4")),
    Fault("cli-unknown-dtype", lambda b, a, t: None, "UsageError",
          r"argument --dtype: invalid choice: 'int8'", args=("--dtype", "int8")),
]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """The CLI's exit status: `main`'s return value, or argparse's SystemExit code for a usage error."""
    try:
        return cli_main(argv)
    except SystemExit as exc:
        return exc.code


def _state(path: Path) -> dict | str | None:
    """What is at ``path``: a directory's digest, a file's sha256, or None."""
    if path.is_dir():
        return tree_digest(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_cli_fault(tmp_path, fault, capsys, monkeypatch):
    """The CLI exits 2 with one stderr line ``moe-compat-merge: error: <ErrorName>: <cause>`` (no traceback); the
    sources are byte-identical, whatever was at the output path is unchanged and no partial directory is left."""
    monkeypatch.setattr(merge_cli, "pin_malloc_mmap_threshold", lambda: False)  # keep the test process's malloc
    base, adapter = build_synthetic(tmp_path, fp8=fault.fp8, **{**SMALL, **fault.build})
    fault.mutate(base, adapter, tmp_path)
    out = base / "merged" if "--out-inside-base" in fault.args else tmp_path / "out"
    before, out_before = _sources(tmp_path), _state(out)
    args = [a for a in fault.args if a != "--out-inside-base"]
    rc = run_cli([str(base), str(adapter), str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"moe-compat-merge: error: {fault.error}: "), lines[0]
    assert re.search(fault.match, lines[0]), (fault.match, lines[0])
    assert _sources(tmp_path) == before
    assert _state(out) == out_before
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_fault_ids_are_unique():
    ids = [f.id for f in FAULTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 45


def test_corrupt_last_shard_refused_before_any_shard_is_written(tmp_path, capsys):
    """Issue 12: a header safetensors rejects was only noticed when its shard was written, after earlier shards.
    Now every shard is validated at scan time: with progress on, not a single shard line is printed."""
    base, adapter = build_synthetic(tmp_path, **SMALL)
    _header_edit(lambda h, ks: _shift(h, ks[1], -4), lambda d: d[:-4])(base, adapter, tmp_path)
    before = _sources(tmp_path)
    assert run_cli([str(base), str(adapter), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "shard 1/3" not in err and "overlaps the previous tensor" in err
    _assert_failed_cleanly(tmp_path, before, tmp_path / "out")


# --- faults that need a real process, the file system, or an injected bug -----------------------------------------


def _subprocess_cli(argv: list[str], limit_fsize: int | None = None) -> subprocess.CompletedProcess:
    """``python -m impl.merge_cli`` in a child (a real interpreter: its stderr is everything a user sees)."""

    def limit():
        if limit_fsize is not None:  # writes past the limit fail with EFBIG instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "impl.merge_cli", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=300)


def test_cli_subprocess_corrupt_header_one_line(tmp_path):
    """The same contract seen from a shell: exit 2, one line on stderr, no traceback, nothing written."""
    base, adapter = build_synthetic(tmp_path, **SMALL)
    FAULTS[0].mutate(base, adapter, tmp_path)
    before = _sources(tmp_path)
    proc = _subprocess_cli([str(base), str(adapter), str(tmp_path / "out")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "CheckpointError: " in proc.stderr
    _assert_failed_cleanly(tmp_path, before, tmp_path / "out")


def test_disk_full_while_writing_is_a_named_error(tmp_path):
    """A write that fails mid-shard (RLIMIT_FSIZE: the kernel answers EFBIG, the same OSError path as ENOSPC on a
    full disk) ends as MergeError with exit 2 and one line; the partial directory is removed, nothing published."""
    base, adapter = build_synthetic(tmp_path, **SMALL)  # each output shard is ~48 KiB
    before = _sources(tmp_path)
    proc = _subprocess_cli([str(base), str(adapter), str(tmp_path / "out"), "--quiet"], limit_fsize=16 * 1024)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert re.search(r"MergeError: writing the merge next to .*/out failed: \[Errno 27\] File too large", line), line
    assert "nothing was published" in line
    _assert_failed_cleanly(tmp_path, before, tmp_path / "out")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can create entries in: ``chattr +i`` as root (root ignores mode bits), else mode 0555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode != 0:
            pytest.fail("running as root without a working chattr: cannot make a read-only directory")
        yield d
        subprocess.run(["chattr", "-i", str(d)], check=True)
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def test_read_only_output_location_is_a_named_error(tmp_path, read_only_dir, capsys):
    base, adapter = build_synthetic(tmp_path, **SMALL)
    before = _sources(tmp_path)
    out = read_only_dir / "out"
    assert run_cli([str(base), str(adapter), str(out), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.search(r"MergeError: writing the merge next to .*/ro/out failed: \[Errno (1|13)\]", line), line
    assert _sources(tmp_path) == before and list(read_only_dir.iterdir()) == []


def test_planned_delta_left_unapplied_fails_the_merge(tmp_path, small, monkeypatch):
    """Inject the bug the counter guards against: one planned target key is silently not written."""
    from impl.merge import merger as merger_mod

    base, adapter = small
    victim = "model.layers.1.mlp.experts.2.up_proj.weight"
    original = merger_mod.Merger.dropped
    monkeypatch.setattr(merger_mod.Merger, "dropped", lambda self, key: key == victim or original(self, key))
    _run_failing(tmp_path, base, adapter, MergeError, rf"deltas applied != planned .*'{re.escape(victim)}': \(0, 1\)")


def test_planned_delta_applied_twice_fails_the_merge(tmp_path, small, monkeypatch):
    """Inject the other bug: one target tensor is produced (its delta added) twice."""
    from impl.merge import output as output_mod

    base, adapter = small
    victim = "model.layers.0.mlp.experts.1.down_proj.weight"
    real_write = output_mod.write_shard

    def write_twice(path, specs, produce, metadata=None):
        if any(s.key == victim for s in specs):
            produce(victim)
        return real_write(path, specs, produce, metadata)

    monkeypatch.setattr(output_mod, "write_shard", write_twice)
    _run_failing(tmp_path, base, adapter, MergeError, rf"deltas applied != planned .*'{re.escape(victim)}': \(2, 1\)")


def test_square_gate_up_decided_by_the_non_square_sibling(tmp_path, small):
    """SMALL has 2I == H (square gate_up). Without peft_version the non-square down decides its orientation: the
    merge equals the merge with peft_version, tensor for tensor, and the sources are untouched."""
    base, adapter = small
    merge_adapter(base, adapter, tmp_path / "with_version")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.pop("peft_version")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    before = _sources(tmp_path)
    merge_adapter(base, adapter, tmp_path / "by_sibling")
    assert _sources(tmp_path) == before
    a, b = load_tensors(tmp_path / "with_version"), load_tensors(tmp_path / "by_sibling")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    provenance = json.loads((tmp_path / "by_sibling" / "moe_compat_merge.json").read_text())
    assert set(provenance["orientations"].values()) == {"swapped"}


def test_output_dir_rules(tmp_path, small):
    base, adapter = small
    before = _sources(tmp_path)
    with pytest.raises(MergeError, match="must not be, contain or be inside the source"):
        merge_adapter(base, adapter, base / "merged")
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="exists; pass overwrite=True"):
        merge_adapter(base, adapter, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("x")
    merge_adapter(base, adapter, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # the moved-aside old output is gone
    assert _sources(tmp_path) == before


def test_cli_success_prints_the_report(tmp_path, small, capsys, monkeypatch):
    monkeypatch.setattr(merge_cli, "pin_malloc_mmap_threshold", lambda: False)
    base, adapter = small
    assert run_cli([str(base), str(adapter), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["expert_deltas"] == 3 * 3 * SMALL["E"]
    assert "[moe-compat-merge] shard 3/3" in captured.err


# --- interrupted writes ----------------------------------------------------------------------------------------


def test_failure_in_a_later_shard_leaves_nothing(tmp_path, small, capsys):
    """A NaN in the last layer's adapter passes planning (shapes only) and fails the finiteness check while the
    last shard is written, after shards 1 and 2 were written to the temporary directory."""
    base, adapter = small
    key = "base_model.model.model.layers.2.mlp.experts.lora_B.weight"

    def poison(ts):
        ts[key][0, 0] = float("nan")

    _rewrite(adapter / "adapter_model.safetensors", poison)
    _run_failing(
        tmp_path,
        base,
        adapter,
        MergeError,
        r"'model.layers.2.mlp.experts.0.down_proj.weight' \[64, 32\] has \d+ non-finite",
        progress=True,
    )
    err = capsys.readouterr().err
    assert "shard 1/3" in err and "shard 2/3" in err and "shard 3/3" not in err


def test_killed_process_leaves_no_output_dir(tmp_path):
    """SIGKILL right after the CLI reports its first shard: ``out`` never appears (the rename is the last step); the
    temporary ``.out.partial-<pid>-<hex>`` is all that can remain after a kill (no handler runs on SIGKILL), and the
    next merge into ``out`` removes it."""
    base, adapter = build_synthetic(tmp_path, shards=8, E=8, H=512, I=256, r=4)
    before = {d: tree_digest(tmp_path / d) for d in ("base", "adapter")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "impl.merge_cli", str(base), str(adapter), str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if "shard 1/8" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL  # killed mid-merge, not finished
    assert not (tmp_path / "out").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("base", "adapter")]
    assert all(name.startswith(".out.partial-") for name in leftovers), leftovers
    assert {d: tree_digest(tmp_path / d) for d in ("base", "adapter")} == before
    merge_adapter(base, adapter, tmp_path / "out")  # the next merge removes the dead process's partial dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_successful_merge_counts_and_keeps_source(tmp_path, small):
    base, adapter = small
    before = {d: tree_digest(tmp_path / d) for d in ("base", "adapter")}
    report = merge_adapter(base, adapter, tmp_path / "out")
    assert {d: tree_digest(tmp_path / d) for d in ("base", "adapter")} == before
    assert report.expert_deltas == 3 * 3 * SMALL["E"] and report.linear_deltas == 0
    src, out = load_tensors(base), load_tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(not torch.equal(src[k], out[k]) for k in src)


# --- bytes against reference.merge (no transformers needed) ----------------------------------------------------


@pytest.mark.parametrize("method", ["merged_16bit", "fp8"])
def test_fp8_merge_equals_reference_merge(tmp_path, method):
    """Every merged expert tensor equals reference.merge (merge_fp8_to_bf16 / merge_into_fp8) on the same q, scale,
    block and ΔW from reference.lora (PEFT 0.21 on fused_linear: swapped, stride-E), bit for bit. H=64, I=32 with
    128×128 blocks: every scale grid is a partial [1, 1] ceil grid."""
    from reference.merge import merge_fp8_to_bf16, merge_into_fp8

    base, adapter = build_synthetic(tmp_path, fp8=True, **SMALL)
    merge_adapter(base, adapter, tmp_path / "out", method=method)
    src, out, lora = load_tensors(base), load_tensors(tmp_path / "out"), load_tensors(adapter)
    E, I = SMALL["E"], SMALL["I"]
    for layer in range(SMALL["shards"]):
        p = f"model.layers.{layer}.mlp.experts"
        deltas = _ref_deltas(lora, p)
        for e in range(E):
            for proj, d in (("gate_proj", deltas["gate_up"][e, :I]), ("up_proj", deltas["gate_up"][e, I:])):
                _check_one(src, out, f"{p}.{e}.{proj}.weight", d, method, merge_fp8_to_bf16, merge_into_fp8)
            _check_one(
                src, out, f"{p}.{e}.down_proj.weight", deltas["down"][e], method, merge_fp8_to_bf16, merge_into_fp8
            )


def _check_one(src, out, key, delta, method, to_bf16, into_fp8):
    q, s = src[key], src[key + "_scale_inv"]
    if method == "merged_16bit":
        assert torch.equal(out[key], to_bf16(q, s, delta, (128, 128))), key
        assert key + "_scale_inv" not in out
    else:
        q2, s2 = into_fp8(q, s, delta, (128, 128))
        assert torch.equal(out[key].view(torch.uint8), q2.view(torch.uint8)), key
        assert torch.equal(out[key + "_scale_inv"], s2), key


def test_per_row_and_per_tensor_scales_merge(tmp_path):
    """compressed-tensors channel scales ``[R, 1]`` and per-tensor scalars ``[]`` dequantize as blocks (1, C) and
    (R, C): the merged bf16 tensor equals reference.merge.merge_fp8_to_bf16 with that block and ΔW, bit for bit."""
    from reference.merge import merge_fp8_to_bf16

    base, adapter = build_synthetic(tmp_path, fp8=True, **SMALL)
    k_row, k_tensor = K0, K0.replace("gate_proj", "down_proj")  # gate [I=32, H=64], down [H=64, I=32] of expert 0
    blocks = {k_row: (1, 64), k_tensor: (64, 32)}

    def requant(ts):
        for key, block in blocks.items():
            ts[key], s = quantize_fp8_block(ts[key].float(), block)
            ts[key + "_scale_inv"] = s if key == k_row else s.reshape(())

    _rewrite(_shard_of(base, K0), requant)
    merge_adapter(base, adapter, tmp_path / "out", method="merged_16bit")
    src, out = load_tensors(base), load_tensors(tmp_path / "out")
    deltas = _ref_deltas(load_tensors(adapter), "model.layers.0.mlp.experts")
    expected_delta = {k_row: deltas["gate_up"][0, : SMALL["I"]], k_tensor: deltas["down"][0]}
    for key, block in blocks.items():
        q, s = src[key], src[key + "_scale_inv"]
        assert s.shape == ((32, 1) if key == k_row else ())
        grid = s.reshape(1, 1) if s.ndim == 0 else s  # the reference takes a scalar only without an explicit block
        assert torch.equal(out[key], merge_fp8_to_bf16(q, grid, expected_delta[key], block)), key


def _ref_deltas(lora: dict, p: str) -> dict[str, torch.Tensor]:
    """ΔW of one synthetic layer from reference.lora: PEFT 0.21 on fused_linear (swapped), stride-E, s = 2r/r."""
    from reference.layout import Orientation
    from reference.lora import LoraFactors
    from reference.merge import factors_delta

    out = {}
    for name, infix in (("gate_up", "base_layer."), ("down", "")):
        a, b = (lora[f"base_model.model.{p}.{infix}lora_{x}.weight"] for x in "AB")
        out[name] = factors_delta(LoraFactors(a, b, 2.0, Orientation.SWAPPED), SMALL["E"], torch.float32)
    return out


@pytest.mark.parametrize("method", ["merged_16bit", "fp8"])
def test_fused_3d_fp8_merge_equals_reference_merge(tmp_path, method):
    """Fused FP8 experts on disk (``experts.gate_up_proj`` e4m3 [E, H, 2I], gpt_oss layout, with a stacked
    ``gate_up_proj_scale_inv``; 16×16 blocks, partial at the I = 24 edge): equal to reference.merge on the 3-D tensors."""
    from reference.layout import Orientation
    from reference.lora import LoraFactors
    from reference.merge import factors_delta, merge_fp8_to_bf16, merge_into_fp8

    E, H, I, r, block = 4, 32, 24, 2, (16, 16)
    gen = torch.Generator().manual_seed(3)
    p = "model.layers.0.mlp.experts"
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    ts, lora = {}, {}
    for name, shape, infix in (("gate_up_proj", (E, H, 2 * I), "base_layer."), ("down_proj", (E, I, H), "")):
        ts[f"{p}.{name}"], ts[f"{p}.{name}_scale_inv"] = quantize_fp8_block(torch.randn(shape, generator=gen), block)
        # PEFT 0.21 on gpt_oss (is_transposed=True): standard, lora_A [r·E, d1], lora_B [d2, r·E]
        lora[f"base_model.model.{p}.{infix}lora_A.weight"] = torch.randn(r * E, shape[1], generator=gen) * 0.1
        lora[f"base_model.model.{p}.{infix}lora_B.weight"] = torch.randn(shape[2], r * E, generator=gen) * 0.1
    save_file(ts, str(base / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "weight_block_size": list(block)}
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": qc}))
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "peft_version": "0.21.2", "target_parameters": []}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    report = merge_adapter(base, adapter, tmp_path / "out", method=method)
    assert report.expert_deltas == 2 * E
    out = load_tensors(tmp_path / "out")
    for name, infix in (("gate_up_proj", "base_layer."), ("down_proj", "")):
        a, b = (lora[f"base_model.model.{p}.{infix}lora_{x}.weight"] for x in "AB")
        delta = factors_delta(LoraFactors(a, b, 2.0, Orientation.STANDARD), E, torch.float32)
        q, s = ts[f"{p}.{name}"], ts[f"{p}.{name}_scale_inv"]
        if method == "merged_16bit":
            assert torch.equal(out[f"{p}.{name}"], merge_fp8_to_bf16(q, s, delta, block))
        else:
            q2, s2 = merge_into_fp8(q, s, delta, block)
            assert torch.equal(out[f"{p}.{name}"].view(torch.uint8), q2.view(torch.uint8))
            assert torch.equal(out[f"{p}.{name}_scale_inv"], s2)
