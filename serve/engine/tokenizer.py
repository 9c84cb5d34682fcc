"""``Tokenizer``: a checkpoint's ``tokenizer.json`` (via ``tokenizers``) and its jinja chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from serve.engine.special_text import SpecialText


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """``encode(text) -> ids``, ``decode(ids) -> text``, ``apply_chat_template(messages) -> prompt text``.

    Reads ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, ``chat_template``) and, where present,
    ``chat_template.jinja`` (where ``transformers`` 5 saves the template).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer ({str(path)!r}) has no tokenizer.json")
        self.hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        # special-token strings typed into text are text for this copy (split_special_tokens; see special_text)
        self.special_text = SpecialText([t.content for t in self.hf.get_added_tokens_decoder().values() if t.special])
        self.hf_text = HFTokenizer.from_str(self.hf.to_str())
        self.hf_text.encode_special_tokens = True
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.chat_template: str | None = template
        # A lower bound on tokens per character: no token covers more characters than its vocabulary string has
        # (byte-level BPE spells each byte as one character). A normalizer may delete characters, so then none.
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.max_token_chars: int | None = max(map(len, vocab), default=1) if self.hf.normalizer is None else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """``split_special_tokens``: special-token strings in ``text`` are encoded as the text they are (as
        ``transformers``' option of that name); ``add_special_tokens`` (BOS and the like) is another matter."""
        hf = self.hf_text if split_special_tokens and self.special_text.occurs(text) else self.hf
        # encode_batch releases the GIL (encode holds it: a 4 MB prompt would freeze every other thread for
        # seconds, the event loop and the engine loop included)
        return hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` from its length alone (0 when the tokenizer cannot bound it)."""
        return -(-len(text) // self.max_token_chars) if self.max_token_chars else 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the checkpoint's template."""
        if self.chat_template is None:
            raise ValueError("chat_template (None): this tokenizer has no chat template")
        # what transformers' renderer gives a template (chat_template_utils): these globals, filters and tags
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Mistral's templates date their prompt
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, split_special_tokens: bool = False,
                    **kwargs) -> list[int]:
        """The rendered prompt's ids; the template writes the special tokens itself. ``split_special_tokens``:
        special-token strings inside the messages' contents are text, the template's markers stay special."""
        contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
        if not (split_special_tokens and any(map(self.special_text.occurs, contents))):
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), False)
        escaper = self.special_text.escaper([*contents, self.chat_template or ""])
        escaped = [{**m, "content": escaper.escape(m["content"])} if isinstance(m.get("content"), str) else m
                   for m in messages]
        pieces = self.special_text.split(self.apply_chat_template(escaped, add_generation_prompt, **kwargs))
        texts = self.hf_text.encode_batch([escaper.unescape(p) for p, special in pieces if not special],
                                          add_special_tokens=False)
        ids, text_ids = [], iter(texts)
        for piece, special in pieces:
            ids += [self.hf.token_to_id(piece)] if special else next(text_ids).ids
        return ids


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (transformers tracks assistant spans with it,
    for training masks; serving needs only the text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


@dataclass
class IncrementalDetokenizer:
    """Text of a growing token list, one step at a time, without re-decoding it all (vLLM's offsets scheme).

    ``add(all_ids) -> new text``. A few tokens of context are re-decoded so that byte-level merges and
    leading-space rules come out as in a full decode; text ending in an incomplete UTF-8 character waits.
    """

    tokenizer: Tokenizer
    prefix_offset: int
    read_offset: int

    @classmethod
    def after_prompt(cls, tokenizer: Tokenizer, prompt_len: int) -> IncrementalDetokenizer:
        return cls(tokenizer, max(0, prompt_len - 5), prompt_len)

    def add(self, ids: list[int]) -> str:
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return full[len(prefix):]
