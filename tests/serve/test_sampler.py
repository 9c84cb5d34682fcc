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


# -- tiny temperatures, underflowing top_p, zero exponential draws ------------------------------------------------
def test_tiny_temperature_is_greedy():
    logits = torch.randn(6, 40) * 50  # / 1e-6 would overflow float32 to inf and softmax to NaN
    params = [SamplingParams(temperature=t) for t in (1e-6, 9.9e-6, 1e-30, 5e-324, 1e-7, 0.0)]
    assert all(p.greedy for p in params) and not SamplingParams(temperature=1e-5).greedy
    assert Sampler(seed=3)(logits, _seqs(*params)).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 5e-324])
def test_top_p_that_underflows_samples_the_top_token(top_p):
    logits = torch.randn(50, 64)
    out = Sampler(seed=1)(logits, _seqs(*[SamplingParams(temperature=1.0, top_p=top_p)] * 50))
    assert out.token_ids == logits.argmax(-1).tolist()  # not an all -inf row (NaN, token 0 or <|endoftext|>)


def test_a_zero_exponential_draw_never_picks_a_filtered_token():
    from serve.engine.sampler import race

    probs = torch.tensor([[0.0, 0.7, 0.3, 0.0]])
    q = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # exactly 0 where p is 0: 0 / 0 = NaN would win the argmax
    assert race(probs, q).tolist() == [1]


# -- penalties and logit_bias against a dumb per-token loop ---------------------------------------------------------
def _reference(logits_V: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p, out = seq.params, seq.output_token_ids
    x = logits_V.clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(seq.token_ids):
        if p.repetition_penalty != 1:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return x


def test_penalties_and_logit_bias_match_a_per_token_loop():
    from serve.engine.sampler import adjusted_logits

    V = 37
    cases = [SamplingParams(), SamplingParams(frequency_penalty=0.7), SamplingParams(presence_penalty=-1.3),
             SamplingParams(repetition_penalty=1.8), SamplingParams(repetition_penalty=0.6, frequency_penalty=2.0,
                                                                    presence_penalty=1.0, logit_bias={3: 5.0}),
             SamplingParams(logit_bias={0: -250.0, 36: 100.0, 5: 0.5})]
    seqs = []
    for i, p in enumerate(cases):
        seq = Sequence(str(i), [1, 2, 2, 30 + i][: 1 + i % 4], p, i)
        seq.token_ids += [2, 7, 7, 7, 36, 1][: (3 * i) % 7]
        seqs.append(seq)
    logits = torch.randn(len(cases), V) * 3
    got = adjusted_logits(logits, seqs)
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(got[i], _reference(logits[i], seq), rtol=1e-6, atol=1e-6)
    assert cases[-1].logit_bias[0] == -100.0  # clamped to OpenAI's range
    assert adjusted_logits(logits, _seqs(SamplingParams())) is logits  # nothing asked: no copy, no work


def test_logit_bias_steers_greedy_and_logprobs_stay_the_models():
    logits = torch.randn(2, 20)
    forced = SamplingParams(temperature=0, logit_bias={11: 100.0}, logprobs=1)
    out = Sampler()(logits, _seqs(forced, SamplingParams(temperature=0)))
    assert out.token_ids == [11, int(logits[1].argmax())]
    assert out.logprobs[0][11] == pytest.approx(float(torch.log_softmax(logits[0], -1)[11]), abs=1e-6)


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("repetition_penalty", float("inf")), ("logit_bias", {-1: 1.0}), ("logit_bias", {1: float("nan")}),
])
def test_invalid_penalties_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
