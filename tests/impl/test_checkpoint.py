"""impl.checkpoint: header scan over shards, expert key schemes, FP8 scale discovery/validation, streaming writer.

Checkpoints here are written with the real ``safetensors.torch.save_file``; FP8 tensors come from
``reference.fp8.quantize_fp8_block`` (the spec), so a dequant through the discovered scale must reproduce the
spec's dequant bit for bit.
"""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from impl.checkpoint import (  # noqa: E402
    CheckpointError,
    FP8CheckpointError,
    OutSpec,
    discover_fp8,
    find_expert_groups,
    open_checkpoint,
    read_fp8_experts,
    read_header,
    write_shard,
)
from reference.fp8 import dequantize_fp8, quantize_fp8_block  # noqa: E402
from reference.layout import FUSED_LINEAR, GPT_OSS  # noqa: E402

E, I, H = 2, 192, 256  # I not a multiple of 128: gate/up blocks straddle under a fused gate_up scale


def _write(root, shards: dict[str, dict[str, torch.Tensor]], config: dict | None = None, index: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, str(root / name), metadata={"format": "pt"})
    if index:
        weight_map = {k: name for name, ts in shards.items() for k in ts}
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def _experts(gen, prefix="model.layers.0.mlp.experts", names=("gate_proj", "up_proj", "down_proj")):
    out = {}
    for e in range(E):
        for n, shape in zip(names, [(I, H), (I, H), (H, I)]):
            out[f"{prefix}.{e}.{n}.weight"] = torch.randn(shape, generator=gen)
    return out


def _fp8_per_expert(dense: dict[str, torch.Tensor], suffix="weight_scale_inv", block=(128, 128)):
    out = {}
    for k, w in dense.items():
        q, s = quantize_fp8_block(w, block)
        out[k], out[k.removesuffix("weight") + suffix] = q, s
    return out


def test_header_matches_safe_open_over_shards(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ts = _experts(gen)
    ts["model.embed_tokens.weight"] = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    keys = sorted(ts)
    shards = {"a.safetensors": {k: ts[k] for k in keys[:3]}, "b.safetensors": {k: ts[k] for k in keys[3:]}}
    ckpt = open_checkpoint(_write(tmp_path, shards))
    assert ckpt.shards == ("a.safetensors", "b.safetensors") and ckpt.indexed
    for shard in ckpt.shards:
        with safe_open(str(tmp_path / shard), "pt") as f:
            for k in f.keys():
                info = ckpt.info(k)
                assert info.shard == shard and info.shape == tuple(f.get_slice(k).get_shape())
                assert info.dtype == f.get_slice(k).get_dtype()


def test_index_inconsistencies_raise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    root = _write(tmp_path / "c", {"a.safetensors": {"x": torch.randn(2, generator=gen)}})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard b.safetensors listed in the index does not exist"):
        open_checkpoint(root)
    _write(root, {"b.safetensors": {"y": torch.zeros(1)}}, index=False)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "b.safetensors", "y": "b.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="maps 'x' to b.safetensors but its header is in no shard"):
        open_checkpoint(root)
    with pytest.raises(CheckpointError, match="not a directory"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        open_checkpoint(tmp_path / "empty")


def test_corrupt_headers_raise(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="needs 16 bytes"):
        read_header(p)


def _t(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (header, data section, what read_header must say or None when the file is valid). The raw-bytes headers cover what
# json.dumps cannot write. Each case is also given to safetensors itself.
HEADER_CASES = {
    "valid": ({"a": _t()}, 8, None),
    "valid_two_out_of_order": ({"b": _t(offsets=(8, 16)), "a": _t()}, 16, None),
    "valid_empty": ({}, 0, None),
    "valid_zero_size_tensor": ({"a": _t(shape=(0,), offsets=(0, 0))}, 0, None),
    "valid_metadata": ({"__metadata__": {"format": "pt"}, "a": _t()}, 8, None),
    "valid_extra_field": ({"a": {**_t(), "note": 1}}, 8, None),
    "overlap": ({"a": _t(), "b": _t(offsets=(4, 12))}, 16, "overlaps the previous tensor"),
    "hole": ({"a": _t(), "b": _t(offsets=(12, 20))}, 20, "leaves a hole"),
    "hole_at_start": ({"a": _t(offsets=(4, 12))}, 12, "leaves a hole"),
    "out_of_range": ({"a": _t()}, 4, "runs past the end"),
    "trailing_bytes": ({"a": _t()}, 12, "trailing bytes"),
    "negative_offset": ({"a": _t(offsets=(-8, 0))}, 8, "not two integers >= 0"),
    "float_offsets": ({"a": _t(offsets=(0.0, 8.0))}, 8, "not two integers >= 0"),
    "bool_offset": ({"a": _t(offsets=(False, 8))}, 8, "not two integers >= 0"),
    "three_offsets": ({"a": {**_t(), "data_offsets": [0, 8, 8]}}, 8, "not two integers >= 0"),
    "offset_past_u64": ({"a": _t(offsets=(0, 2**64 + 8))}, 8, "needs 8 bytes"),
    "begin_after_end": ({"a": _t(shape=(0,), offsets=(8, 0))}, 8, "needs 0 bytes"),
    "wrong_size": ({"a": _t(offsets=(0, 4))}, 4, "needs 8 bytes"),
    "shape_overflow": ({"a": _t(shape=(2**40, 2**40))}, 8, "needs"),
    "missing_dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, "lacks dtype"),
    "missing_shape": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, "lacks dtype"),
    "missing_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, 8, "lacks dtype"),
    "float_shape": ({"a": _t(shape=(2.0,))}, 8, "not a list of integers"),
    "negative_shape": ({"a": _t(shape=(-2,))}, 8, "not a list of integers"),
    "string_shape": ({"a": {**_t(), "shape": "2"}}, 8, "not a list of integers"),
    "unknown_dtype": ({"a": _t(dtype="F99")}, 8, "unsupported dtype"),
    "entry_not_object": ({"a": [1]}, 8, "lacks dtype"),
    "metadata_not_strings": ({"__metadata__": {"x": 1}, "a": _t()}, 8, "__metadata__ must be an object of strings"),
    "metadata_a_list": ({"__metadata__": [1], "a": _t()}, 8, "__metadata__ must be an object of strings"),
    "not_an_object": (b"[1, 2]", 8, "not a JSON object"),
    "nul_padding": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}\0\0\0', 8, "not valid JSON"),
    "duplicate_key": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                      b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "duplicate keys"),
}  # fmt: skip
STRICTER_THAN_SAFETENSORS = {"duplicate_key"}  # safetensors keeps the last entry; two tensors of one name is a bug


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_validation_at_least_as_strict_as_safetensors(tmp_path, case):
    """Every file the installed safetensors refuses, read_header refuses too (CheckpointError naming the rule), and
    every file it reads is read alike; the only extra refusal is a duplicate tensor name."""
    header, data_len, rule = HEADER_CASES[case]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    try:
        with safe_open(str(path), "pt") as f:
            theirs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except safetensors.SafetensorError:
        theirs = None
    if rule is None:
        assert theirs is not None
        ours = read_header(path)
        assert {k: (t.dtype, t.shape) for k, t in ours.items()} == theirs
        return
    assert (theirs is None) or case in STRICTER_THAN_SAFETENSORS, f"safetensors reads {case}: {theirs}"
    with pytest.raises(CheckpointError, match=rf"{path}: .*{re.escape(rule)}"):
        read_header(path)


