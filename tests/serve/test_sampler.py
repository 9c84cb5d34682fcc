"""Sampler: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs."""

from __future__ import annotations

import pytest
import torch

from serve.engine.sampler import Sampler, filtered_probs
from serve.engine.sampling_params import SamplingParams
from serve.engine.sequence import Sequence

PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])


def _seqs(*params: SamplingParams) -> list[Sequence]:
    return [Sequence(str(i), [0], p, i) for i, p in enumerate(params)]


def _draws(params: SamplingParams, n: int = 400) -> torch.Tensor:
    logits = PROBS.log().expand(n, -1).clone()
    seqs = _seqs(*[params] * n)
    return torch.tensor(Sampler(seed=1)(logits, seqs).token_ids)


def test_greedy_is_argmax():
    logits = torch.randn(5, 33)
    out = Sampler()(logits, _seqs(*[SamplingParams(temperature=0)] * 5))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_temperature_one_follows_the_distribution():
    counts = torch.bincount(_draws(SamplingParams(temperature=1.0), n=4000), minlength=6).float() / 4000
    torch.testing.assert_close(counts, PROBS, atol=0.03, rtol=0)


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_p=0.5), {0, 1}),  # 0.40 < 0.5, so token 1 is needed to reach it
    (SamplingParams(top_p=0.3), {0}),
    (SamplingParams(min_p=0.5), {0, 1}),  # 0.15 < 0.5 * 0.40
    (SamplingParams(top_k=4, top_p=0.9, min_p=0.3), {0, 1, 2}),
])
def test_filters_only_draw_allowed_tokens(params, allowed):
    drawn = set(_draws(params).tolist())
    assert drawn == allowed


def test_filtered_probs_renormalise():
    probs = filtered_probs(PROBS.log()[None], [SamplingParams(top_k=3)])[0]
    torch.testing.assert_close(probs, torch.cat([PROBS[:3] / PROBS[:3].sum(), torch.zeros(3)]))


def test_seed_reproducible_whatever_the_batch():
    logits = torch.randn(1, 50)
    seeded = SamplingParams(temperature=1.0, seed=123)
    in_batch = _seqs(seeded, SamplingParams(temperature=1.0), SamplingParams(temperature=0.0))
    alone = _seqs(seeded)
    sampler_a, sampler_b = Sampler(seed=5), Sampler(seed=9)  # different engine seeds: irrelevant when seeded
    draws_a = [sampler_a(logits.repeat(3, 1), in_batch).token_ids[0] for _ in range(20)]
    draws_b = [sampler_b(logits, alone).token_ids[0] for _ in range(20)]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 1  # the request's generator advances from step to step


def test_logprobs_of_chosen_and_top_tokens():
    logits = torch.randn(2, 20)
    out = Sampler()(logits, _seqs(SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)))
    expected = torch.log_softmax(logits[0], -1)
    entry = out.logprobs[0]
    assert out.logprobs[1] is None
    assert list(entry)[0] == out.token_ids[0] and len(entry) == 3  # greedy: the chosen token is the top one
    top = expected.topk(3)
    for tok, val in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        assert entry[tok] == pytest.approx(val, abs=1e-6)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0), ("logprobs", -1),
])
def test_invalid_params_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"{field} \({value!r}\)"):
        SamplingParams(**{field: value})
