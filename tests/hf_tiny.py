"""Tiny random ``transformers`` MoE models, built from configs (no download), for parity tests.

Weights are re-drawn with a larger std than HF's init so that routing is decisive and experts differ,
and every router correction bias is made non-zero so that the selection-only bias path is exercised.
"""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, head_dim=12, attn_implementation="eager")
MLA_COMMON = {k: v for k, v in COMMON.items() if k not in ("head_dim", "num_key_value_heads")}  # heads from the latent


def _cfg(name: str):
    if name == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2)
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=40, num_experts=8,
                                 num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1)
    if name == "qwen3_moe_no_norm":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=40, num_experts=6,
                                 num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1)
    if name == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=40, num_experts=8, num_experts_per_tok=2)
    if name == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=40, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=56, decoder_sparse_step=1)
    if name == "deepseek_v3":
        return tf.DeepseekV3Config(
            **MLA_COMMON,
            num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=40, n_routed_experts=8,
            num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
            routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
    if name == "deepseek_v2":
        return tf.DeepseekV2Config(
            **MLA_COMMON,
            num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=40, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1,
            first_k_dense_replace=0, routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
    if name == "gpt_oss":
        return tf.GptOssConfig(**COMMON, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2,
                               layer_types=["full_attention"] * 2)
    if name == "llama4":
        return tf.Llama4TextConfig(**COMMON, intermediate_size=40, intermediate_size_mlp=64, num_local_experts=4,
                                   num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1])
    if name == "glm4_moe":
        return tf.Glm4MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=40, n_routed_experts=8,
                                num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                first_k_dense_replace=0, routed_scaling_factor=1.8, norm_topk_prob=True)
    if name == "minimax":
        return tf.MiniMaxConfig(**COMMON, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["full_attention"] * 2)
    small_moe = dict(intermediate_size=64, moe_intermediate_size=40, num_experts_per_tok=2)
    grouped = dict(n_routed_experts=8, n_group=2, topk_group=1, n_shared_experts=1, norm_topk_prob=True)
    mla = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
               v_head_dim=12)
    if name == "exaone_moe":
        return tf.ExaoneMoeConfig(**COMMON, **small_moe, num_experts=8, n_group=2, topk_group=1, num_shared_experts=1,
                                  routed_scaling_factor=2.5, layer_types=["full_attention"] * 2,
                                  mlp_layer_types=["sparse"] * 2)
    if name == "glm4_moe_lite":
        return tf.Glm4MoeLiteConfig(**MLA_COMMON, **small_moe, **grouped, **mla, routed_scaling_factor=1.8,
                                    mlp_layer_types=["sparse"] * 2)
    if name == "mistral4":  # softmax scores, grouped top-k by the top-2 sum of the scores
        return tf.Mistral4Config(**MLA_COMMON, **small_moe, **grouped, **mla, routed_scaling_factor=1.5,
                                 first_k_dense_replace=0, head_dim=16)
    if name == "qwen3_vl_moe":
        return tf.Qwen3VLMoeTextConfig(**COMMON, **small_moe, num_experts=8, decoder_sparse_step=1)
    if name == "minimax_m2":
        return tf.MiniMaxM2Config(**COMMON, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2)
    if name in ("granitemoe", "granitemoeshared"):
        cls = tf.GraniteMoeConfig if name == "granitemoe" else tf.GraniteMoeSharedConfig
        extra = {} if name == "granitemoe" else {"shared_intermediate_size": 56}
        return cls(**COMMON, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2, **extra)
    if name == "ernie4_5_moe":  # softmax + a selection-only bias (moe_statics) + shared experts
        return tf.Ernie4_5_MoeConfig(**COMMON, **small_moe, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
                                     moe_layer_start_index=0, moe_layer_interval=1)
    if name == "hunyuan_v1_moe":
        return tf.HunYuanMoEV1Config(**COMMON, intermediate_size=40, num_experts=8, moe_topk=2)
    if name == "lfm2_moe":  # sigmoid + expert bias, scaled
        return tf.Lfm2MoeConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"}, **small_moe, num_experts=8,
                                num_dense_layers=0, use_expert_bias=True, routed_scaling_factor=1.5,
                                layer_types=["full_attention", "conv"])
    raise KeyError(name)


# Families without an AutoModelForCausalLM entry in this transformers.
_MODEL_CLASSES = {"llama4": "Llama4ForCausalLM", "mistral4": "Mistral4ForCausalLM",
                  "qwen3_vl_moe": "Qwen3VLMoeTextModel"}


FAMILIES = ["mixtral", "qwen3_moe", "qwen3_moe_no_norm", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v2",
            "gpt_oss", "llama4", "glm4_moe", "minimax", "exaone_moe", "glm4_moe_lite", "mistral4", "qwen3_vl_moe",
            "minimax_m2", "granitemoe", "granitemoeshared", "ernie4_5_moe", "hunyuan_v1_moe", "lfm2_moe"]


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = _cfg(name)
    model_cls = _MODEL_CLASSES.get(name)
    model = (getattr(tf, model_cls) if model_cls else tf.AutoModelForCausalLM.from_config)(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in pname:
                p.normal_(0.0, 0.15)
            elif "bias" in pname:
                p.normal_(0.0, 0.1)
        for bname, b in model.named_buffers():
            if "correction_bias" in bname or bname.endswith("expert_bias"):
                b.normal_(0.0, 0.05)
    return model.eval().float()
