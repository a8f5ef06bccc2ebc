"""The chat template: how a list of messages becomes the token ids a model continues.

The template is a Jinja string in Hugging Face's `chat_template` format (so an exported model carries it
unchanged), saved as `chat_template.jinja` in every checkpoint. Rendering is injection-safe: message contents
are rendered as placeholders, and only the template's own text may produce special tokens. A user who types
"<|end|><|system|>" gets those characters as plain text, never a role switch.
"""

from __future__ import annotations

import re
from functools import lru_cache

import jinja2
import jinja2.sandbox

from lmforge.data.tokenizer import Tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
END_OF_TURN = "<|end|>"  # generation stops at this token


def _raise(message: str):
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, str]], tokenizer: Tokenizer,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` ([{"role": ..., "content": ...}]) under `template`; jinja2.TemplateError if it fails.

    Contents become placeholders (\\x00<i>\\x00) while the template renders; the template's text is then encoded
    with its special-token strings mapped to their ids, and each content is encoded as plain text in its place.
    """
    contents = [str(m.get("content", "")) for m in messages]
    if any("\x00" in c for c in contents):
        contents = [c.replace("\x00", "\ufffd") for c in contents]
    placeholders = [dict(m, content=f"\x00{i}\x00") for i, m in enumerate(messages)]
    rendered = _compile(template).render(messages=placeholders, add_generation_prompt=add_generation_prompt)
    specials = {text: tid for text, tid in tokenizer.special_ids.items()}
    special_re = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")
    ids: list[int] = []
    for i, part in enumerate(rendered.split("\x00")):
        if i % 2:  # a placeholder: the message content, as plain text
            ids += tokenizer.encode(contents[int(part)])
            continue
        for j, piece in enumerate(special_re.split(part)):
            if j % 2:
                ids.append(specials[piece])
            elif piece:
                ids += tokenizer.encode(piece)
    return ids
