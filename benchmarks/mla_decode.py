"""MLA decode at DeepSeek-V3's real per-layer shapes on this CPU: absorbed (latent space) vs naive (K/V expanded
from the latents every step, as ``transformers`` does), measured in one run on one loaded engine.

    python -m benchmarks.mla_decode [--dir /tmp/deepseek_v3_shapes] [--requests 8] [--prompt 1024] [--output 8]

The checkpoint (written once into ``--dir``, ~12 GB, in DeepSeek-V3's FP8 format: every linear weight but the
router e4m3 with 128x128 ``weight_scale_inv``) has DeepSeek-V3's hidden (7168), heads (128), LoRA ranks (q 1536,
kv 512), head dims (nope 128, rope 64, v 128), experts (256 routed of 2048, 8 per token, 8 groups / top 4, one
shared), dense intermediate (18432) and YaRN (factor 40), in 2 layers: layer 0 dense, layer 1 MoE
(``first_k_dense_replace=1``). The vocabulary is cut to ``--vocab`` (32768; 129280 would add 6.4 GB of fp32
embedding and head, which are not per-layer shapes). Routed experts stay FP8; the rest serves in fp32.

The same ``--requests`` random-id prompts of ``--prompt`` tokens, then ``--output`` greedy tokens, run alternately
with absorbed and naive decodes (``--repeats`` times each); decode tok/s counts the steps after every sequence
has its first token. Both modes must produce the same tokens (they are the same function in exact arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from quant.fp8 import quantize_weight
from serve import LLM, SamplingParams

DEEPSEEK_V3 = dict(
    hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, num_hidden_layers=2,
    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0},
)
HIGH_PRECISION = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "e_score_correction_bias")
SHARD_BYTES = 2 << 30


def on_disk_shapes(state_shapes: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """The checkpoint's names: ``transformers`` 5 fuses each layer's experts (``experts.gate_up_proj``
    ``[E, 2I, D]``, ``experts.down_proj`` ``[E, D, I]``), DeepSeek's files (and ``save_pretrained``) keep one
    ``experts.<e>.{gate,up,down}_proj.weight`` per expert."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shape in state_shapes.items():
        if key.endswith("experts.gate_up_proj"):
            E, I2, D = shape
            for e in range(E):
                for proj in ("gate_proj", "up_proj"):
                    shapes[f"{key[:-len('gate_up_proj')]}{e}.{proj}.weight"] = (I2 // 2, D)
        elif key.endswith("experts.down_proj"):
            E, D, I = shape
            for e in range(E):
                shapes[f"{key[:-len('down_proj')]}{e}.down_proj.weight"] = (D, I)
        else:
            shapes[key] = tuple(shape)
    return shapes


def write_checkpoint(path: Path, vocab: int, experts: int) -> None:
    """Random weights (std 1/sqrt(fan-in)) under the names and shapes of ``transformers``' DeepseekV3 model
    (built on the meta device); sharded safetensors plus an index."""
    import transformers as tf

    config = tf.DeepseekV3Config(**(DEEPSEEK_V3 | {"vocab_size": vocab, "n_routed_experts": experts}))
    with torch.device("meta"):
        shapes = on_disk_shapes({k: p.shape for k, p in tf.DeepseekV3ForCausalLM(config).state_dict().items()})
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, shape in shapes.items():
        if key.endswith("e_score_correction_bias"):
            tensors = {key: torch.zeros(shape)}
        elif len(shape) == 1:
            tensors = {key: torch.ones(shape)}
        else:
            t = torch.randn(shape, generator=gen).mul_(shape[-1] ** -0.5)
            if any(p in key for p in HIGH_PRECISION):
                tensors = {key: t}
            else:
                q, scale = quantize_weight(t, "block")
                tensors = {key: q, key + "_scale_inv": scale}
        for k, t in tensors.items():
            shard[k] = t.contiguous()
            size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    hf = config.to_dict()
    hf["architectures"] = ["DeepseekV3ForCausalLM"]
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(hf, indent=1))


def timed_generate(llm: LLM, prompts: list[list[int]], output: int, tag: str) -> tuple[float, float, list]:
    """(prefill seconds, decode tok/s, outputs): steps until every sequence has a token, then the rest (a
    repeat's prompts hit the prefix cache, which changes only its prefill)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, params)
    start = time.perf_counter()
    finished: dict[str, list[int]] = {}
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        finished |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    prefill_s = time.perf_counter() - start
    start, decoded = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        decoded += len(engine.scheduler.running)
        finished |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    decode_s = time.perf_counter() - start
    return prefill_s, decoded / decode_s, [finished[f"{tag}{i}"] for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/deepseek_v3_shapes")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--experts", type=int, default=256, help="routed experts (fewer: a smoke run)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--output", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.dir)
    if not (path / "config.json").is_file():
        start = time.perf_counter()
        write_checkpoint(path, args.vocab, args.experts)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    llm = LLM(str(path), max_num_seqs=args.requests, max_model_len=args.prompt + args.output + 16,
              num_kv_blocks=args.requests * (-(-(args.prompt + args.output + 16) // 16)) + 8, block_size=16)
    print(f"loaded in {time.perf_counter() - start:.0f} s; backend {llm.engine.runner.attention.name}; "
          f"threads {args.threads}; load {os.getloadavg()[0]:.2f}")
    gen = torch.Generator().manual_seed(1)
    vocab = llm.engine.model.config.vocab_size
    prompts = [torch.randint(vocab, (args.prompt,), generator=gen).tolist() for _ in range(args.requests)]
    backend = llm.engine.runner.attention
    best: dict[str, float] = {}
    outputs: dict[str, list] = {}
    for r in range(args.repeats):
        for mode in ("absorbed", "naive"):
            backend.mla_absorb_decodes = mode == "absorbed"
            prefill_s, tok_s, out = timed_generate(llm, prompts, args.output, f"{mode}{r}-")
            best[mode] = max(best.get(mode, 0.0), tok_s)
            outputs.setdefault(mode, out)
            print(f"  {mode:8s} repeat {r}: decode {tok_s:6.2f} tok/s ({args.requests} sequences at "
                  f"{args.prompt}+ tokens), prefill {prefill_s:.1f} s; load {os.getloadavg()[0]:.2f}")
    same = sum(a == b for a, b in zip(outputs["absorbed"], outputs["naive"], strict=True))
    print(f"decode tok/s, best of {args.repeats}: absorbed {best['absorbed']:.2f}, naive {best['naive']:.2f}, "
          f"ratio {best['absorbed'] / best['naive']:.1f}x; outputs identical {same}/{args.requests}")


if __name__ == "__main__":
    main()
