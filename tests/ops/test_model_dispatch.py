"""A model loaded with impl runs the Triton kernels (the benchmarked stack), and which kernels ran is asserted.

- CPU (TRITON_INTERPRET=1, fp32): a tiny Qwen3-MoE (H = I = 64) with dense / NF4 / FP8-128 experts and PEFT LoRA on
  both expert weights, the "triton" backend asked for by name ("auto" keeps CPU on grouped_mm): forward + backward
  launch the kernels `impl.ops.launches.record_launches` names; the loss and the LoRA gradients equal the
  "grouped_mm" backend's (fp32 bound 1e-5, as tests/ops/test_grouped_gemm.py; FP8: 0.1, the kernel quantizes the
  activations to e4m3 1x128, 3 mantissa bits: RMS rounding 2^-4/sqrt(3) ≈ 3.6 % per GEMM input, the other path does
  not); LoRA changes the output; nothing dense of a quantized weight is kept for backward.
- GPU (marker gpu): the same model on CUDA with backend "auto" in a fresh interpreter that imports only impl (plus
  transformers / PEFT / the zoo to build the model): `impl.ops.backend` is not loaded before the first forward, and
  the CUDA profiler lists the Triton kernels after forward + backward. Without bitsandbytes on the device the NF4
  storage is built from `reference.nf4` codes (bit-identical, tests/impl/test_quant_experts.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("triton")

from tests.impl.moe_helpers import dense_copies, held_for_backward, rel_err, tiny  # noqa: E402
from tests.support import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
# NF4 kernels: last dim % 64; one layer, 4 experts: few interpreted programs
DIMS = dict(hidden_size=64, moe_intermediate_size=64, num_hidden_layers=1, num_experts=4)
KERNELS = {"_grouped_gemm_kernel", "_grouped_wgrad_kernel", "_silu_mul_fwd", "_silu_mul_bwd", "_combine_kernel"}
NF4_KERNELS = KERNELS | {"_nf4_decode_kernel"}  # <= 16 rows per expert: the decode kernel runs the NF4 forwards
BOUND = {"dense": 1e-5, "nf4": 1e-5, "fp8": 0.1}

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")


def _config(kind: str, dtype: torch.dtype):
    from impl.storage import DenseConfig, FP8Config, NF4Config

    return {"dense": DenseConfig(dtype), "nf4": NF4Config(64, False, dtype), "fp8": FP8Config((128, 128), dtype)}[kind]


def _peft_model(kind: str, dtype: torch.dtype):
    from impl.loading import quantize_experts

    m = tiny("qwen3_moe", dtype=dtype, **DIMS)
    quantize_experts(m, _config(kind, dtype))
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, lora_alpha=4, target_parameters=TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return pm


def _step(pm, ids, backend: str):
    """One training step on ``backend``: (output, LoRA grads, tensors kept for backward)."""
    from impl.quant_experts import QuantizedExperts

    for q in pm.modules():
        if isinstance(q, QuantizedExperts):
            q.backend = backend
    pm.zero_grad()
    out, held = held_for_backward(lambda: pm(ids, labels=ids), root=lambda o: o.loss)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n}, held


@interpreter
@pytest.mark.triton
@pytest.mark.skipif("qwen3_moe" not in zoo.families() or zoo.compat.expert_layout("qwen3_moe", zoo.installed_version())
                    == "module_list", reason="needs 5.x fused Qwen3-MoE experts")  # fmt: skip
@pytest.mark.parametrize("kind", ["dense", "nf4", "fp8"])
def test_model_runs_the_triton_kernels_cpu_interpreter(kind):
    from impl.ops.launches import record_launches
    from impl.quant_experts import QuantizedExperts

    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
    pm = _peft_model(kind, torch.float32)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    ref, ref_grads, _ = _step(pm, ids, "grouped_mm")
    with record_launches() as names:
        out, grads, held = _step(pm, ids, "triton")
    want = NF4_KERNELS if kind == "nf4" else KERNELS
    assert want <= set(names), sorted(want - set(names))
    assert rel_err(out.loss, ref.loss) <= BOUND[kind]
    assert grads.keys() == ref_grads.keys() and len(grads) == 4  # 1 layer x 2 weights x (A, B)
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= BOUND[kind], n
    q = next(m for m in pm.modules() if isinstance(m, QuantizedExperts))
    if kind != "dense":
        assert held and not dense_copies(held, q), dense_copies(held, q)
    with torch.no_grad(), pm.disable_adapter():
        off = pm(ids).logits
    assert rel_err(out.logits, off) > 1e-3, rel_err(out.logits, off)  # LoRA is on


GPU_SCRIPT = r"""
import importlib.util, json, sys
import torch, peft
import impl
from impl.quant_experts import QuantizedExperts, is_fused_experts
from impl.storage import WEIGHT_NAMES, NF4Weight
from reference import nf4 as ref_nf4
from tests.ops.test_model_dispatch import TARGETS, _config
from tests.impl.moe_helpers import tiny

kind, dims = sys.argv[1], json.loads(sys.argv[2])
m = tiny("qwen3_moe", dtype=torch.bfloat16, **dims)
cfg = _config(kind, torch.bfloat16)
if kind == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
    for path, ex in [(n, x) for n, x in m.named_modules() if is_fused_experts(x)]:
        weights = {}
        for name in WEIGHT_NAMES:
            p = getattr(ex, name).data
            packed, state = ref_nf4.quantize_nf4(p, 64)
            weights[name] = NF4Weight.from_state(packed, state.absmax, p.shape, 64)
        parent, _, child = path.rpartition(".")
        setattr(m.get_submodule(parent), child, QuantizedExperts(ex, cfg, weights=weights))
else:
    impl.quantize_experts(m, cfg)
pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_parameters=TARGETS)).cuda()
with torch.no_grad():  # PEFT's zero lora_B would make every lora_A gradient exactly 0
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05)
ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0)).cuda()
before = "impl.ops.backend" in sys.modules
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    pm(ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
grads = [float(p.grad.abs().sum()) for n, p in pm.named_parameters() if "lora_" in n]
print(json.dumps(dict(before=before, after="impl.ops.backend" in sys.modules, kernels=kernels, grads=grads)))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "nf4", "fp8"])
def test_model_on_cuda_runs_the_triton_kernels_without_extra_import(kind):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA device (run on the H200: pytest -m gpu)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    dims = json.dumps(dict(DIMS, hidden_size=256, moe_intermediate_size=256))
    res = subprocess.run([sys.executable, "-c", GPU_SCRIPT, kind, dims], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert not got["before"] and got["after"], got  # the registry loaded the Triton backend on demand
    want = NF4_KERNELS if kind == "nf4" else KERNELS
    names = set(got["kernels"])
    assert want <= names, (sorted(want - names), got["kernels"])
    assert len(got["grads"]) == 4 and all(g > 0 for g in got["grads"]), got["grads"]
