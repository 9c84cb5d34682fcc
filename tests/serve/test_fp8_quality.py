"""FP8 experts keep the embedded default model's quality: over a fixed held-out English text, greedy next-token
agreement with the fp32 model >= 95% and perplexity within 2% of fp32, for both schemes (quantised while
loading); each MoE layer's error against its fp32 layer and the expert bytes against bf16 are measured too.
``python benchmarks/fp8_quality.py`` prints the same figures."""

from __future__ import annotations

import pytest
import torch

from benchmarks.fp8_quality import agreement_and_perplexity, expert_bytes_ratio, layer_errors
from serve.engine.config import DEFAULT_MODEL
from serve.models.loader import load_model
from serve.engine.tokenizer import Tokenizer

# Written for this test: English prose, no code. The default model was trained on the Python standard
# library's source (serve/default_model/train.py), so this text is held out (and hard for it: perplexity is
# in the hundreds, which makes greedy agreement a strict test of small logit changes).
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

SCHEMES = ("fp8-channel", "fp8-block")


@pytest.fixture(scope="module")
def ids_S():
    ids = Tokenizer(DEFAULT_MODEL).encode(HELD_OUT_TEXT)
    assert len(ids) > 500
    return torch.tensor(ids)


@pytest.fixture(scope="module")
def fp32_model():
    return load_model(DEFAULT_MODEL)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_greedy_agreement_and_perplexity(fp32_model, ids_S, scheme):
    model = load_model(DEFAULT_MODEL, quantization=scheme)
    agreement, ppl32, ppl8 = agreement_and_perplexity(fp32_model, model, ids_S)
    print(f"\n{scheme}: agreement {agreement:.2%}, perplexity fp32 {ppl32:.3f} fp8 {ppl8:.3f} ({ppl8 / ppl32:.4f}x)")
    assert agreement >= 0.95
    assert abs(ppl8 / ppl32 - 1) <= 0.02


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layer_error_and_expert_bytes(fp32_model, ids_S, scheme):
    model = load_model(DEFAULT_MODEL, quantization=scheme)
    errors = layer_errors(fp32_model, model, ids_S)
    ratio = expert_bytes_ratio(fp32_model, model)
    print(f"\n{scheme}: layer errors vs fp32 {', '.join(f'{e:.2e}' for e in errors)}; expert bytes {ratio:.4f}x bf16")
    assert len(errors) == fp32_model.config.num_layers and all(0 < e < 0.05 for e in errors)
    assert ratio <= 0.52
