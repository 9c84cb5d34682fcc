"""The two models of :mod:`benchmarks.peers.llamacpp_bench`, as checkpoints for ours and GGUF (f32) for llama.cpp.

    ~/peers/llamacpp/venv/bin/python benchmarks/peers/llamacpp_convert.py [OUT]    default OUT: ~/peers/llamacpp/models

Run by the peer's own Python (it has torch, transformers and the vendored ``gguf``). Writes into ``OUT``:

- ``default.gguf``: ``serve/default_model`` (``Qwen3MoeForCausalLM``, which llama.cpp knows as ``qwen3moe``);
- ``mixtral/``: a random ``MixtralForCausalLM`` (seed 0; 4 layers, hidden 1024, 16 heads / 4 KV heads, 8 experts
  of 1536 top-2, untied head) with the default model's tokenizer, and ``mixtral.gguf``, its conversion.

Both through the vendored llama.cpp's own ``convert_hf_to_gguf.py`` with ``--outtype f32``. One patch: that
converter identifies a BPE tokenizer's pre-tokenizer by hashing how it splits a test text, and refuses one it does
not know, which the default model's own byte-level BPE (trained in ``serve/default_model/train.py``) is. It splits
with the plain ``ByteLevel`` (GPT-2) regex, so an unknown hash falls back to ``gpt-2``. The benchmark feeds token
ids only, so this metadata never touches what is measured or compared. Imports nothing of ours.
"""

import shutil
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "serve" / "default_model"
LLAMA_CPP = Path(sys.prefix).parent / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"


def make_mixtral(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=4096, hidden_size=1024, intermediate_size=1536, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           bos_token_id=None, eos_token_id=[2, 0], pad_token_id=2)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, out / name)


def convert(model_dir: Path, outfile: Path) -> None:
    sys.path.insert(0, str(LLAMA_CPP))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre
    if not getattr(known, "falls_back", False):
        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return known(self, tokenizer)
            except NotImplementedError:
                return "gpt-2"  # our byte-level BPE splits with GPT-2's regex; ids only are benchmarked
        get_vocab_base_pre.falls_back = True
        TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", "f32", "--outfile", str(outfile)]
    convert_hf_to_gguf.main()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.home() / "peers/llamacpp/models"
    out.mkdir(parents=True, exist_ok=True)
    convert(DEFAULT_MODEL, out / "default.gguf")
    if not any((out / "mixtral").glob("*.safetensors")):
        make_mixtral(out / "mixtral")
    convert(out / "mixtral", out / "mixtral.gguf")
    print(f"wrote {out / 'default.gguf'}, {out / 'mixtral'}, {out / 'mixtral.gguf'}")


if __name__ == "__main__":
    main()
