"""Probe conversations rendered through a chat template, and the text between their messages.

Every message's content is a marker word that no template adds or changes, so the text between two markers
is exactly what the template writes between those two messages: the end of one turn and the start of the
next. `derive.py` reads the presets off these pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import ChatTemplateError
from .jinja_render import render

SYSTEM = "SysMkQ"
USER = ("UsrMkA", "UsrMkB", "UsrMkC")
ASSISTANT = ("AstMkA", "AstMkB")
NARRATOR = "NarMkQ"  # a system message in the middle of the chat (ST's narrator / /sys messages)
GREETING_MARK = "GrtMkQ"


def _msg(role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


CHAT = [
    _msg("user", USER[0]), _msg("assistant", ASSISTANT[0]), _msg("user", USER[1]),
    _msg("assistant", ASSISTANT[1]), _msg("user", USER[2]),
]
CHAT_ORDER = [USER[0], ASSISTANT[0], USER[1], ASSISTANT[1], USER[2]]
# An ST chat opens with the character's greeting: an assistant message first.
GREETING = [_msg("assistant", GREETING_MARK), *CHAT[:3]]


@dataclass
class Renders:
    """The probe conversations as the template writes them (None: the template refused that one)."""

    chat: str  # five turns, user first, with the generation prompt
    with_system: str | None  # a system message, then the same five turns
    system_error: str  # why `with_system` is None
    user_only: str | None  # one user message, no generation prompt: what ends a user turn
    user_assistant: str | None  # user then assistant, no generation prompt: what ends an assistant turn
    narrator: str | None  # user, assistant, a system message, user: a system message inside the chat
    greeting: str | None  # system, then the character's greeting (assistant) before the user's first message
    bare_greeting: str | None  # the same without the system message


def render_probes(template: str, *, bos_token: str, eos_token: str,
                  now: Callable[[], datetime] = datetime.now) -> Renders:
    """Render every probe; only the plain chat must succeed (a chat template that cannot write a chat is
    not one)."""

    def attempt(messages: list[dict[str, Any]], gen: bool) -> tuple[str | None, str]:
        try:
            return render(template, messages, add_generation_prompt=gen, bos_token=bos_token,
                          eos_token=eos_token, now=now), ""
        except ChatTemplateError as exc:
            return None, exc.message

    chat, error = attempt(CHAT, True)
    if chat is None:
        raise ChatTemplateError(f"the chat template cannot write a plain chat: {error}")
    with_system, system_error = attempt([_msg("system", SYSTEM), *CHAT], True)
    return Renders(
        chat=chat,
        with_system=with_system,
        system_error=system_error,
        user_only=attempt(CHAT[:1], False)[0],
        user_assistant=attempt(CHAT[:2], False)[0],
        narrator=attempt([*CHAT[:2], _msg("system", NARRATOR), CHAT[2]], True)[0],
        greeting=attempt([_msg("system", SYSTEM), *GREETING], True)[0],
        bare_greeting=attempt(GREETING, True)[0],
    )


def between(text: str, marks: list[str]) -> list[str] | None:
    """[before the first mark, between each pair, after the last], or None when a mark is missing,
    repeated or out of order."""
    pieces: list[str] = []
    at = 0
    for mark in marks:
        found = text.find(mark, at)
        if found < 0 or text.count(mark) != 1:
            return None
        pieces.append(text[at:found])
        at = found + len(mark)
    pieces.append(text[at:])
    return pieces


def after(text: str | None, mark: str) -> str | None:
    """What follows `mark` in `text` (None when there is no text or no mark)."""
    if text is None or mark not in text:
        return None
    return text[text.index(mark) + len(mark):]
