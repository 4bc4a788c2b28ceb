"""Upstream version facts (transformers), defined once, each read in the released source.

Every fact is a small function of the transformers version (a string such as "5.24.0"); callers pass
`transformers.__version__`. Boundaries were checked in the wheels of 4.57.6, 5.0.0, 5.2.0, 5.5.0, 5.6.0,
5.12.0, 5.13.0 and 5.24.0 (see docs: /work/shared/upstream/transformers.md §0, §1, §2).
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

# Family names used across moe-compat (keys of FAMILIES).
QWEN3_MOE = "qwen3_moe"
QWEN3_NEXT = "qwen3_next"
QWEN3_5_MOE = "qwen3_5_moe"
GLM4_MOE = "glm4_moe"
DEEPSEEK_V3 = "deepseek_v3"
GPT_OSS = "gpt_oss"
MIXTRAL = "mixtral"
OLMOE = "olmoe"
GEMMA4 = "gemma4"

# Router kinds (how top-k weights are computed), one per family; implemented in reference/routing.py.
SOFTMAX_TOPK = "softmax_topk"
SIGMOID_GROUP_TOPK = "sigmoid_group_topk"
GPT_OSS_TOPK = "gpt_oss_topk"
GEMMA4_ROUTER = "gemma4_router"


@dataclass(frozen=True)
class Family:
    """Static description of one MoE family in transformers.

    `since`: first transformers version that has it. `config_class` / `causal_lm_class`: names in the
    top-level `transformers` namespace. `model_types`: `config.model_type` values that map to this family.
    """

    name: str
    since: str
    config_class: str
    causal_lm_class: str
    model_types: tuple[str, ...]
    router_kind: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(QWEN3_MOE, "4.57", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("qwen3_moe",), SOFTMAX_TOPK),
        Family(QWEN3_NEXT, "4.57", "Qwen3NextConfig", "Qwen3NextForCausalLM", ("qwen3_next",), SOFTMAX_TOPK),
        Family(
            QWEN3_5_MOE,
            "5.2",
            "Qwen3_5MoeTextConfig",
            "Qwen3_5MoeForCausalLM",
            ("qwen3_5_moe_text", "qwen3_5_moe"),
            SOFTMAX_TOPK,
        ),
        Family(GLM4_MOE, "4.57", "Glm4MoeConfig", "Glm4MoeForCausalLM", ("glm4_moe",), SIGMOID_GROUP_TOPK),
        Family(DEEPSEEK_V3, "4.57", "DeepseekV3Config", "DeepseekV3ForCausalLM", ("deepseek_v3",), SIGMOID_GROUP_TOPK),
        Family(GPT_OSS, "4.57", "GptOssConfig", "GptOssForCausalLM", ("gpt_oss",), GPT_OSS_TOPK),
        Family(MIXTRAL, "4.57", "MixtralConfig", "MixtralForCausalLM", ("mixtral",), SOFTMAX_TOPK),
        Family(OLMOE, "4.57", "OlmoeConfig", "OlmoeForCausalLM", ("olmoe",), SOFTMAX_TOPK),
        Family(GEMMA4, "5.5", "Gemma4TextConfig", "Gemma4ForCausalLM", ("gemma4_text", "gemma4"), GEMMA4_ROUTER),
    )
}


def _v(version: str) -> Version:
    return Version(version)


def _at_least(version: str, bound: str) -> bool:
    return _v(version).release >= _v(bound).release


def family_available(family: str, version: str) -> bool:
    """Whether transformers `version` ships `family` (Qwen3.5-MoE from 5.2.0, Gemma4 from 5.5.0)."""
    return _at_least(version, FAMILIES[family].since)


def family_of_model_type(model_type: str) -> str:
    """Family name of a `config.model_type`; KeyError names the unknown type."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam.name
    raise KeyError(f"model_type {model_type!r} is not a known MoE family ({sorted(FAMILIES)})")


def fused_experts(version: str) -> bool:
    """5.0+: every family stores experts as 3-D params; 4.57 uses per-expert ModuleLists (GPT-OSS excepted)."""
    return _at_least(version, "5.0")


def expert_layout(family: str, version: str) -> str:
    """Expert-layout name (see reference/layout.py): gpt_oss always; fused_linear on 5.x; module_list on 4.57."""
    if family == GPT_OSS:
        return "gpt_oss"
    return "fused_linear" if fused_experts(version) else "module_list"