def test_expert_groups_per_expert_legacy_and_fused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ts = _experts(gen, "model.layers.0.block_sparse_moe.experts", ("w1", "w3", "w2"))
    ts["model.layers.1.mlp.experts.gate_up_proj"] = torch.randn(E, H, 2 * I, generator=gen)  # gpt_oss [E, H, 2I]
    ts["model.layers.1.mlp.experts.down_proj"] = torch.randn(E, I, H, generator=gen)
    ts["model.layers.2.mlp.experts.gate_up_proj"] = torch.randn(E, 2 * I, H, generator=gen)  # fused_linear
    ts["model.layers.2.mlp.experts.down_proj"] = torch.randn(E, H, I, generator=gen)
    groups = find_expert_groups(open_checkpoint(_write(tmp_path, {"m.safetensors": ts})))
    legacy = groups["model.layers.0.block_sparse_moe.experts"]
    assert legacy.module_path == "model.layers.0.mlp.experts" and legacy.scheme == "per_expert"
    assert legacy.keys["up"][1] == "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    assert legacy.param_shapes == {"gate_up": (E, 2 * I, H), "down": (E, H, I)}
    assert groups["model.layers.1.mlp.experts"].layout == GPT_OSS
    assert groups["model.layers.2.mlp.experts"].layout == FUSED_LINEAR


def test_expert_shapes_checked_against_config(tmp_path):
    from impl.checkpoint import check_against_config

    ts = _experts(torch.Generator().manual_seed(0))
    ckpt = open_checkpoint(_write(tmp_path, {"m.safetensors": ts}, {"hidden_size": H, "moe_intermediate_size": 128}))
    with pytest.raises(
        CheckpointError,
        match=r"down shape \[256, 192\] .* moe_intermediate_size/intermediate_size = 192, config.json says 128",
    ):
        check_against_config(ckpt, find_expert_groups(ckpt))


