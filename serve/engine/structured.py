"""Structured output: a JSON schema -> a grammar (llguidance) -> a per-sequence token mask in the sampler.

Shape legend: B sequences sampled this step, R of them constrained by a grammar, V vocabulary, W = ceil(V / 32)
32-bit words of one bitmask row.

``GrammarCompiler.compile(schema)`` builds a pristine ``LLMatcher`` once per schema (an LRU cache keyed by the
schema's canonical JSON; thread-safe, so the HTTP layer compiles in a worker thread before admission and the
engine's ``add_request`` only copies the cached matcher). Each constrained sequence owns a copy
(``Sequence.matcher``), which the sampler masks with before drawing and advances with the drawn token; the stop
checker ends the sequence once the grammar is complete (the matcher then allows nothing but EOS).

JSON is compact (no whitespace between tokens, as ``json.dumps(separators=(",", ":"))``): free whitespace would
let a sampled sequence pad forever, and a schema with bounded strings and arrays then bounds the output length.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict

import torch

from serve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_COMPILE_OPTIONS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a declared dependency; a hand-made environment may still lack it
        raise ImportError("structured output (json_schema) needs llguidance: pip install 'llguidance>=1.7'") from e
    return llguidance


class GrammarCompiler:
    """``compile(schema) -> LLMatcher`` (pristine, shared: copy it) and ``matcher(schema)`` (a sequence's own).

    An invalid schema raises ``ValueError("json_schema (...) is not a valid JSON schema: <why>")``. llguidance is
    loaded on the first compile, so an engine that never sees a schema never imports it.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int] | set[int],
                 cache_size: int = 256) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size ({cache_size}) must be >= 1")
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                llg = _llguidance()
                self._ll_tokenizer = llg.LLTokenizer(self.tokenizer.hf.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_ids)
            return self._ll_tokenizer

    def compile(self, schema: dict):
        """The cached pristine matcher of ``schema`` (compiled on a miss, outside the lock)."""
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPILE_OPTIONS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"json_schema ({_short(key)}) is not a valid JSON schema: {_one_line(e)}") from None
        matcher = llg.LLMatcher(self._tokenizer(), grammar, log_level=0)  # never raises: errors are its state
        if matcher.is_error():
            raise ValueError(f"json_schema ({_short(key)}) is not a valid JSON schema: "
                             f"{_one_line(matcher.get_error())}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, schema: dict):
        """A fresh matcher of ``schema`` for one sequence (a copy of the cached one: about a microsecond)."""
        pristine = self.compile(schema)
        with self._lock:
            return pristine.deep_copy()


class GrammarMasker:
    """Masks the logits of the constrained rows: llguidance fills one bitmask row per matcher (in parallel, on the
    host), the rows move to the logits' device in one copy and are unpacked and applied there in one op."""

    def __init__(self) -> None:
        self.executor = _llguidance().LLExecutor()
        self._shifts: dict[torch.device, torch.Tensor] = {}  # device -> arange(32): each token's bit in its word

    def __call__(self, logits_BV: torch.Tensor, rows: list[int], matchers: list) -> torch.Tensor:
        """``logits_BV`` with the tokens each matcher forbids set to -inf in its row (a new tensor)."""
        B, V = logits_BV.shape
        device = logits_BV.device
        W = (V + 31) // 32
        # the host: llguidance writes the masks into host memory
        mask_RW = torch.full((len(rows), W), -1, dtype=torch.int32, device="cpu")
        self.executor.unsafe_compute_mask_ptr(list(zip(matchers, range(len(rows)), strict=True)),
                                              mask_RW.data_ptr(), W * 4, len(rows))
        if device not in self._shifts:
            self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        bits_RW32 = (mask_RW.to(device, non_blocking=True)[:, :, None] >> self._shifts[device]) & 1
        allowed_RV = bits_RW32.reshape(len(rows), W * 32)[:, :V].bool()
        rows_R = torch.tensor(rows, device=device)
        out_BV = logits_BV.clone()
        out_BV[rows_R] = logits_BV[rows_R].masked_fill(~allowed_RV, float("-inf"))
        return out_BV


def advance(matchers: list, token_ids: list[int]) -> None:
    """Feed each matcher the token drawn for its sequence. The mask allowed it, so a refusal means the grammar
    hit one of llguidance's limits: the matcher is then in its error state, stopped, and the sequence ends."""
    for matcher, token in zip(matchers, token_ids, strict=True):
        if not matcher.consume_token(token):
            log.warning("structured output ended early: %s", _one_line(matcher.get_error()))


def _one_line(error: object) -> str:
    return re.sub(r"\s+", " ", str(error)).strip()[:300]


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
