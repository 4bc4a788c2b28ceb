"""Tiny random MoE models of every family the installed transformers has, built offline from configs.

    families()                          -> families available in the installed transformers
    variants()                          -> variant names (expert dims), see VARIANTS
    build_config(family, variant, **overrides)
    build_model(family, variant, seed=0, dtype=torch.float32)
    describe(model)                     -> dict: experts/router modules per MoE layer, layout, E, H, I, k, router kind
    Holder(experts)                     -> the smallest model PEFT wraps around one experts module

Shapes: E experts, H hidden, I per-expert intermediate, k experts per token. Every model has 2 decoder
layers and vocab 128; building one takes well under a second on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from impl import compat

E = 8  # experts: 4 groups of 2 for the sigmoid-group routers (topk(2) inside a group needs >= 2 per group)
K = 2
N_GROUP = 4
TOPK_GROUP = 2
VOCAB = 128
LAYERS = 2


@dataclass(frozen=True)
class Variant:
    """Expert dims of a variant: hidden H, per-expert intermediate I, attention head_dim, dense MLP size."""

    hidden: int
    inter: int
    head_dim: int
    dense_inter: int


VARIANTS: dict[str, Variant] = {
    # 2I == H: gate_up [E, 2I, H] is square per expert, the ambiguous case for LoRA orientation detection.
    "2i_eq_h": Variant(hidden=32, inter=16, head_dim=16, dense_inter=64),
    # 2I != H and I != H: every expert matrix is non-square, so any transposition is a shape error.
    "2i_ne_h": Variant(hidden=32, inter=24, head_dim=16, dense_inter=64),
    # I == H: down [E, H, I] is square per expert (ambiguous for the down projection).
    "i_eq_h": Variant(hidden=32, inter=32, head_dim=16, dense_inter=64),
    # FP8-friendly: every expert dim a multiple of 128 and >= 256 (transformers.md §7), attention in 128 blocks.
    "fp8": Variant(hidden=256, inter=256, head_dim=128, dense_inter=256),
}


def installed_version() -> str:
    return transformers.__version__


def families() -> list[str]:
    """Families the installed transformers ships, in compat.FAMILIES order.

    Raises if compat says a family exists but its classes are missing (a wrong version fact).
    """
    out = []
    for name, fam in compat.FAMILIES.items():
        if not compat.family_available(name, installed_version()):
            continue
        for cls in (fam.config_class, fam.causal_lm_class):
            if not hasattr(transformers, cls):
                raise RuntimeError(
                    f"impl.compat says transformers {installed_version()} has {name}, but transformers.{cls} is missing"
                )
        out.append(name)
    return out


def variants() -> list[str]:
    return list(VARIANTS)


def _common(v: Variant) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=v.hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _family_fields(family: str, v: Variant) -> dict:
    """Per-family config fields (transformers.md §7, dims from the variant)."""
    i, hd, dense = v.inter, v.head_dim, v.dense_inter
    qwen_linear_attn = dict(
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=hd,
        linear_value_head_dim=hd,
        layer_types=["linear_attention", "full_attention"],
    )
    if family == compat.QWEN3_MOE:
        return dict(
            head_dim=hd, intermediate_size=dense, moe_intermediate_size=i, num_experts=E, num_experts_per_tok=K,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
    if family == compat.QWEN3_NEXT:
        return dict(
            head_dim=hd, intermediate_size=dense, moe_intermediate_size=i, shared_expert_intermediate_size=i,
            num_experts=E, num_experts_per_tok=K, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            **qwen_linear_attn,
        )  # fmt: skip
    if family == compat.QWEN3_5_MOE:
        return dict(
            head_dim=hd, moe_intermediate_size=i, shared_expert_intermediate_size=i, num_experts=E,
            num_experts_per_tok=K, **qwen_linear_attn,
        )  # fmt: skip
    if family == compat.GLM4_MOE:
        return dict(
            intermediate_size=dense, moe_intermediate_size=i, n_routed_experts=E, num_experts_per_tok=K,
            n_shared_experts=1, n_group=N_GROUP, topk_group=TOPK_GROUP, first_k_dense_replace=1, norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )  # fmt: skip
    if family == compat.DEEPSEEK_V3:
        # MLA dims: q_b out = heads*(nope+rope), kv_a out = kv_lora_rank+rope, kv_b out = heads*(nope+v).
        return dict(
            intermediate_size=dense, moe_intermediate_size=i, n_routed_experts=E, num_experts_per_tok=K,
            n_shared_experts=1, n_group=N_GROUP, topk_group=TOPK_GROUP, first_k_dense_replace=1, norm_topk_prob=True,
            routed_scaling_factor=2.5, q_lora_rank=2 * hd, kv_lora_rank=2 * hd if hd >= 128 else hd,
            qk_nope_head_dim=hd // 2 if hd < 128 else hd, qk_rope_head_dim=hd // 2 if hd < 128 else hd,
            v_head_dim=hd,
        )  # fmt: skip
    if family == compat.GPT_OSS:
        return dict(
            head_dim=hd, intermediate_size=i, num_local_experts=E, num_experts_per_tok=K, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if family == compat.MIXTRAL:
        return dict(head_dim=hd, intermediate_size=i, num_local_experts=E, num_experts_per_tok=K)
    if family == compat.OLMOE:
        return dict(intermediate_size=i, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
    if family == compat.GEMMA4:
        return dict(
            head_dim=hd, global_head_dim=hd, intermediate_size=dense, enable_moe_block=True, num_experts=E,
            top_k_experts=K, moe_intermediate_size=i, hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=VOCAB, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    raise KeyError(f"unknown family {family!r}; known: {sorted(compat.FAMILIES)}")


def build_config(family: str, variant: str = "2i_ne_h", **overrides):
    """A transformers config for a tiny `family` model with the dims of `variant`; `overrides` win."""
    if family not in families():
        raise ValueError(f"family {family!r} is not available in transformers {installed_version()}: {families()}")
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; known: {variants()}")
    v = VARIANTS[variant]
    kwargs = {**_common(v), **_family_fields(family, v), **overrides}
    cls = getattr(transformers, compat.FAMILIES[family].config_class)
    return cls(**kwargs)


def build_model(family: str, variant: str = "2i_ne_h", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised `*ForCausalLM` (eval mode) from `build_config`, deterministic in `seed`.

    Built by `AutoModelForCausalLM.from_config(cfg, dtype=dtype)`, so parameters that transformers allocates
    in a fixed dtype (5.24 DeepSeek-V3 / GLM4-MoE router weight: fp32) keep it, as in a real load.
    """
    cfg = build_config(family, variant, **overrides)
    want = compat.FAMILIES[family].causal_lm_class
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if type(model).__name__ != want:
        raise RuntimeError(f"AutoModelForCausalLM built {type(model).__name__} for {family}, expected {want}")
    return model