def test_missing_expert_index_raises(tmp_path):
    ts = _experts(torch.Generator().manual_seed(0))
    del ts["model.layers.0.mlp.experts.0.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"role up: expert indices \[0\] missing"):
        find_expert_groups(open_checkpoint(_write(tmp_path, {"m.safetensors": ts})))


@pytest.mark.parametrize("suffix", ["weight_scale_inv", "weight_scale"])
def test_per_expert_scales_in_another_shard(tmp_path, suffix):
    """DeepSeek / compressed-tensors naming; every scale lives in a shard of its own; partial 128-blocks (I=192)."""
    fp8 = _fp8_per_expert(_experts(torch.Generator().manual_seed(1)), suffix)
    weights = {k: v for k, v in fp8.items() if k.endswith(".weight")}
    scales = {k: v for k, v in fp8.items() if not k.endswith(".weight")}
    ckpt = open_checkpoint(_write(tmp_path, {"w.safetensors": weights, "s.safetensors": scales}, {}))
    entries = discover_fp8(ckpt)
    assert set(entries) == set(weights)
    for k, entry in entries.items():
        assert entry.scale_key == k.removesuffix("weight") + suffix and entry.block == (128, 128)
        assert ckpt.info(entry.scale_key).shard == "s.safetensors"


def _fused_scale_ckpt(tmp_path, block=(128, 128)):
    """transformers 5.24 FP8 save: per-expert fp8 weights, stacked ``gate_up_proj_scale_inv [E, ⌈2I/bm⌉, ⌈H/bn⌉]``."""
    gen = torch.Generator().manual_seed(2)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    q_gu, s_gu = quantize_fp8_block(gate_up, block)
    q_dn, s_dn = quantize_fp8_block(down, block)
    p = "model.layers.0.mlp.experts"
    ts = {f"{p}.gate_up_proj_scale_inv": s_gu, f"{p}.down_proj_scale_inv": s_dn}
    for e in range(E):
        ts[f"{p}.{e}.gate_proj.weight"], ts[f"{p}.{e}.up_proj.weight"] = q_gu[e, :I], q_gu[e, I:]
        ts[f"{p}.{e}.down_proj.weight"] = q_dn[e]
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    return _write(tmp_path, {"m.safetensors": ts}, cfg), (q_gu, s_gu, q_dn, s_dn)


def test_fused_scale_with_per_expert_weights(tmp_path):
    root, (q_gu, s_gu, q_dn, s_dn) = _fused_scale_ckpt(tmp_path)
    entries = discover_fp8(open_checkpoint(root))
    up1 = entries["model.layers.0.mlp.experts.1.up_proj.weight"]
    assert (up1.expert, up1.row_offset, up1.virtual_rows, up1.block) == (1, I, 2 * I, (128, 128))
    fused = read_fp8_experts(root)["model.layers.0.mlp.experts"]
    q, s, block = fused["gate_up"]
    assert torch.equal(q.view(torch.uint8), q_gu.view(torch.uint8)) and torch.equal(s, s_gu) and block == (128, 128)
    assert torch.equal(fused["down"][1], s_dn)


def test_read_fp8_experts_stacks_per_expert_scales(tmp_path):
    """Per-expert scales fuse when I % bm == 0; the fused dequant equals the per-expert dequant, bit for bit."""
    global_I = 256
    gen = torch.Generator().manual_seed(3)
    p = "model.layers.0.mlp.experts"
    dense = {}
    for e in range(E):
        for n, shape in zip(("gate_proj", "up_proj", "down_proj"), [(global_I, H), (global_I, H), (H, global_I)]):
            dense[f"{p}.{e}.{n}.weight"] = torch.randn(shape, generator=gen)
    fp8 = _fp8_per_expert(dense)
    root = _write(tmp_path, {"m.safetensors": fp8}, {})
    q, s, block = read_fp8_experts(root)[p]["gate_up"]
    assert q.shape == (E, 2 * global_I, H) and s.shape == (E, 4, 2)
    for e in range(E):
        w = dequantize_fp8(q[e], s[e], block)
        gate = dequantize_fp8(fp8[f"{p}.{e}.gate_proj.weight"], fp8[f"{p}.{e}.gate_proj.weight_scale_inv"])
        up = dequantize_fp8(fp8[f"{p}.{e}.up_proj.weight"], fp8[f"{p}.{e}.up_proj.weight_scale_inv"])
        assert torch.equal(w, torch.cat([gate, up]))


def test_read_fp8_experts_refuses_straddling_fusion(tmp_path):
    fp8 = _fp8_per_expert(_experts(torch.Generator().manual_seed(4)))  # I = 192: 128-row blocks would straddle
    with pytest.raises(FP8CheckpointError, match="I = 192 is not a multiple of bm = 128"):
        read_fp8_experts(_write(tmp_path, {"m.safetensors": fp8}, {}))


def test_partial_edge_blocks_and_config_block(tmp_path):
    """Ceil grids accepted; a configured block wins over 128x128 (a 128-grid is then an error)."""
    w = torch.randn(130, 256, generator=torch.Generator().manual_seed(5))
    q, s = quantize_fp8_block(w, (64, 128))  # grid [3, 2]
    ts = {"l.weight": q, "l.weight_scale_inv": s}
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 128]}}
    assert discover_fp8(open_checkpoint(_write(tmp_path / "a", {"m.safetensors": ts}, cfg)))["l.weight"].block == (
        64,
        128,
    )
    with pytest.raises(FP8CheckpointError, match=r"scale grid \[3, 2\] for weight l.weight \[R, C\] = \[130, 256\]"):
        discover_fp8(open_checkpoint(_write(tmp_path / "b", {"m.safetensors": ts}, {})))


