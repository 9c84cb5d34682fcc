"""``Sampler``: next tokens for a batch of sequences from their logits, each with its own ``SamplingParams``.

Shape legend: B sequences sampled this step, V vocabulary. Filters apply in the order temperature -> top-k ->
top-p -> min-p. Random draws use the exponential-race form of categorical sampling (``argmax(p / q)``,
``q ~ Exp(1)``) so that a seeded request draws from its own generator, one row at a time, and gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.engine.sampling_params import SamplingParams
from serve.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per sequence: chosen token first, then the top-n tokens


class Sampler:
    """``Sampler(seed, device)(logits_BV, seqs) -> SampleResult``; ``seed`` drives requests that bring none.

    The draws happen where the logits are (``device``): a seeded request gets its own generator there on its
    first draw, kept on its sequence so that preemption and batching do not change its stream.
    """

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        if seq.generator is None:
            seq.generator = torch.Generator(self.device).manual_seed(seq.params.seed)
        return seq.generator

    def __call__(self, logits_BV: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        params = [s.params for s in seqs]
        logits_BV = logits_BV.float()
        tokens_B = logits_BV.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits_BV.device)
            probs_RV = filtered_probs(logits_BV[rows], [params[i] for i in sampled])
            q_RV = torch.empty_like(probs_RV)
            for r, i in enumerate(sampled):
                q_RV[r].exponential_(generator=self._generator(seqs[i]))
            tokens_B[rows] = (probs_RV / q_RV).argmax(dim=-1)
        token_ids = tokens_B.tolist()  # NOTE: host sync: stop checks and outputs need the tokens on the host
        return SampleResult(token_ids, _logprobs(logits_BV, tokens_B, params))


def filtered_probs(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p (filtered tokens get 0)."""
    B, V = logits_BV.shape
    device = logits_BV.device
    temps_B1 = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits_BV = logits_BV / temps_B1
    top_ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < V for k in top_ks) or any(p < 1 for p in top_ps):
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        keep_BV = torch.arange(V, device=device)[None, :] < torch.tensor(top_ks, device=device)[:, None]
        sorted_BV = sorted_BV.masked_fill(~keep_BV, float("-inf"))
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # drop a token when the more likely ones already reach top_p (the first token always stays)
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        keep_BV &= before_BV < torch.tensor(top_ps, device=device)[:, None]
        sorted_BV = sorted_BV.masked_fill(~keep_BV, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter_(1, order_BV, sorted_BV)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_ps = torch.tensor([p.min_p for p in params], device=device)
        cut_B1 = (min_ps * probs_BV.max(dim=-1).values).unsqueeze(1)
        probs_BV = probs_BV.masked_fill(probs_BV < cut_B1, 0.0)
    return probs_BV


def _logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, params: list[SamplingParams]) -> list:
    wanted = [p.logprobs for p in params]
    if all(n is None for n in wanted):
        return [None] * len(params)
    logp_BV = torch.log_softmax(logits_BV, dim=-1)
    chosen_B = logp_BV.gather(1, tokens_B[:, None]).squeeze(1).tolist()  # NOTE: host sync: logprobs, with the tokens
    top = max(n for n in wanted if n is not None)
    top_vals, top_ids = logp_BV.topk(top, dim=-1) if top else (logp_BV[:, :0], tokens_B[:, None][:, :0])
    out = []
    for i, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        entry = {int(tokens_B[i]): chosen_B[i]}
        # NOTE: host sync (the top logprobs of requests that ask for them; the tokens' sync came first)
        for tok, val in zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), strict=True):
            entry.setdefault(tok, val)
        out.append(entry)
    return out