def experts_class_name(family: str, version: str) -> str | None:
    """Class name of the fused experts module, or None where experts are a ModuleList (4.57, not GPT-OSS).

    GLM4-MoE / DeepSeek-V3 call it `*NaiveMoe` in 5.0–5.12 and `*Experts` from 5.13.
    """
    if family == GPT_OSS:
        return "GptOssExperts"
    if not fused_experts(version):
        return None
    naive = not _at_least(version, "5.13")
    return {
        QWEN3_MOE: "Qwen3MoeExperts",
        QWEN3_NEXT: "Qwen3NextExperts",
        QWEN3_5_MOE: "Qwen3_5MoeExperts",
        GLM4_MOE: "Glm4MoeNaiveMoe" if naive else "Glm4MoeExperts",
        DEEPSEEK_V3: "DeepseekV3NaiveMoe" if naive else "DeepseekV3Experts",
        MIXTRAL: "MixtralExperts",
        OLMOE: "OlmoeExperts",
        GEMMA4: "Gemma4TextExperts",
    }[family]


def group_mask_value(version: str) -> float:
    """Value given to experts of non-selected groups in DeepSeek-V3 / GLM4-MoE routing: 0.0 up to 5.5, -inf from 5.6."""
    return float("-inf") if _at_least(version, "5.6") else 0.0


def sigmoid_routing_in_router(version: str) -> bool:
    """DeepSeek-V3 / GLM4-MoE: the router module returns (logits, w, idx) from 5.13 on.

    4.57: `TopkRouter.forward` returns (idx, w). 5.0–5.12: the router returns logits only and
    `<X>MoE.route_tokens_to_experts(logits)` returns (idx, w).
    """
    return _at_least(version, "5.13")


def softmax_router_first_output(version: str) -> str:
    """What a 5.x softmax `*TopKRouter` (Qwen3-MoE/-Next/-3.5, Mixtral, OLMoE) returns first.

    "probs" in 5.0–5.5 (the softmax, fp32), "logits" from 5.6. 4.57 has no router module (the block's
    `gate` is an nn.Linear giving logits).
    """
    if not fused_experts(version):
        raise ValueError(f"transformers {version} has no softmax router module (4.x: gate is nn.Linear)")
    return "logits" if _at_least(version, "5.6") else "probs"


def softmax_router_scores_in_model_dtype(family: str, version: str) -> bool:
    """Whether a 5.x softmax router casts its top-k weights to the logits' (model) dtype.

    5.0–5.5: the cast target is the fp32 probabilities, so weights stay fp32; from 5.6 they are cast to the
    model dtype. Mixtral never casts (fp32 always).
    """
    if family == MIXTRAL:
        return False
    return softmax_router_first_output(version) == "logits"


def gpt_oss_swiglu_in_config(version: str) -> bool:
    """GPT-OSS `swiglu_alpha` / `swiglu_limit` are config fields from 5.19 (hard-coded 1.702 / 7.0 before)."""
    return _at_least(version, "5.19")


GPT_OSS_DEFAULT_ALPHA = 1.702
GPT_OSS_DEFAULT_LIMIT = 7.0


def gpt_oss_router_dense_scores(version: str) -> bool:
    """4.57 GPT-OSS router returns (scores [T,E] dense, idx); 5.x returns (logits, w [T,k], idx)."""
    return not fused_experts(version)


def experts_implementations(version: str) -> tuple[str, ...]:
    """`config._experts_implementation` values that run on CPU without Hub kernels (5.x); () on 4.57."""
    if not fused_experts(version):
        return ()
    return ("eager", "batched_mm", "grouped_mm")


def experts_implementations_float64(version: str) -> tuple[str, ...]:
    """Implementations that run a float64 experts forward on CPU. grouped_mm raises (torch's grouped_mm kernel
    takes fp32 / bf16 / fp16 only, and transformers' fallback test does not look at the dtype); checked on 5.0
    and 5.24 with torch 2.13."""
    return tuple(i for i in experts_implementations(version) if i != "grouped_mm")


def num_experts_attr(family: str) -> str:
    """Config field holding E (as written by each family's config class)."""
    return {
        QWEN3_MOE: "num_experts",
        QWEN3_NEXT: "num_experts",
        QWEN3_5_MOE: "num_experts",
        GLM4_MOE: "n_routed_experts",
        DEEPSEEK_V3: "n_routed_experts",
        GPT_OSS: "num_local_experts",
        MIXTRAL: "num_local_experts",
        OLMOE: "num_experts",
        GEMMA4: "num_experts",
    }[family]


def intermediate_attr(family: str) -> str:
    """Config field holding the per-expert I."""
    return "intermediate_size" if family in (GPT_OSS, MIXTRAL, OLMOE) else "moe_intermediate_size"


def top_k_attr(family: str) -> str:
    """Config field holding k."""
    return "top_k_experts" if family == GEMMA4 else "num_experts_per_tok"


def activation_attr(family: str) -> str:
    """Config field naming the experts' activation (GPT-OSS has its own clamped SwiGLU and none)."""
    return "hidden_activation" if family == GEMMA4 else "hidden_act"
