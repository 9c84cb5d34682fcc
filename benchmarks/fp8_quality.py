"""FP8 experts on the embedded default model: greedy agreement and perplexity against fp32, layer errors, bytes.

    python -m benchmarks.fp8_quality                  # HELD_OUT_TEXT, the text tests/serve/test_fp8_quality.py uses
    python -m benchmarks.fp8_quality --text notes.txt --triton

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
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import rel_err
from moe import MoE
from serve.engine.config import DEFAULT_MODEL
from serve.engine.tokenizer import Tokenizer
from serve.models.layers import DenseCausalAttention
from serve.models.loader import load_model

SCHEMES = ("fp8-channel", "fp8-block")

# English prose, no code, shared with tests/serve/test_fp8_quality.py. The default model was trained on the Python
# standard library's source (serve/default_model/train.py), so this text is held out (and hard for it: perplexity
# is in the hundreds, which makes greedy agreement a strict test of small logit changes).
HELD_OUT_TEXT = """\
The lighthouse keeper rose before dawn, as he had done every morning for thirty years. He climbed the spiral
stairs, counted the steps out of habit, and trimmed the wick of the great lamp. Outside, the sea was grey and
restless, and a thin line of gulls drifted along the edge of the cliffs. When the fishing boats came back in
the afternoon, their crews would tell him about the weather further out, and he would write it all down in a
logbook that his predecessor had started long before the war. Nobody had asked him to keep the log, but he
believed that a record of small things, kept patiently, might one day explain something large.

In the village below, the baker opened her shop at six. She sold bread, a few cakes on Sundays, and a strong
coffee that the schoolteacher claimed was the only reason he had stayed. The schoolteacher had arrived from the
city with two suitcases and a bicycle, intending to remain for a single winter. That had been eleven winters
ago. He taught arithmetic, geography and a little music to nineteen children, and in the evenings he repaired
old clocks that people brought him from the farms in the valley.

Every spring the river flooded the lower meadows. The farmers moved their sheep to higher ground, the ferry
stopped running for a week or two, and the children were delighted to find that the road to the school had
become a shallow lake. The mayor promised every year that a new bridge would be built, and every year the
council found a reason to spend the money on something else: a roof for the church, a new engine for the fire
brigade, a party for the hundredth birthday of the oldest woman in the district.

Travellers rarely stopped in the village. Those who did usually wanted directions, a glass of water, or a
place to wait while a tyre was mended. One summer, however, a young scientist came to study the birds that
nested on the cliffs. She rented a room above the post office, walked out to the headland every morning with a
notebook and a pair of binoculars, and returned at dusk with her boots full of sand. She counted eggs, measured
wings, and listened for hours to the calls of the colony. By the end of the season she knew more about the
gulls than anyone who had lived beside them for a lifetime, and she was generous with what she had learned.

On her last evening she climbed the lighthouse to say goodbye. The keeper showed her the logbook, and she read
it slowly, page after page, while the lamp turned above them. Near the back she found a column of numbers that
she recognised at once: the dates on which the first gulls had returned each spring. The entries went back
almost sixty years. Laid side by side, they showed the birds arriving a little earlier every decade. Neither of
them said very much. She copied the column carefully into her own notebook, thanked him, and promised to write.

The letter came in the autumn, along with a printed article that mentioned the lighthouse by name. The keeper
read it twice, folded it into the logbook, and went up the stairs to light the lamp.
"""


def next_token_logits(model, ids_S: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``[S, V]`` of one sequence."""
    with torch.no_grad():
        S = ids_S.numel()
        return model.logits(model(ids_S, torch.arange(S), DenseCausalAttention(1, S)))


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
        return [rel_err(q(x), r(x)) for r, q, x in zip(moe_layers(reference), moe_layers(model), inputs, strict=True)]


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
    ap.add_argument("--text", type=Path, help="held-out text file (default: HELD_OUT_TEXT, the test's)")
    ap.add_argument("--triton", action="store_true", help="also the Triton FP8 kernels (slow on a CPU: interpreted)")
    args = ap.parse_args(argv)
    if args.triton and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    text = HELD_OUT_TEXT if args.text is None else args.text.read_text()
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
