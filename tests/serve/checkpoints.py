"""Tiny random ``transformers`` MoE checkpoints for the serve tests (built from configs, saved with
``save_pretrained`` into a temporary directory; nothing is downloaded)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_config(family: str):
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen3_moe":  # layer 1 dense through mlp_only_layers
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=48, num_experts=8,
                                 num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1])
    if family == "qwen3_moe_sparse_step":  # layer 0 dense through decoder_sparse_step, no renormalisation
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=48, num_experts=6,
                                 num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=48, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=56)
    if family == "glm4_moe":  # partial rotary, q/k norms and biases, layer 0 dense, grouped sigmoid + bias router
        return tf.Glm4MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=48, n_routed_experts=8,
                                num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                first_k_dense_replace=1, routed_scaling_factor=1.8, norm_topk_prob=True,
                                use_qk_norm=True, attention_bias=True)
    if family == "minimax_m2":  # partial rotary, q/k norms over all heads, sigmoid + bias router beside the gate
        return tf.MiniMaxM2Config(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.5})
    # windows far below the test prompts' lengths (up to 60 + 32 tokens), not multiples of the block size (8)
    if family == "mixtral_sliding":  # every layer slides
        return tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                                sliding_window=13)
    if family == "qwen2_moe_sliding":  # layer 0 slides (layer_types from use_sliding_window, max_window_layers)
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=48, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=56, use_sliding_window=True,
                                 sliding_window=11, max_window_layers=1)
    if family == "gpt_oss":  # sliding layer 0 and full layer 1, sinks, biases, YaRN, the clamped SwiGLU with biases
        return tf.GptOssConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                               sliding_window=12, swiglu_limit=1.5,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 32})
    if family == "llama4":  # layers 0, 2 roped + chunked (16) dense; layer 1 NoPE, full, temperature-tuned, MoE
        return tf.Llama4TextConfig(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=48, intermediate_size_mlp=80,
                                   num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=16,
                                   no_rope_layers=[1, 0, 1], interleave_moe_layer_step=2, floor_scale=8, attn_scale=0.1,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32})
    raise KeyError(family)


FAMILIES = ["mixtral", "qwen3_moe", "qwen3_moe_sparse_step", "olmoe", "qwen2_moe", "glm4_moe", "minimax_m2",
            "mixtral_sliding", "qwen2_moe_sliding", "gpt_oss", "llama4"]

# multi-head latent attention (serve.models.mla): tiny DeepSeek-V3-shaped configs with awkward, distinct sizes
MLA = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=20, moe_intermediate_size=24,
           intermediate_size=72, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.7}


def mla_config(family: str):
    """``deepseek_v3``: q LoRA, grouped sigmoid router with correction bias, layer 0 dense, shared expert;
    ``deepseek_v3_yarn``: no q LoRA (``q_proj``), YaRN with DeepSeek's mscale, non-interleaved RoPE, 2 shared
    experts; ``glm4_moe_lite``: dense layers from ``mlp_layer_types``; ``mistral4``: softmax grouped router, YaRN
    with Llama-4 query scaling, partial rotary; ``deepseek_v32``: DeepSeek Sparse Attention (indexer RoPE on
    halves); ``glm_moe_dsa``: DSA with interleaved indexer RoPE and a "shared" layer 1 reusing layer 0's top-k."""
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**MLA, q_lora_rank=40, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                                   topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                                   routed_scaling_factor=2.5)
    if family == "deepseek_v3_yarn":
        return tf.DeepseekV3Config(**MLA, q_lora_rank=None, n_routed_experts=6, num_experts_per_tok=2, n_group=1,
                                   topk_group=1, n_shared_experts=2, first_k_dense_replace=0, norm_topk_prob=False,
                                   rope_interleave=False, rope_parameters=dict(YARN), routed_scaling_factor=1.5)
    if family == "glm4_moe_lite":
        return tf.Glm4MoeLiteConfig(**MLA, q_lora_rank=40, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                    topk_group=1, n_shared_experts=1, mlp_layer_types=["sparse", "dense"])
    if family == "mistral4":
        rope = {**YARN, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
                "partial_rotary_factor": 8 / 20}
        return tf.Mistral4Config(**MLA, q_lora_rank=40, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                 topk_group=2, n_shared_experts=1, first_k_dense_replace=1, rope_parameters=rope)
    if family == "deepseek_v32":
        return tf.DeepseekV32Config(**MLA, **DSA_V32, q_lora_rank=40, n_routed_experts=8, num_experts_per_tok=2,
                                    n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1)
    if family == "glm_moe_dsa":
        return tf.GlmMoeDsaConfig(**{**MLA, "num_hidden_layers": 3}, **DSA_GLM, q_lora_rank=40, n_routed_experts=8,
                                  num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                                  first_k_dense_replace=1, indexer_types=["full", "shared", "full"])
    raise KeyError(family)


# DeepSeek Sparse Attention: top-k far below the test prompts' lengths (up to 60 + 32 tokens), so that the indexer
# really chooses; 8 indexer heads make an exact tie (every head's relu at 0) rare
DSA_V32 = dict(index_topk=6, index_n_heads=8, index_head_dim=16)
DSA_GLM = dict(index_topk=5, index_n_heads=8, index_head_dim=12)
DSA_FAMILIES = ["deepseek_v32", "glm_moe_dsa"]
MLA_FAMILIES = ["deepseek_v3", "deepseek_v3_yarn", "glm4_moe_lite", "mistral4", *DSA_FAMILIES]


def hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 eval-mode model with weights re-drawn large enough that routing and argmax are decisive."""
    torch.manual_seed(seed)
    config = mla_config(family) if family in MLA_FAMILIES else hf_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    # Mistral 4 has no AutoModelForCausalLM entry in transformers 5.24 (its checkpoints are multimodal)
    if family == "mistral4":
        model = tf.Mistral4ForCausalLM._from_config(config, attn_implementation="eager")
    else:
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif name.endswith("indexer.k_norm.bias"):  # centred: a common offset would make every key's
                p.normal_(0.0, 0.1)  # relu zero for some queries, an exact tie at their top-k boundary
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():  # DeepSeek's correction bias: selection differs from the scores'
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model.eval().float()


def save(model: torch.nn.Module, path, **kwargs) -> str:
    model.save_pretrained(str(path), **kwargs)
    return str(path)