def set_experts_implementation(model, impl: str) -> None:
    """Select the 5.x experts implementation ("eager", "grouped_mm", "batched_mm") on every experts module."""
    version = installed_version()
    if impl not in compat.experts_implementations(version):
        raise ValueError(f"experts implementation {impl!r} not available in transformers {version}")
    model.set_experts_implementation(impl)
    for layer in describe(model)["layers"]:
        got = layer.experts.config._experts_implementation
        if got != impl:
            raise RuntimeError(f"set_experts_implementation({impl!r}) left {layer.path} on {got!r}")


@dataclass
class MoeLayer:
    """One MoE layer: `block` holds `router` and `experts` (for Gemma4 the decoder layer itself)."""

    index: int
    path: str
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module


def _moe_layers(model, family: str) -> list[MoeLayer]:
    decoder = model.model.layers
    out = []
    for idx, layer in enumerate(decoder):
        if family == compat.GEMMA4:
            if getattr(layer, "enable_moe_block", False):
                out.append(MoeLayer(idx, f"model.layers.{idx}", layer, layer.router, layer.experts))
            continue
        if family == compat.GPT_OSS:
            out.append(MoeLayer(idx, f"model.layers.{idx}.mlp", layer.mlp, layer.mlp.router, layer.mlp.experts))
            continue
        attr = "block_sparse_moe" if hasattr(layer, "block_sparse_moe") else "mlp"
        block = getattr(layer, attr)
        if hasattr(block, "experts"):
            out.append(MoeLayer(idx, f"model.layers.{idx}.{attr}", block, block.gate, block.experts))
    if not out:
        raise RuntimeError(f"no MoE layer found in {type(model).__name__} ({family})")
    return out


def _router_params(family: str, cfg, version: str) -> dict:
    """Arguments of the reference router for this family (see reference/routing.py)."""
    kind = compat.FAMILIES[family].router_kind
    k = getattr(cfg, compat.top_k_attr(family))
    if kind == compat.SOFTMAX_TOPK:
        # Mixtral and Qwen3.5-MoE always renormalise; the others follow norm_topk_prob.
        renorm = True if family in (compat.MIXTRAL, compat.QWEN3_5_MOE) else bool(cfg.norm_topk_prob)
        return dict(k=k, renormalize=renorm)
    if kind == compat.SIGMOID_GROUP_TOPK:
        return dict(
            k=k,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            renormalize=bool(cfg.norm_topk_prob),
            routed_scaling=float(cfg.routed_scaling_factor),
            mask_value=compat.group_mask_value(version),
        )
    if kind == compat.GPT_OSS_TOPK:
        return dict(k=k)
    if kind == compat.GEMMA4_ROUTER:
        return dict(k=k, eps=cfg.rms_norm_eps)
    raise KeyError(kind)