def test_per_tensor_and_per_row_scales(tmp_path):
    """A scalar scale is the block (R, C); a per-row ``[R, 1]`` (compressed-tensors channel) or ``[R]`` is (1, C)."""
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(8))
    q_t, s_t = quantize_fp8_block(w, (200, 256))
    q_r, s_r = quantize_fp8_block(w, (1, 256))
    ts = {"t.weight": q_t, "t.weight_scale": s_t.reshape(()), "r.weight": q_r, "r.weight_scale": s_r}
    ts.update({"v.weight": q_r.clone(), "v.weight_scale": s_r.reshape(200).clone()})
    entries = discover_fp8(open_checkpoint(_write(tmp_path, {"m.safetensors": ts}, {})))
    blocks = {k: e.block for k, e in entries.items()}
    assert blocks == {"t.weight": (200, 256), "r.weight": (1, 256), "v.weight": (1, 256)}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda ts: ts.pop("l.weight_scale_inv"), r"l.weight: FP8 weight \[256, 256\] has no scale tensor"),
        (lambda ts: ts.update({"l.weight": ts["l.weight"].to(torch.float8_e5m2)}), "F8_E5M2"),
        (lambda ts: ts.update({"l.weight_scale_inv": torch.ones(3, 2)}), r"scale grid \[3, 2\]"),
        (lambda ts: ts.update({"l.weight_scale": torch.ones(2, 2)}), "several scale tensors"),
        (lambda ts: ts.update({"l.weight_scale_inv": torch.ones(2, 2, dtype=torch.int32)}), "not a float"),
    ],
    ids=["missing", "e5m2", "grid", "two_names", "int_scale"],
)
def test_bad_fp8_weights_raise(tmp_path, mutate, match):
    q, s = quantize_fp8_block(torch.randn(256, 256, generator=torch.Generator().manual_seed(6)))
    ts = {"l.weight": q, "l.weight_scale_inv": s}
    mutate(ts)
    with pytest.raises(FP8CheckpointError, match=match):
        discover_fp8(open_checkpoint(_write(tmp_path, {"m.safetensors": ts}, {})))


def test_stacked_scale_with_wrong_expert_count_raises(tmp_path):
    root, _ = _fused_scale_ckpt(tmp_path)
    ckpt = open_checkpoint(root)
    with safe_open(str(root / "m.safetensors"), "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    ts["model.layers.0.mlp.experts.gate_up_proj_scale_inv"] = ts["model.layers.0.mlp.experts.gate_up_proj_scale_inv"][
        :1
    ]
    save_file(ts, str(root / "m.safetensors"))
    ckpt = open_checkpoint(root)
    with pytest.raises(FP8CheckpointError, match=r"stacked scale \[1, 3, 2\] .* must be \[E=2, gr, gc\]"):
        discover_fp8(ckpt)


def test_write_shard_roundtrip_and_declared_mismatch(tmp_path):
    gen = torch.Generator().manual_seed(7)
    ts = {
        "a": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b": quantize_fp8_block(torch.randn(7, 9, generator=gen))[0],
        "c": torch.randn(1, generator=gen).double(),
        "d": torch.arange(5, dtype=torch.int32),
        "e": torch.zeros(0, 4),
    }
    specs = [OutSpec(k, {v: k for k, v in _dtypes().items()}[t.dtype], tuple(t.shape)) for k, t in ts.items()]
    write_shard(tmp_path / "x.safetensors", specs, ts.__getitem__)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        for k, t in ts.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), t.view(torch.uint8))
            assert f.get_tensor(k).dtype == t.dtype and f.get_tensor(k).shape == t.shape
    with pytest.raises(CheckpointError, match=r"tensor 'c' produced as torch.float32 \[1\], declared F64 \[1\]"):
        write_shard(tmp_path / "y.safetensors", specs, lambda k: ts[k].float())


def _dtypes():
    from impl.checkpoint import SAFETENSORS_DTYPES

    return SAFETENSORS_DTYPES
