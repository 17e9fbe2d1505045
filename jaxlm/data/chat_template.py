"""Chat templates as HF ships and renders them: a Jinja template (tokenizer_config.json's
`chat_template`, or a `chat_template.jinja` file beside it) rendered in a sandbox with HF's
settings (trim_blocks, lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII text,
`raise_exception`, `strftime_now`, the `{% generation %}` tag) over `messages`,
`add_generation_prompt`, `tools`, `documents` and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...), so the text equals `tokenizer.apply_chat_template`'s."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """No template, or one that does not render (a TemplateError it raises, bad syntax)."""


def read(directory: str | Path, config: dict[str, Any]) -> str | None:
    """The directory's chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: the one named 'default')."""
    path = Path(directory) / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; rendered as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from None


def render(template: str | None, messages: list[dict[str, Any]], *,
           special_tokens: dict[str, str], add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None,
           documents: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
    """The conversation as the template writes it. Keys whose value is None are dropped from
    each message (as HF does); `kwargs` reach the template beside the special tokens."""
    import jinja2

    if template is None:
        raise ChatTemplateError("this tokenizer has no chat template (tokenizer_config.json's "
                                "chat_template or chat_template.jinja)")
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile(template).render(
            messages=chat, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **{**special_tokens, **kwargs})
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
