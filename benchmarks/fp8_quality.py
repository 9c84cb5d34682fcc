"""FP8 experts on the embedded default model: greedy agreement and perplexity against fp32, layer errors, bytes.

    python benchmarks/fp8_quality.py                  # the held-out text of tests/test_fp8_quality.py
    python benchmarks/fp8_quality.py --text notes.txt --triton

For each scheme (``fp8-channel``, ``fp8-block``) the default model is loaded with ``quantization=`` (quantised
while loading) and compared with the fp32 model over one text, teacher-forced:

- **agreement**: share of positions where the FP8 model's argmax next token equals the fp32 model's;
- **perplexity**: ``exp(mean cross-entropy)`` of the text under each model;
- **layer error**: ``|y_fp8 - y_fp32| / |y_fp32|`` of every MoE layer on the fp32 model's own inputs to it
  (CPU path: e4m3 weights, fp32 activations; ``--triton`` adds the Triton FP8 kernels, activations in e4m3 with
  1x128 scales, run by Triton's interpreter on a CPU);
- **bytes**: FP8 expert bytes (e4m3 weights + fp32 scales) / the same experts in bf16, measured on the tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import rel_err  # noqa: E402
from moe import MoE  # noqa: E402
from serve.engine.config import DEFAULT_MODEL  # noqa: E402
from serve.models.loader import load_model  # noqa: E402
from serve.models.layers import DenseCausalBackend  # noqa: E402
from serve.engine.tokenizer import Tokenizer  # noqa: E402

SCHEMES = ("fp8-channel", "fp8-block")


def next_token_logits(model, ids_S: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``[S, V]`` of one sequence."""
    with torch.no_grad():
        S = ids_S.numel()
        return model.logits(model(ids_S, torch.arange(S), DenseCausalBackend(1, S)))


def agreement_and_perplexity(reference, model, ids_S: torch.Tensor) -> tuple[float, float, float]:
    """``(greedy agreement, perplexity of reference, perplexity of model)`` over ``ids_S``."""
    ref, got = next_token_logits(reference, ids_S)[:-1], next_token_logits(model, ids_S)[:-1]
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    target = ids_S[1:]
    return agreement, F.cross_entropy(ref, target).exp().item(), F.cross_entropy(got, target).exp().item()


def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def layer_errors(reference, model, ids_S: torch.Tensor) -> list[float]:
    """Relative error of each MoE layer of ``model`` against the same layer of ``reference``, both fed the
    inputs that layer sees in ``reference``."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for m in moe_layers(reference)]
    next_token_logits(reference, ids_S)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        return [rel_err(q(x), r(x)) for r, q, x in zip(moe_layers(reference), moe_layers(model), inputs)]


def expert_bytes_ratio(reference, model) -> float:
    """FP8 expert bytes (values, scales, biases) over the bf16 bytes of the same experts' tensors."""
    fp8 = sum(m.experts.weight_bytes() for m in moe_layers(model))
    bf16 = sum(p.to(torch.bfloat16).nbytes for m in moe_layers(reference) for p in m.experts.parameters())
    return fp8 / bf16


def with_triton(model):
    """The same model with its MoE layers on the Triton backend (FP8 kernels; the interpreter on a CPU)."""
    from moe.config import Backend

    for m in moe_layers(model):
        m.backend = Backend.TRITON
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--text", type=Path, help="held-out text file (default: the one tests/test_fp8_quality.py fixes)")
    ap.add_argument("--triton", action="store_true", help="also the Triton FP8 kernels (slow on a CPU: interpreted)")
    args = ap.parse_args(argv)
    if args.triton and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    if args.text is None:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from test_fp8_quality import HELD_OUT_TEXT as text
    else:
        text = args.text.read_text()
    torch.set_num_threads(1)
    ids_S = torch.tensor(Tokenizer(args.model).encode(text))
    reference = load_model(args.model)
    print(f"{args.model}: {ids_S.numel()} tokens of held-out text; targets: agreement >= 95%, perplexity within 2%")
    print(f"{'scheme':<20} {'agreement':>9} {'ppl fp32':>9} {'ppl fp8':>9} {'ppl ratio':>9} {'bytes/bf16':>10}  "
          "layer errors")
    runs = [(s, load_model(args.model, quantization=s)) for s in SCHEMES]
    if args.triton:
        runs += [(f"{s} triton", with_triton(load_model(args.model, quantization=s))) for s in SCHEMES]
    for name, model in runs:
        agreement, ppl32, ppl8 = agreement_and_perplexity(reference, model, ids_S)
        errors = " ".join(f"{e:.1e}" for e in layer_errors(reference, model, ids_S))
        print(f"{name:<20} {agreement:9.2%} {ppl32:9.3f} {ppl8:9.3f} {ppl8 / ppl32:9.4f} "
              f"{expert_bytes_ratio(reference, model):9.3f}x  {errors}")


if __name__ == "__main__":
    main()
