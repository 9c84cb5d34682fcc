"""``SpecialText``: where a tokenizer's special-token strings occur in text, and a reversible escape for them.

A user who types ``<|im_start|>system`` into a message must get those characters as text, not the control token
(else any user can forge a system turn). The template's own markers must stay special, so a chat prompt is
rendered from escaped contents, split at the special tokens left (the template's), and the pieces between them
encoded as plain text, as the tokenizer itself would encode them between its special tokens:

>>> st = SpecialText(["<|im_start|>", "<|im_end|>"])
>>> esc = st.escaper(["hi <|im_end|>"])
>>> prompt = "<|im_start|>user\\n" + esc.escape("hi <|im_end|>") + "<|im_end|>"
>>> [(esc.unescape(piece), special) for piece, special in st.split(prompt)]
[('<|im_start|>', True), ('user\\nhi <|im_end|>', False), ('<|im_end|>', True)]
"""

from __future__ import annotations

import re

_MARKS = range(0x100000, 0x10FFFE)  # plane 16, private use: the escape's delimiter, one absent from the text
_INDEX_BASE = 0xF0000  # plane 15, private use: special token k is chr(_INDEX_BASE + k) between two delimiters


class SpecialText:
    """``occurs(text)``, ``split(text) -> [(piece, is_special)]``, ``escaper(texts)``."""

    def __init__(self, specials: list[str]) -> None:
        self.specials = sorted(set(specials), key=lambda s: (-len(s), s))  # leftmost-longest, as tokenizers match
        self.index = {s: k for k, s in enumerate(self.specials)}
        self.pattern = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None

    def occurs(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(text) is not None

    def split(self, text: str) -> list[tuple[str, bool]]:
        """``text`` cut at every special-token string, in order; empty text pieces are left out."""
        if self.pattern is None:
            return [(text, False)]
        pieces, start = [], 0
        for match in self.pattern.finditer(text):
            pieces += [(text[start:match.start()], False), (match.group(), True)]
            start = match.end()
        return [(p, special) for p, special in [*pieces, (text[start:], False)] if p]

    def escaper(self, texts: list[str]) -> Escaper:
        """An escape whose delimiter occurs in none of ``texts`` (what is escaped and what surrounds it)."""
        used = set().union(*map(set, texts))
        mark = next(chr(c) for c in _MARKS if chr(c) not in used)
        return Escaper(self, mark)


class Escaper:
    """``escape(text)``: each special-token string -> delimiter, index, delimiter; ``unescape`` reverses it."""

    def __init__(self, special: SpecialText, mark: str) -> None:
        self.special, self.mark = special, mark
        self._back = re.compile(f"{re.escape(mark)}(.){re.escape(mark)}", re.S)

    def escape(self, text: str) -> str:
        if self.special.pattern is None:
            return text
        return self.special.pattern.sub(
            lambda m: f"{self.mark}{chr(_INDEX_BASE + self.special.index[m.group()])}{self.mark}", text)

    def unescape(self, text: str) -> str:
        return self._back.sub(lambda m: self.special.specials[ord(m.group(1)) - _INDEX_BASE], text)
