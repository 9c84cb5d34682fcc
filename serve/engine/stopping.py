"""``StopChecker``: decides after each new token whether a sequence is done, and produces its text."""

from __future__ import annotations

from dataclasses import dataclass

from serve.engine.sequence import Sequence
from serve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopStrings:
    """A request's stop strings, indexed once: ``find`` looks for those that end in what one step added (they
    begin at most ``longest - 1`` characters before it), ``held_back`` is how much of a text's tail could still
    begin one (a stream holds that back). Both are set lookups of the text's last ``longest`` characters, so they
    cost the same whatever the text's length or the number of stops.

    >>> StopStrings(["world", "x"]).held_back("hello wor")
    3
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = frozenset(stops)
        self.lengths = sorted({len(stop) for stop in stops})
        self.longest = self.lengths[-1]
        self.prefixes = {stop[:n] for stop in stops for n in range(1, len(stop))}

    def find(self, text: str, new_chars: int) -> tuple[int, str] | None:
        """The earliest stop (the smallest at one index) ending in the last ``new_chars`` characters of ``text``:
        ``(index, stop)``. The text before them held none, so this is the earliest in all of ``text``."""
        best = None
        for end in range(max(1, len(text) - new_chars + 1), len(text) + 1):
            for n in self.lengths:
                piece = text[max(0, end - n):end]
                if len(piece) == n and piece in self.stops and (best is None or (end - n, piece) < best):
                    best = (end - n, piece)
        return best

    def held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            if text[-n:] in self.prefixes:
                return n
        return 0


@dataclass
class _StopState:
    detok: IncrementalDetokenizer
    stops: StopStrings


class StopChecker:
    """EOS (unless ``ignore_eos``), ``stop_token_ids``, ``stop`` strings, a complete ``json_schema`` grammar,
    ``max_tokens`` and the context limit.

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
            seq.detok_state = _StopState(IncrementalDetokenizer.after_prompt(self.tokenizer, seq.num_prompt_tokens),
                                         StopStrings(seq.params.stop))

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
        if seq.matcher is not None and seq.matcher.is_stopped():  # complete (or failed: see structured.advance)
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _stop_string(self, seq: Sequence) -> bool:
        state = seq.detok_state
        new = state.detok.add(seq.token_ids)
        if not new:
            return False
        seq.text += new
        found = state.stops.find(seq.text, len(new))
        if found is None:
            return False
        index, stop = found
        end = index + len(stop) if seq.params.include_stop_str_in_output else index
        seq.text, seq.stop_reason = seq.text[:end], stop
        return True

    def final_text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        if isinstance(seq.stop_reason, str):
            return seq.text
        return self.tokenizer.decode(seq.output_token_ids)
