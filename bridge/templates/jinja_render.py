"""A GGUF's Jinja chat template rendered the way Hugging Face and llama.cpp render it.

Transformers (`chat_template_utils.py`) and llama-cpp-python (`Jinja2ChatFormatter`) both use a sandboxed,
immutable Jinja environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`tojson` filter that keeps non-ASCII text as is, a pass-through for the `{% generation %}` tag, and the
globals `raise_exception` and `strftime_now`; the special tokens (`bos_token`, `eos_token`) are variables.
Templates are written against exactly that, so rendering them any other way changes the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateError


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}...{% endgeneration %}` marks trainable text; rendering ignores it."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a model's template is rendered many times)."""
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc


def render(source: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
           bos_token: str = "", eos_token: str = "", now: Callable[[], datetime] = datetime.now,
           **extra: Any) -> str:
    """The prompt the template writes for `messages` (BOS text included, as the template writes it).

    `now` is what `strftime_now` reads (Llama 3.2's template prints today's date); `extra` are further
    template variables such as `enable_thinking`.
    """
    template = compile_template(source)
    try:
        return template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, strftime_now=lambda fmt: now().strftime(fmt), **extra,
        )
    except ChatTemplateError:
        raise
    except Exception as exc:  # a template bug (undefined filter, bad index) is the model's, not ours
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc
