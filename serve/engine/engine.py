"""``LLMEngine`` (``add_request`` / ``step`` / ``abort``, for the server) and the offline ``LLM``.

One ``step()``: schedule (decodes first, chunked prefills under the token budget) -> one forward pass over the
paged KV cache -> sample -> append tokens, check stops, retire finished sequences and free their blocks. With
overlapped steps (``async_scheduling``: :mod:`serve.engine.overlap`) the next step is scheduled and laid out
before this one's tokens are sampled, and launched before its stops are checked.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from moe.kernels.cpu_gemm import block_gemm_available, skinny_gemm_available
from serve.engine import greedy
from serve.engine.block_manager import BlockManager
from serve.engine.config import EngineConfig
from serve.engine.device import kv_cache_blocks, resolve_device
from serve.engine.model_runner import ModelRunner, pending_token
from serve.engine.outputs import RequestOutput, RequestTimes
from serve.engine.overlap import LaunchedStep, PlannedStep
from serve.engine.sampler import Sampler, SampleResult
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import Scheduler
from serve.engine.sequence import Sequence
from serve.engine.stopping import StopChecker
from serve.engine.structured import GrammarCompiler
from serve.engine.tokenizer import Tokenizer
from serve.models.attention import kv_cache_class
from serve.models.config import DecoderConfig
from serve.models.cpu_attention import paged_decode_available
from serve.models.loader import load_model


@dataclass
class StepStats:
    """Wall time of the engine's phases, summed over steps (seconds), and token counts."""

    steps: int = 0
    schedule_s: float = 0.0
    prepare_s: float = 0.0
    model_s: float = 0.0
    sample_s: float = 0.0
    postprocess_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_s(self) -> float:
        return self.schedule_s + self.prepare_s + self.model_s + self.sample_s + self.postprocess_s

    @property
    def overhead_s(self) -> float:
        """Host-side bookkeeping around the forward pass: scheduling, input layout, stop checks."""
        return self.schedule_s + self.prepare_s + self.postprocess_s


@dataclass(frozen=True)
class EngineCounters:
    """The engine's state after a step, for metrics: queue lengths and KV blocks now; prefix-cache tokens,
    preemptions, steps and step tokens (prompt tokens computed + tokens sampled) as running totals."""

    running: int
    waiting: int
    num_blocks: int
    free_blocks: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    preemptions: int
    steps: int
    step_tokens: int


class LLMEngine:
    """Serves one model. ``add_request`` validates (``ValueError`` naming the field and value) before anything
    changes, so a bad request never disturbs the others."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model = load_model(config.model, config.torch_dtype, config.hypermoe, config.quantization, self.device)
        mc = self.model.config
        self.tokenizer = Tokenizer(config.tokenizer) if config.tokenizer else None
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings "
                             f"({mc.max_position_embeddings})")
        num_blocks = config.num_kv_blocks or kv_cache_blocks(
            self.device, config.kv_cache_bytes, config.gpu_memory_utilization,
            kv_cache_class(mc).bytes_per_block(mc, config.block_size, config.torch_dtype))
        needed = -(-self.max_model_len // config.block_size)
        if num_blocks < needed:
            raise ValueError(f"num_kv_blocks ({num_blocks}) cannot hold one max_model_len ({self.max_model_len}) "
                             f"sequence ({needed} blocks of {config.block_size})")
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks, _first_key(mc), self.max_model_len)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.device, config.attention_backend,
                                  config.cuda_graphs, config.max_num_seqs, self.max_model_len)
        self.runner.capture_graphs()
        self.sampler = Sampler(config.seed, self.device)
        self.stops = StopChecker(self.tokenizer, mc.eos_token_ids, self.max_model_len)
        # json_schema grammars, cached by schema; the server compiles through it before admitting a request
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, self.stops.eos_token_ids) \
            if self.tokenizer is not None else None
        self.requests: dict[str, Sequence] = {}
        self.stats = StepStats()
        self.overlap = config.async_scheduling if config.async_scheduling is not None else _core_left(self.device)
        self._in_flight: LaunchedStep | None = None  # overlapped: the step whose forward pass runs now
        self._arrivals = itertools.count()

    # -- requests -----------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    prefix_source: str | None = None, arrival_time: float | None = None,
                    client: str | None = None) -> None:
        """Queue a request. ``prefix_source``: the id of a queued or running request with the same prompt (another
        choice of an ``n > 1`` request); this one then starts after it has computed the prompt and reuses its
        KV blocks through the prefix cache, so the prompt is computed once. ``arrival_time``: when the caller
        received it (``time.monotonic()``; default now), the start of its time to first token. ``client``: shared
        by the requests of one client (the sub-requests of one HTTP request), which then share the batch fairly
        with other clients (:mod:`serve.engine.fair_share`); None: a client of its own."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params ({type(params).__name__}) must be a serve.SamplingParams")
        params.validate()
        if request_id in self.requests:
            raise ValueError(f"request_id ({request_id!r}) is already in use")
        ids = self._prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop ({params.stop!r}) needs a tokenizer; this model has none")
        source = None
        if prefix_source is not None:
            source = self.requests.get(prefix_source)
            if source is None or source.prompt_token_ids != ids:
                raise ValueError(f"prefix_source ({prefix_source!r}) is not a queued or running request "
                                 "with the same prompt")
        now = time.monotonic()
        times = RequestTimes(now if arrival_time is None else arrival_time, now)
        matcher = self._matcher(params)
        seq = Sequence(request_id, ids, params, next(self._arrivals), prefix_source=source, times=times,
                       client=client)
        seq.matcher = matcher
        self.stops.start(seq)
        self.scheduler.add(seq)
        self.requests[request_id] = seq

    def _matcher(self, params: SamplingParams):
        """The grammar state of a ``json_schema`` request (a copy of the cached compiled schema), else None."""
        if params.json_schema is None:
            return None
        if self.grammars is None:
            raise ValueError("json_schema needs a tokenizer; this model has none")
        return self.grammars.matcher(params.json_schema)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt (str) needs a tokenizer; this model has none: pass token ids")
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError(f"prompt ({prompt!r}) is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids ({bad[:5]}) must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt length ({len(ids)}) must be < max_model_len ({self.max_model_len}) "
                             "to leave room for an output token")
        return ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown or finished)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        if seq.has_pending_token:  # aborted while a step computes its next token: that token is dropped
            seq.token_ids.pop()
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [])

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def counters(self) -> EngineCounters:
        blocks, sched, stats = self.blocks, self.scheduler, self.stats
        return EngineCounters(len(sched.running), len(sched.waiting), blocks.num_blocks, blocks.num_free_blocks,
                              blocks.stats.queried_tokens, blocks.stats.hit_tokens, sched.num_preemptions,
                              stats.steps, stats.prompt_tokens + stats.output_tokens)

    def warm_up(self) -> float:
        """One small request (a 64-token prefill, two decodes) before serving, so that no client pays first-use
        costs: the C kernels are built (a machine's first use compiles them, seconds) and loaded, torch's first
        calls made (a cold first request waited 3.9 s against 67 ms steady). The prefix cache is off meanwhile
        (nothing of it stays cached) and the step statistics are reset. Seconds taken."""
        start = time.perf_counter()
        if self.device.type == "cpu":  # the MoE GEMM, greedy and paged-attention libraries (the fused decode
            # step's is built with the runner, and its decodes then skip the attention kernel's own library)
            skinny_gemm_available(), block_gemm_available(), greedy.warm_up()
            paged_decode_available(self.runner.cache.pool)
        caching, self.blocks.enable_prefix_caching = self.blocks.enable_prefix_caching, False
        try:
            prompt = [0] * max(1, min(64, self.max_model_len - 3))
            self.add_request("warm-up", prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
            while "warm-up" in self.requests:
                self.step()
        finally:
            self.blocks.enable_prefix_caching = caching
        self.stats = StepStats()
        return time.perf_counter() - start

    # -- the loop -----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that produced a token (or finished).

        Overlapped (``async_scheduling``): the step launched by the previous call computes while this one plans the
        next (:mod:`serve.engine.overlap`); its tokens are returned here, the next step is left computing.
        """
        current = self._in_flight
        if current is None:
            current = self._launch(self._plan(), None)
            if current is None:
                return []
            self._account(current.step)
        upcoming = self._plan() if self.overlap else None
        rows, seqs = self._take_pending(current.step)
        result, tokens_S = self._sample(current, rows, seqs)
        self._in_flight = self._launch(upcoming, tokens_S)
        outputs = self._postprocess(seqs, result)
        if self._in_flight is not None:
            self._account(self._in_flight.step)
        return outputs

    def _plan(self) -> PlannedStep | None:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.stats.schedule_s += t1 - t0
        if not batch.seqs:
            return None
        inputs = self.runner.prepare(batch.seqs, batch.num_new_tokens)
        staged = self.runner.stage(inputs, self.blocks.take_copies(), self.overlap)
        self.stats.prepare_s += time.perf_counter() - t1
        return PlannedStep(batch.seqs, batch.num_new_tokens, inputs, staged)

    def _launch(self, step: PlannedStep | None, tokens_S: np.ndarray | None) -> LaunchedStep | None:
        """Start ``step``'s forward pass, its pending input ids filled with ``tokens_S``, the previous step's
        sampled tokens (overlapped, a fused decode step computes on its own thread; see ``ModelRunner.stage``)."""
        if step is None:
            return None
        return LaunchedStep(step, step.staged.launch(tokens_S))

    def _account(self, step: PlannedStep) -> None:
        """A launched step's tokens count as computed (its full blocks enter the prefix cache), and each sequence
        that samples gets its pending token, so the next plan sees it one token on."""
        for seq, n in zip(step.seqs, step.num_new_tokens, strict=True):
            if seq.is_finished:  # stopped on the previous step's token, or aborted: its row here is wasted
                continue
            if seq.num_computed < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed)
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
        for row, i in enumerate(step.inputs.sampled):
            if not step.seqs[i].is_finished:
                step.seqs[i].token_ids.append(pending_token(row))

    def _take_pending(self, step: PlannedStep) -> tuple[list[int], list[Sequence]]:
        """The sampled rows of a launched step whose sequences still run, and those sequences, their pending tokens
        removed (the sampler sees the tokens so far; the next step is planned already)."""
        rows = [r for r, i in enumerate(step.inputs.sampled) if not step.seqs[i].is_finished]
        seqs = [step.seqs[step.inputs.sampled[r]] for r in rows]
        for seq in seqs:
            seq.token_ids.pop()
        return rows, seqs

    def _sample(self, launched: LaunchedStep, rows: list[int], seqs: list[Sequence]) -> tuple[SampleResult,
                                                                                                np.ndarray]:
        """Wait for a launched step's logits and sample its live ``rows`` (of ``seqs``). Returns the result and the
        tokens by sampled row (0 for a sequence finished meanwhile), for the next step's pending input ids."""
        logits_SV, model_s = launched.wait()
        t0 = time.perf_counter()
        if len(rows) < logits_SV.shape[0]:
            logits_SV = logits_SV[rows]
        greedy = launched.pending.greedy_S  # the fused step's argmax of each sampled row (None: not computed)
        if greedy is not None and len(rows) < greedy.shape[0]:
            greedy = greedy[rows]
        result = self.sampler(logits_SV, seqs, greedy) if seqs else SampleResult([], [])
        tokens_S = np.zeros(len(launched.step.inputs.sampled), dtype=np.int64)
        tokens_S[rows] = result.token_ids
        self.stats.model_s += model_s
        self.stats.sample_s += time.perf_counter() - t0
        return result, tokens_S

    def _postprocess(self, seqs: list[Sequence], result: SampleResult) -> list[RequestOutput]:
        t0 = time.perf_counter()
        outputs = []
        now = time.monotonic()  # one timestamp for the tokens of this step (after the sampler's host sync)
        for seq, token, logprobs in zip(seqs, result.token_ids, result.logprobs, strict=True):
            seq.token_ids.append(token)
            seq.times.on_token(now)
            if logprobs is not None:
                seq.logprobs.append(logprobs)
            self.stats.output_tokens += 1
            reason = self.stops.check(seq)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.requests[seq.request_id]
            outputs.append(self._output(seq, [token]))
        self.stats.steps += 1
        self.stats.postprocess_s += time.perf_counter() - t0
        return outputs

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        finished = seq.is_finished
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=seq.output_token_ids,
            text=self.stops.final_text(seq) if finished else seq.text, finished=finished,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=max(seq.num_cached_tokens, 0), new_token_ids=new,
            times=seq.times.copy(), num_preemptions=seq.num_preemptions,
        )


