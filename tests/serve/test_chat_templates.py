"""Chat templates in the styles of the MLA families' checkpoints render through our tokenizer path exactly as
``transformers``' ``apply_chat_template`` renders them (text and ids).

The templates below use what those checkpoints' templates use: DeepSeek-V3's ``namespace`` bookkeeping of the
system prompt, ``bos_token`` and ``split('</think>')``; Kimi K2's ``tools | tojson`` and role markers; GLM's
``[gMASK]<sop>`` prefix, macros and ``loop.index0``; Mistral's ``strftime_now`` date, ``raise_exception`` on
non-alternating roles, ``selectattr`` and a ``{% generation %}`` span.
"""

from __future__ import annotations

import shutil

import pytest
from transformers import PreTrainedTokenizerFast

from serve.engine.config import DEFAULT_MODEL
from serve.engine.tokenizer import Tokenizer

DEEPSEEK_STYLE = (
    "{%- set ns = namespace(system_prompt='', is_first_sp=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system_prompt = ns.system_prompt + ('' if ns.is_first_sp else '\n\n') + m['content'] -%}"
    "{%- set ns.is_first_sp = false -%}{%- endfor -%}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '<|User|>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}{%- set content = m['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>', 1)[1] -%}{%- endif -%}"
    "{{ '<|Assistant|></think>' + content + eos_token }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|Assistant|>' }}{{ '<think>' if thinking else '</think>' }}{%- endif -%}"
)
KIMI_STYLE = (
    "{% if tools -%}{{ '<|im_system|>tool_declare<|im_middle|>' -}}{{- tools | tojson -}}{{ '<|im_end|>' -}}"
    "{%- endif -%}{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>' }}{%- endif -%}"
    "{{ '<|im_' + ('assistant' if message['role'] == 'assistant' else 'user' if message['role'] == 'user' "
    "else 'system') + '|>' + message['role'] + '<|im_middle|>' + message['content'] + '<|im_end|>' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_assistant|>assistant<|im_middle|>' }}{%- endif -%}"
)
GLM_STYLE = (
    "[gMASK]<sop>{%- macro visible_text(content) -%}{%- if content is string -%}{{- content }}"
    "{%- else -%}{%- for item in content if item.type == 'text' -%}{{- item.text }}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}{%- set ns = namespace(last_user_index=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{% set ns.last_user_index = loop.index0 -%}{%- endif %}"
    "{%- endfor %}\n{% for m in messages %}{%- if m.role == 'user' -%}<|user|>\n{{ visible_text(m.content) }}"
    "{%- elif m.role == 'assistant' -%}\n<|assistant|>{{ '\n<think></think>' }}"
    "{%- if loop.index0 > ns.last_user_index %}{{ '\n' + visible_text(m.content).strip() }}{% else %}"
    "{{ '\n' + visible_text(m.content) }}{% endif %}"
    "{%- elif m.role == 'system' -%}<|system|>\n{{ visible_text(m.content) }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}\n    <|assistant|>{%- endif -%}\n"
)
MISTRAL_STYLE = (
    "{%- set today = strftime_now('%Y-%m-%d') %}{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}"
    "{%- set system_message = 'You are a model. The current date is ' + today + '.' %}"
    "{%- set loop_messages = messages %}{%- endif %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{%- endif %}{%- endfor %}"
)
TEMPLATES = {"deepseek_v3": DEEPSEEK_STYLE, "kimi_k2": KIMI_STYLE, "glm4_moe_lite": GLM_STYLE,
             "mistral4": MISTRAL_STYLE}
CONVERSATIONS = [
    [{"role": "user", "content": "Which experts are hot?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think>greet</think>Hello!  "}, {"role": "user", "content": "Route me."}],
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "ünïcode ✓"}],
]


def tokenizers(family: str, tmp_path) -> tuple[Tokenizer, PreTrainedTokenizerFast]:
    """Ours and transformers' over the default model's tokenizer with ``family``'s template."""
    path = tmp_path / family
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, path / name)
    (path / "chat_template.jinja").write_text(TEMPLATES[family])
    reference = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), chat_template=TEMPLATES[family],
                                        bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    ours = Tokenizer(path)
    ours.bos_token = ours.eos_token = "<|endoftext|>"
    return ours, reference


@pytest.fixture(params=sorted(TEMPLATES))
def checkpoint_tokenizer(request, tmp_path):
    return tokenizers(request.param, tmp_path)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_as_transformers(checkpoint_tokenizer, conversation, generation_prompt):
    ours, reference = checkpoint_tokenizer
    messages = CONVERSATIONS[conversation]
    kwargs = {"tools": [{"type": "function", "function": {"name": "route", "parameters": {"type": "object"}}}]}
    want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    assert ours.apply_chat_template(messages, generation_prompt, **kwargs) == want
    want_ids = reference.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
    want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
    assert ours.encode_chat(messages, generation_prompt, **kwargs) == list(want_ids)


def test_template_errors_surface_as_transformers_raises_them(tmp_path):
    ours, reference = tokenizers("mistral4", tmp_path)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate") as want:
        reference.apply_chat_template(messages, tokenize=False)
    with pytest.raises(type(want.value), match="must alternate"):
        ours.apply_chat_template(messages)
