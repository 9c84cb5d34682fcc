"""The greedy kernel picks what torch.argmax picks: first of equal maxima, first NaN, all -inf rows."""

import pytest
import torch

from serve.engine import greedy
from serve.engine.sampler import Sampler
from serve.engine.sampling_params import SamplingParams
from serve.engine.sequence import Sequence


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 8), (33, 4099), (2, 151936)])
def test_matches_torch_argmax_with_ties(shape):
    torch.manual_seed(shape[1])
    x = torch.randn(shape)
    x[0, shape[1] // 2] = x[0].max()  # a tie with an earlier maximum
    x[-1, -1] = x[-1].max() + 1  # the maximum in the scalar tail
    assert greedy._library() is not None
    assert greedy.greedy_tokens(x) == x.argmax(-1).tolist()


def test_nan_inf_and_strided_rows():
    x = torch.randn(5, 100)
    x[1, 50], x[1, 70] = float("nan"), float("nan")
    x[2] = float("-inf")
    x[3, 3:9] = float("inf")
    x[4, 97] = float("nan")  # in the tail of the last vector
    assert greedy.greedy_tokens(x) == x.argmax(-1).tolist() == [x[0].argmax().item(), 50, 0, 3, 97]
    wide = torch.randn(4, 300)
    view = wide[:, 10:210]  # rows 300 floats apart
    assert greedy.greedy_tokens(view) == view.argmax(-1).tolist()


def test_sampler_fast_path_only_for_plain_greedy():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    plain = [Sequence(f"s{i}", [1, 2], SamplingParams(temperature=0.0), i) for i in range(3)]
    result = Sampler()(logits, plain)
    assert result.token_ids == logits.argmax(-1).tolist() and result.logprobs == [None] * 3
    # a logit bias must still move the choice: it is not the plain path
    target = int(logits[1].argmin())
    biased = [*plain[:1], Sequence("b", [1, 2], SamplingParams(temperature=0.0, logit_bias={target: 100.0}), 9),
              plain[2]]
    assert Sampler()(logits, biased).token_ids[1] == target
    assert not SamplingParams(temperature=0.0, logprobs=1).plain_greedy
    assert not SamplingParams(temperature=0.7).plain_greedy