class LLM:
    """Offline generation: ``LLM(model=None, **options).generate(prompts, sampling) -> [RequestOutput]``.

    ``model=None`` loads the embedded default model; ``options`` are :class:`serve.engine.config.EngineConfig` fields.
    """

    def __init__(self, model: str | None = None, **options) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"engine options ({', '.join(unknown)}) are not EngineConfig fields")
        self.engine = LLMEngine(EngineConfig(model=model, **options))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list, sampling: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One output per prompt, in order. ``prompts``: a string, a token-id list, or a list of either;
        ``sampling``: one :class:`SamplingParams` for all or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling ({len(params)} SamplingParams) must match prompts ({len(prompts)})")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            try:
                self.engine.add_request(rid, prompt, p)
            except Exception:
                for added in ids[:ids.index(rid)]:
                    self.engine.abort(added)
                raise
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            steps = self.engine.stats.steps
            outputs = self.engine.step()
            if self.engine.stats.steps == steps:
                raise RuntimeError(f"engine scheduled nothing with {len(ids) - len(final)} requests unfinished")
            for out in outputs:
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]


def _core_left(device: torch.device) -> bool:
    """Whether overlapped steps pay by default: on the CPU with a core left beside the intra-op threads for the
    engine thread's host work. Without one, the C step's OpenMP team loses a core to the host work and stalls at
    every barrier (2 threads on 2 cores: half the throughput of one step at a time)."""
    return device.type == "cpu" and torch.get_num_threads() < len(os.sched_getaffinity(0))


def _first_key(config: DecoderConfig) -> Callable[[int], int] | None:
    """The first key a query at a position sees in any layer, when every layer has a window (blocks before it can
    be returned); None when some layer attends to the whole context."""
    if config.longest_window is None:
        return None
    windows = set(config.attention_windows)
    return lambda pos: min(w.first_key(pos) for w in windows)
