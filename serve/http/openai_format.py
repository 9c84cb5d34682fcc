"""Engine outputs -> OpenAI response bodies: streamed text with stop strings held back, logprobs, usage.

``ChoiceText`` turns a choice's successive :class:`RequestOutput` into text deltas. While a choice runs, the
longest tail of its text that could still begin a stop string is held back, so a stop string never leaks into
a stream even when it arrives split over several tokens; what was held back is released once it cannot be one.
"""

from __future__ import annotations

import math

from serve.engine.outputs import RequestOutput
from serve.engine.stopping import StopStrings
from serve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

MIN_LOGPROB = -9999.0  # JSON has no -inf


class ChoiceText:
    """One choice's text as it grows. ``update(out) -> (text_delta, new_token_ids)``.

    Requests with stop strings carry their (stop-truncated) text in ``out.text``; the others are detokenized
    here, incrementally, from the prompt's tail onward (so leading spaces come out as in a full decode).
    """

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.held_back = StopStrings(stops).held_back if stops else lambda text: 0
        self.ids = list(prompt_ids)
        self.detok = IncrementalDetokenizer.after_prompt(tokenizer, len(prompt_ids)) if tokenizer else None
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of it already handed out
        self.num_tokens = 0

    def update(self, out: RequestOutput) -> tuple[str, list[int]]:
        new_ids = out.token_ids[self.num_tokens:]
        self.num_tokens = len(out.token_ids)
        if self.tokenizer is None:
            return "", new_ids
        if out.finished:
            final = out.text
            delta = final[self.sent:] if final.startswith(self.text[:self.sent]) else ""
            self.text, self.sent = final, len(final)
            return delta, new_ids
        if self.stops:
            self.text = out.text
        else:
            self.ids.extend(new_ids)
            self.text += self.detok.add(self.ids)
        safe = len(self.text) - self.held_back(self.text)
        delta = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, new_ids


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


class LogprobFormatter:
    """Engine logprobs (per token: ``{id: logprob}``, chosen token first) -> OpenAI's two layouts."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)

    def _top(self, entry: dict[int, float], n: int) -> list[tuple[str, float]]:
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
        return [(self.token_text(t), _finite(v)) for t, v in ranked]

    def completion(self, entries: list[dict[int, float]], n: int, text_offset: int) -> dict:
        """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (legacy completions)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            chosen, value = next(iter(entry.items()))
            text = self.token_text(chosen)
            tokens.append(text)
            logprobs.append(_finite(value))
            tops.append(dict(self._top(entry, n)))
            offsets.append(text_offset)
            text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, entries: list[dict[int, float]], n: int) -> dict:
        """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`` (chat completions)."""
        content = []
        for entry in entries:
            chosen, value = next(iter(entry.items()))
            text = self.token_text(chosen)
            content.append({
                "token": text, "logprob": _finite(value), "bytes": list(text.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in self._top(entry, n)],
            })
        return {"content": content}


def usage(prompt_lens: list[int], outputs: list[RequestOutput | None]) -> dict:
    """OpenAI counts each prompt once (not once per ``n``) and every choice's tokens."""
    prompt = sum(prompt_lens)
    completion = sum(len(o.token_ids) for o in outputs if o is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
