"""``StopChecker``: decides after each new token whether a sequence is done, and produces its text."""

from __future__ import annotations

from serve.engine.sequence import Sequence
from serve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopChecker:
    """EOS (unless ``ignore_eos``), ``stop_token_ids``, ``stop`` strings, ``max_tokens`` and the context limit.

    Only requests with stop strings are detokenized every step (incrementally); the others once, at the end.
    """

    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        eos = set(eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        if seq.params.stop:
            seq.detok_state = IncrementalDetokenizer.after_prompt(self.tokenizer, seq.num_prompt_tokens)

    def check(self, seq: Sequence) -> str | None:
        """Call after appending a token: ``"stop"``, ``"length"`` or None (sets ``seq.stop_reason``)."""
        params, token = seq.params, seq.token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if params.stop and self._stop_string(seq):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _stop_string(self, seq: Sequence) -> bool:
        new = seq.detok_state.add(seq.token_ids)
        if not new:
            return False
        seq.text += new
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, len(seq.text) - len(new) - longest + 1)
        found = [(seq.text.find(s, search_from), s) for s in seq.params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return False
        index, stop = min(found)
        end = index + len(stop) if seq.params.include_stop_str_in_output else index
        seq.text, seq.stop_reason = seq.text[:end], stop
        return True

    def final_text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        if isinstance(seq.stop_reason, str):
            return seq.text
        return self.tokenizer.decode(seq.output_token_ids)
