"""Expert key schemes of a checkpoint on disk (``E`` experts, ``I`` expert intermediate size, ``H`` hidden size).

- per-expert (transformers 4.x, and what 5.x ``save_pretrained`` writes): ``<p>.experts.{e}.{gate,up,down}_proj.weight``
  or ``<p>.experts.{e}.{w1,w3,w2}.weight`` (Mixtral/LFM2, incl. legacy ``block_sparse_moe``); gate/up ``[I, H]``,
  down ``[H, I]``. The model's fused view is ``gate_up [E, 2I, H] = stack_e(cat(gate_e, up_e))``, ``down [E, H, I]``.
- fused (GPT-OSS, Gemma4, ...): ``<p>.experts.gate_up_proj`` ``[E, 2I, H]`` (fused_linear) or ``[E, H, 2I]`` (gpt_oss),
  ``<p>.experts.down_proj`` ``[E, H, I]`` or ``[E, I, H]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from impl import compat
from impl.checkpoint.header import Checkpoint, CheckpointError
from reference.layout import FUSED_LINEAR, GPT_OSS

PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
FUSED_RE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")
ROLE_OF_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
FUSED_OF_ROLE = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}


@dataclass
class ExpertGroup:
    """One experts module on disk.

    prefix: disk prefix (``model.layers.0.block_sparse_moe.experts``); module_path: the 5.x model's module path
    (``block_sparse_moe`` -> ``mlp``); scheme: "per_expert" or "fused"; layout: FUSED_LINEAR or GPT_OSS (the model's
    fused view); keys: per_expert ``{"gate": [k_0..k_E-1], "up": [...], "down": [...]}``, fused
    ``{"gate_up": k, "down": k}``; param_shapes: the fused view ``{"gate_up": (E, 2I, H) | (E, H, 2I), "down": ...}``.
    """

    prefix: str
    module_path: str
    scheme: str
    layout: str
    num_experts: int
    keys: dict[str, object]
    param_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def module_path_of(prefix: str) -> str:
    """The transformers 5.x module path of a disk expert prefix (legacy Mixtral ``block_sparse_moe`` -> ``mlp``)."""
    return re.sub(r"\.block_sparse_moe\.experts$", ".mlp.experts", prefix)


def find_expert_groups(ckpt: Checkpoint) -> dict[str, ExpertGroup]:
    """Every experts module on disk, keyed by disk prefix; checks expert indices are 0..E-1 and shapes agree."""
    per: dict[str, dict[str, dict[int, str]]] = {}
    fused: dict[str, dict[str, str]] = {}
    for key in ckpt.tensors:
        m = PER_EXPERT_RE.match(key)
        if m:
            role = ROLE_OF_PROJ[m["proj"]]
            per.setdefault(m["prefix"], {}).setdefault(role, {})[int(m["e"])] = key
            continue
        m = FUSED_RE.match(key)
        if m:
            fused.setdefault(m["prefix"], {})[m["param"].removesuffix("_proj")] = key
    groups = {p: _per_expert_group(ckpt, p, roles) for p, roles in per.items()}
    for p, params in fused.items():
        if p in groups:
            raise CheckpointError(f"{ckpt.root}: experts {p!r} have both per-expert and fused keys")
        groups[p] = _fused_group(ckpt, p, params)
    return groups


def check_against_config(ckpt: Checkpoint, groups: dict[str, ExpertGroup]) -> None:
    """Expert dims must match config.json where it has them: ``hidden_size`` = H, ``moe_intermediate_size`` (else
    ``intermediate_size``) = I, and the family's experts-count field (``num_experts`` / ``num_local_experts`` /
    ``n_routed_experts``, `impl.compat.num_experts_attr`) = E; otherwise CheckpointError naming the key and shapes."""
    cfg = ckpt.config.get("text_config") or ckpt.config
    want_h = cfg.get("hidden_size")
    want_i = cfg.get("moe_intermediate_size", cfg.get("intermediate_size"))
    e_fields = sorted({compat.num_experts_attr(f) for f in compat.FAMILIES} & set(cfg))
    for g in groups.values():
        E, a, b = g.param_shapes["down"]
        H, I = (a, b) if g.layout == FUSED_LINEAR else (b, a)  # down [E, H, I] or gpt_oss [E, I, H]
        key = g.keys["down"][0] if g.scheme == "per_expert" else g.keys["down"]
        for name, got, want in (("hidden_size", H, want_h), ("moe_intermediate_size/intermediate_size", I, want_i)):
            if want is not None and got != want:
                raise CheckpointError(
                    f"{key}: expert down shape {[a, b]} ({g.layout}) gives {name} = {got}, config.json says {want}"
                )
        for name in e_fields:
            if cfg[name] != E:
                raise CheckpointError(
                    f"{ckpt.root}: {g.prefix} has E = {E} experts on disk but config.json says {name} = {cfg[name]}"
                )


def _per_expert_group(ckpt: Checkpoint, prefix: str, roles: dict[str, dict[int, str]]) -> ExpertGroup:
    if set(roles) != {"gate", "up", "down"}:
        raise CheckpointError(f"{ckpt.root}: experts {prefix!r} have roles {sorted(roles)}, need gate, up and down")
    E = max(max(ids) for ids in roles.values()) + 1
    for role, ids in roles.items():
        if sorted(ids) != list(range(E)):
            missing = sorted(set(range(E)) - set(ids))
            raise CheckpointError(
                f"{ckpt.root}: experts {prefix!r} role {role}: expert indices {missing} missing (E={E})"
            )
    keys = {role: [ids[e] for e in range(E)] for role, ids in roles.items()}
    shapes = {role: {ckpt.info(k).shape for k in ks} for role, ks in keys.items()}
    if any(len(s) != 1 for s in shapes.values()) or shapes["gate"] != shapes["up"]:
        raise CheckpointError(f"{ckpt.root}: experts {prefix!r} per-expert shapes disagree: {shapes}")
    (I, H), (H2, I2) = next(iter(shapes["gate"])), next(iter(shapes["down"]))
    if (H, I) != (H2, I2):
        raise CheckpointError(
            f"{ckpt.root}: experts {prefix!r}: gate/up [I, H] = {[I, H]} and down [H, I] = {[H2, I2]} disagree"
        )
    return ExpertGroup(
        prefix,
        module_path_of(prefix),
        "per_expert",
        FUSED_LINEAR,
        E,
        keys,
        {"gate_up": (E, 2 * I, H), "down": (E, H, I)},
    )


def _fused_group(ckpt: Checkpoint, prefix: str, params: dict[str, str]) -> ExpertGroup:
    if set(params) != {"gate_up", "down"}:
        raise CheckpointError(f"{ckpt.root}: fused experts {prefix!r} have {sorted(params)}, need gate_up and down")
    gu, dn = ckpt.info(params["gate_up"]).shape, ckpt.info(params["down"]).shape
    if len(gu) != 3 or len(dn) != 3 or gu[0] != dn[0]:
        raise CheckpointError(
            f"{ckpt.root}: fused experts {prefix!r}: gate_up {list(gu)}, down {list(dn)} not [E, ., .]"
        )
    if gu[1] == 2 * dn[2] and gu[2] == dn[1]:
        layout = FUSED_LINEAR  # gate_up [E, 2I, H], down [E, H, I]
    elif gu[2] == 2 * dn[1] and gu[1] == dn[2]:
        layout = GPT_OSS  # gate_up [E, H, 2I], down [E, I, H]
    else:
        raise CheckpointError(
            f"{ckpt.root}: fused experts {prefix!r}: gate_up {list(gu)} and down {list(dn)} fit neither "
            "[E,2I,H]/[E,H,I] (fused_linear) nor [E,H,2I]/[E,I,H] (gpt_oss)"
        )
    if ckpt.model_type == "gpt_oss" and layout != GPT_OSS:
        raise CheckpointError(f"{ckpt.root}: model_type gpt_oss but {prefix!r} shapes are {layout}")
    return ExpertGroup(
        prefix, module_path_of(prefix), "fused", layout, gu[0], dict(params), {"gate_up": gu, "down": dn}
    )