def describe(model) -> dict:
    """What later tests need to know about a zoo (or any supported) model.

    Keys: family, version (transformers), layout ("fused_linear" | "gpt_oss" | "module_list"), E, H, I, k,
    act (activation name, None for GPT-OSS), swiglu (alpha, limit) for GPT-OSS, router_kind, router (kwargs of
    the reference router), layers (list[MoeLayer]), experts (list of experts modules), routers (list).
    """
    cfg = model.config
    family = compat.family_of_model_type(cfg.model_type)
    version = installed_version()
    layers = _moe_layers(model, family)
    layout = compat.expert_layout(family, version)
    n_exp = getattr(cfg, compat.num_experts_attr(family))
    inter = getattr(cfg, compat.intermediate_attr(family))
    _check_expert_shapes(layers, layout, n_exp, cfg.hidden_size, inter)
    swiglu = None
    act = None
    if family == compat.GPT_OSS:
        ex = layers[0].experts
        swiglu = (float(ex.alpha), float(ex.limit))
    else:
        act = getattr(cfg, compat.activation_attr(family))
    return dict(
        family=family,
        version=version,
        layout=layout,
        E=n_exp,
        H=cfg.hidden_size,
        I=inter,
        k=getattr(cfg, compat.top_k_attr(family)),
        act=act,
        swiglu=swiglu,
        router_kind=compat.FAMILIES[family].router_kind,
        router=_router_params(family, cfg, version),
        layers=layers,
        experts=[layer.experts for layer in layers],
        routers=[layer.router for layer in layers],
    )


def _check_expert_shapes(layers: list[MoeLayer], layout: str, n_exp: int, h: int, i: int) -> None:
    """Fail loudly if the modules do not have the layout compat claims for this version."""
    for layer in layers:
        ex = layer.experts
        if layout == "module_list":
            got = [_logical_shape(p) for p in _module_list_weights(ex)[0]]
            want = [(i, h)] * n_exp
        elif layout == "fused_linear":
            got = [_logical_shape(ex.gate_up_proj), _logical_shape(ex.down_proj)]
            want = [(n_exp, 2 * i, h), (n_exp, h, i)]
        else:
            got = [_logical_shape(ex.gate_up_proj), _logical_shape(ex.down_proj)]
            want = [(n_exp, h, 2 * i), (n_exp, i, h)]
        if got != want:
            raise RuntimeError(f"{layer.path}: expected {layout} expert shapes {want}, got {got}")


def _logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of the weight a parameter stands for: bitsandbytes 4-bit params store packed bytes and carry the
    logical shape in ``quant_state.shape``."""
    qs = getattr(p, "quant_state", None)
    return tuple(qs.shape) if qs is not None else tuple(p.shape)


def _module_list_weights(experts) -> tuple[list, list, list]:
    """(gate [I,H], up [I,H], down [H,I]) weights of a 4.57 ModuleList (Mixtral names them w1, w3, w2)."""
    first = experts[0]
    if hasattr(first, "w1"):
        return [m.w1.weight for m in experts], [m.w3.weight for m in experts], [m.w2.weight for m in experts]
    return (
        [m.gate_proj.weight for m in experts],
        [m.up_proj.weight for m in experts],
        [m.down_proj.weight for m in experts],
    )


def module_list_weights(experts) -> tuple[list, list, list]:
    """Public accessor: per-expert (gate, up, down) weights of a 4.57 ModuleList experts module."""
    return _module_list_weights(experts)


def fp8_aligned(variant: str) -> bool:
    """Every expert dim of `variant` is a multiple of 128 and >= 256 (transformers.md §7)."""
    v = VARIANTS[variant]
    return all(d % 128 == 0 and d >= 256 for d in (v.hidden, v.inter, 2 * v.inter))


class Holder(torch.nn.Module):
    """The smallest model PEFT can wrap around one experts module (``target_parameters`` keys ``experts.<param>``):
    ``forward(x [T, H], idx [T, k], w [T, k]) = experts(x, idx, w)``."""

    def __init__(self, experts: torch.nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x, idx, w):
        return self.experts(x, idx, w)
