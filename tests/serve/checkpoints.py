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
    raise KeyError(family)


FAMILIES = ["mixtral", "qwen3_moe", "qwen3_moe_sparse_step", "olmoe", "qwen2_moe"]


def hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 eval-mode model with weights re-drawn large enough that routing and argmax are decisive."""
    torch.manual_seed(seed)
    config = hf_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval().float()


def save(model: torch.nn.Module, path, **kwargs) -> str:
    model.save_pretrained(str(path), **kwargs)
    return str(path)
