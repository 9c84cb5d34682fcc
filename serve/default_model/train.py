"""Train the embedded default model: a tiny Qwen3-MoE-format decoder on the Python standard library's source.

    python -m serve.default_model.train            # ~12 minutes on one core; writes next to this file

Everything is deterministic for a given Python installation: the corpus is every ``.py`` file of the running
interpreter's standard library (tests excluded) plus chat-formatted "docstring -> function" pairs, the tokenizer
is a byte-level BPE trained with ``tokenizers``, the model is ``serve.models.MoEDecoder`` (``moe.MoE`` blocks)
trained with AdamW and a Switch-style load-balancing loss, and the result is saved in Hugging Face format
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` with a ChatML template).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one core, before its thread pool starts

import argparse
import ast
import json
import math
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from serve.models import ARCHITECTURES, DecoderConfig, MoEDecoder, QKNorm
from serve.models.layers import DenseCausalAttention
from serve.models.loader import save_safetensors

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SKIP_DIRS = {"test", "tests", "site-packages", "idle_test", "__pycache__"}


@dataclass
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    ffn_size: int = 128
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    warmup: int = 50
    lr: float = 3e-3
    aux_loss: float = 0.01
    corpus_mb: float = 24.0
    tokenizer_mb: float = 6.0  # BPE merges learnt on the first docs; the whole corpus is encoded
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name not in ("lr", "aux_loss", "corpus_mb", "tokenizer_mb", "seed") and value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))


def chat_pairs(source: str) -> list[str]:
    """ChatML "describe -> implement" samples from the module's documented functions."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
            code = ast.get_source_segment(source, node)
            summary = ast.get_docstring(node).strip().splitlines()[0]
            if code and 60 < len(code) < 1500:
                out.append(f"<|im_start|>user\nWrite a Python function `{node.name}`: {summary}<|im_end|>\n"
                           f"<|im_start|>assistant\n{code}<|im_end|>\n")
    return out


def corpus(limit_bytes: int, seed: int) -> list[str]:
    docs, total = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="ignore")
        docs.append(text)
        docs += chat_pairs(text)
        total += len(text)
        if total >= limit_bytes:
            break
    random.Random(seed).shuffle(docs)
    return docs


def train_tokenizer(docs: list[str], vocab_size: int, limit_bytes: int) -> Tokenizer:
    sample, total = [], 0
    for doc in docs:
        if total >= limit_bytes:
            break
        sample.append(doc)
        total += len(doc)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer)
    return tok


def model_config(cfg: TrainConfig, eos: list[int]) -> DecoderConfig:
    return DecoderConfig(
        architecture="Qwen3MoeForCausalLM", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=2048, num_experts=cfg.num_experts,
        top_k=cfg.top_k, moe_ffn_size=cfg.ffn_size, norm_topk_prob=True, qk_norm=QKNorm.HEAD,
        tie_word_embeddings=True, eos_token_ids=tuple(eos), rms_norm_eps=1e-6, rope_theta=10000.0,
    )


def hf_config(mc: DecoderConfig) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": mc.vocab_size,
        "hidden_size": mc.hidden_size, "num_hidden_layers": mc.num_layers, "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "hidden_act": "silu",
        "max_position_embeddings": mc.max_position_embeddings, "rms_norm_eps": mc.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta}, "attention_bias": False,
        "num_experts": mc.num_experts, "num_experts_per_tok": mc.top_k, "moe_intermediate_size": mc.moe_ffn_size,
        "intermediate_size": mc.moe_ffn_size, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": mc.norm_topk_prob, "tie_word_embeddings": True, "use_sliding_window": False,
        "sliding_window": None, "bos_token_id": None, "eos_token_id": list(mc.eos_token_ids),
        "pad_token_id": mc.eos_token_ids[0], "dtype": "float32",
    }


def balance_loss(routers: list, E: int) -> torch.Tensor:
    """Switch Transformer's ``E * sum_e f_e * P_e`` averaged over layers (f: routed share, P: mean prob)."""
    losses = []
    for routing in routers:
        probs_TE = torch.softmax(routing.logits_TE, dim=-1)
        share_E = torch.zeros(E).scatter_add_(0, routing.ids_TK.reshape(-1).long(),
                                              torch.ones(routing.ids_TK.numel())) / routing.ids_TK.numel()
        losses.append(E * (share_E * probs_TE.mean(0)).sum())
    return torch.stack(losses).mean()


def train(cfg: TrainConfig, ids: torch.Tensor, model: MoEDecoder) -> None:
    captured: list = []
    for layer in model.layers:
        layer.mlp.router.register_forward_hook(lambda _m, _i, out: captured.append(out))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    B, S = cfg.batch_size, cfg.seq_len
    positions = torch.arange(S).repeat(B)
    start = time.perf_counter()
    for step in range(cfg.steps):
        warm = min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        offsets = torch.randint(0, len(ids) - S - 1, (B,), generator=gen)
        window = torch.stack([ids[o:o + S + 1] for o in offsets.tolist()]).long()
        captured.clear()
        hidden = model(window[:, :-1].reshape(-1), positions, DenseCausalAttention(B, S))
        lm = F.cross_entropy(model.logits(hidden), window[:, 1:].reshape(-1))
        loss = lm + cfg.aux_loss * balance_loss(captured, cfg.num_experts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            print(f"step {step:5d}  lm loss {lm.item():.3f}  {time.perf_counter() - start:7.1f}s", flush=True)


def save(out: Path, model: MoEDecoder, tok: Tokenizer, dtype: torch.dtype) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mc = model.config
    (out / "config.json").write_text(json.dumps(hf_config(mc), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": list(mc.eos_token_ids)}) + "\n")
    save_safetensors(model, ARCHITECTURES["Qwen3MoeForCausalLM"], out, dtype=dtype)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
               "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
               "model_max_length": mc.max_position_embeddings}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    docs = corpus(int(cfg.corpus_mb * 2**20), cfg.seed)
    tok = train_tokenizer(docs, cfg.vocab_size, int(cfg.tokenizer_mb * 2**20))
    eot = tok.token_to_id("<|endoftext|>")
    ids = [i for enc in tok.encode_batch(docs) for i in enc.ids + [eot]]
    print(f"corpus: {len(docs)} docs, {len(ids) / 1e6:.1f}M tokens, tokenizer in {time.perf_counter() - t0:.0f}s")
    model = MoEDecoder(model_config(cfg, [tok.token_to_id("<|im_end|>"), eot]))
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02 if "embed" in name else p.shape[-1] ** -0.5)
    train(cfg, torch.tensor(ids, dtype=torch.int32), model)
    numel = sum(p.numel() for p in model.parameters())
    dtype = torch.float32 if numel * 4 <= 9.5e6 else torch.bfloat16
    save(args.out, model.eval(), tok, dtype)
    print(f"saved {numel / 1e6:.2f}M parameters ({dtype}) to {args.out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
