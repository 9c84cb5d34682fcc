"""``Sampler``: next tokens for a batch of sequences from their logits, each with its own ``SamplingParams``.

Shape legend: B sequences sampled this step, R of them (the rows that need a step), L tokens of the longest, V
vocabulary. Logits are adjusted first (``logit_bias``, then repetition, frequency and presence penalties, vectorised
over the batch: token counts by one ``scatter_add`` over padded id rows), then filters apply in the order
temperature -> top-k -> top-p -> min-p. Random draws use the exponential-race form of categorical sampling
(``argmax(p / q)``, ``q ~ Exp(1)``) so that a seeded request draws from its own generator, one row at a time,
and gets the same tokens whatever else shares its batch. Sequences with a ``json_schema`` have the tokens their
grammar forbids masked out (before everything else, in one batched op: ``serve.engine.structured``) and their
grammar advanced with the drawn token; the others cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.engine.greedy import greedy_tokens
from serve.engine.sampling_params import SamplingParams
from serve.engine.sequence import Sequence
from serve.engine.structured import GrammarMasker, advance


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
        self.masker: GrammarMasker | None = None  # made on the first constrained step

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        if seq.generator is None:
            seq.generator = torch.Generator(self.device).manual_seed(seq.params.seed)
        return seq.generator

    def __call__(self, logits_BV: torch.Tensor, seqs: list[Sequence], greedy_B: torch.Tensor | None = None
                 ) -> SampleResult:
        """``greedy_B``: each row's argmax where the forward pass computed it already (the fused C decode)."""
        params = [s.params for s in seqs]
        if all(p.plain_greedy for p in params) and all(s.matcher is None for s in seqs):
            # the fast path: nothing to adjust, filter, draw or report, just each row's best token
            # NOTE: host sync: none in fact (the fused CPU step's host argmax), the tokens the outputs need
            tokens = greedy_tokens(logits_BV.float()) if greedy_B is None else greedy_B.tolist()
            return SampleResult(tokens, [None] * len(seqs))
        raw_BV = logits_BV.float()
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:  # logprobs then come from the allowed tokens' distribution, as vLLM's do
            self.masker = self.masker or GrammarMasker()
            raw_BV = self.masker(raw_BV, constrained, [seqs[i].matcher for i in constrained])
        logits_BV = adjusted_logits(raw_BV, seqs)
        tokens_B = logits_BV.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits_BV.device)
            probs_RV = filtered_probs(logits_BV[rows], [params[i] for i in sampled])
            q_RV = torch.empty_like(probs_RV)
            for r, i in enumerate(sampled):
                q_RV[r].exponential_(generator=self._generator(seqs[i]))
            tokens_B[rows] = race(probs_RV, q_RV)
        token_ids = tokens_B.tolist()  # NOTE: host sync: stop checks and outputs need the tokens on the host
        if constrained:
            advance([seqs[i].matcher for i in constrained], [token_ids[i] for i in constrained])
        return SampleResult(token_ids, _logprobs(raw_BV, tokens_B, params))


def race(probs_RV: torch.Tensor, q_RV: torch.Tensor) -> torch.Tensor:
    """``argmax(p / q)``: a draw from ``p`` for ``q ~ Exp(1)``. A ``q`` of exactly 0 (a float draw can be) would
    make ``0 / 0 = NaN`` win the argmax on a filtered-out token, so ``q`` is kept above the smallest normal."""
    return (probs_RV / q_RV.clamp_min(torch.finfo(q_RV.dtype).tiny)).argmax(dim=-1)


def token_counts(rows: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """``[R, V]`` float counts of each token id in each row (rows padded with id ``V``, dropped after).

    >>> token_counts([[2, 2, 0], []], 3, torch.device("cpu"))
    tensor([[1., 0., 2.],
            [0., 0., 0.]])
    """
    L = max(1, max(len(r) for r in rows))
    ids_RL = torch.tensor([r + [V] * (L - len(r)) for r in rows], dtype=torch.int64, device=device)
    counts_RV = torch.zeros(len(rows), V + 1, device=device)
    return counts_RV.scatter_add_(1, ids_RL, torch.ones(ids_RL.shape, device=device))[:, :V]


def adjusted_logits(logits_BV: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """``logit_bias``, then vLLM's repetition penalty (prompt + output), then OpenAI's frequency and presence
    penalties (output only). Returns ``logits_BV`` itself when no sequence asks for any of them."""
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    penalised = [i for i, s in enumerate(seqs) if s.params.penalised]
    if not biased and not penalised:
        return logits_BV
    B, V = logits_BV.shape
    device = logits_BV.device
    logits_BV = logits_BV.clone()
    if biased:
        entries = [(i, t, v) for i in biased for t, v in seqs[i].params.logit_bias.items() if t < V]
        if entries:
            rows, cols, values = zip(*entries, strict=True)
            logits_BV.index_put_((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                                 torch.tensor(values, device=device), accumulate=True)
    if penalised:
        params = [seqs[i].params for i in penalised]
        rows_R = torch.tensor(penalised, device=device)
        x_RV = logits_BV[rows_R]
        out_RV = token_counts([seqs[i].output_token_ids for i in penalised], V, device)
        if any(p.repetition_penalty != 1 for p in params):
            rep_R1 = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
            seen_RV = (out_RV + token_counts([seqs[i].prompt_token_ids for i in penalised], V, device)) > 0
            x_RV = torch.where(seen_RV, torch.where(x_RV > 0, x_RV / rep_R1, x_RV * rep_R1), x_RV)
        freq_R1 = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        pres_R1 = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        logits_BV[rows_R] = x_RV - freq_R1 * out_RV - pres_R1 * (out_RV > 0)
    return logits_BV


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
        keep_BV[:, 0] = True  # a top_p that underflows to 0 in float32 (1e-300) still keeps the top token
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
