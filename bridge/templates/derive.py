"""From a chat template's renders to SillyTavern's instruct and context presets.

ST writes a Text Completion prompt as: story string (wrapped in `story_string_prefix` / `_suffix`), then
each chat message as `sequence + content + suffix` (the first and last user message and the generation
prompt may use their own sequences), then the output sequence that opens the reply. With `wrap` off every
piece is literal, so a template whose turns look alike reduces to those pieces exactly: the text between two
probe messages is one turn's suffix followed by the next turn's sequence. Where that text can be split in
several ways, the split follows what the template writes after a lone user or assistant message (what ends
a turn), then the end-of-turn markers of known families.

What ST's format cannot express is recorded as `Inexact` with the closest preset: chiefly a system prompt
the template merges into a user message or refuses, since ST's story string is a block of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ..errors import ChatTemplateError
from . import probes
from .probes import ASSISTANT, GREETING_MARK, NARRATOR, SYSTEM, USER, Renders
from .reasoning import reasoning_for
from .st_presets import ContextPreset, Inexact, InstructPreset, PromptFormat

# Texts that end a turn in the families the bridge knows (besides the model's own EOS text).
END_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<turn|>", "<|end|>", "<|END_OF_TURN_TOKEN|>",
    "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|EOT|>", "</s>", "<|endoftext|>", "[/INST]",
)


@dataclass
class _Turns:
    """The pieces of a chat turn, as ST's instruct preset names them."""

    input_sequence: str
    input_suffix: str
    output_sequence: str
    output_suffix: str
    last_input_sequence: str = ""
    last_output_sequence: str = ""


def derive(template: str, *, name: str, bos_token: str = "", eos_token: str = "", family: str = "custom",
           now: Callable[[], datetime] = datetime.now) -> PromptFormat:
    """The ST presets that make ST's prompt the template's own. Raises ChatTemplateError when the
    template cannot write a plain user/assistant chat."""
    renders = probes.render_probes(template, bos_token=bos_token, eos_token=eos_token, now=now)
    writes_bos = bool(bos_token) and renders.chat.startswith(bos_token)
    chat = _strip(renders.chat, bos_token)
    inexact: list[Inexact] = []
    turns = _turns(chat, renders, eos_token, inexact)
    instruct = InstructPreset(
        name=name,
        input_sequence=turns.input_sequence,
        input_suffix=turns.input_suffix,
        output_sequence=turns.output_sequence,
        output_suffix=turns.output_suffix,
        last_input_sequence=turns.last_input_sequence,
        last_output_sequence=turns.last_output_sequence,
        stop_sequence=stop_sequence(turns.output_suffix, eos_token),
    )
    standalone = _system(instruct, renders, chat, bos_token, inexact)
    _greeting(instruct, renders, bos_token, standalone, inexact)
    if not standalone:  # the story string is a user turn of its own, closed where a user turn ends
        closing = _turn_end(instruct.input_suffix, [], None, eos_token)
        instruct.story_string_suffix = closing or instruct.input_suffix
    reasoning = reasoning_for(template, name=name)
    notes = _notes(writes_bos, bos_token, instruct, reasoning is not None)
    if renders.greeting is None and renders.bare_greeting is None:
        notes.append("The template refuses a chat that opens with the character's greeting (its roles must "
                     "alternate, user first); ST sends the greeting as an ordinary reply.")
    return PromptFormat(
        name=name, source="template", family=family, instruct=instruct, context=ContextPreset(name=name),
        reasoning=reasoning, bos_token=bos_token if writes_bos else "", template_writes_bos=writes_bos,
        inexact=inexact, notes=notes,
    )


# --- turns -------------------------------------------------------------------------------------------


def _turns(chat: str, renders: Renders, eos: str, inexact: list[Inexact]) -> _Turns:
    pieces = probes.between(chat, probes.CHAT_ORDER)
    if pieces is None:
        raise ChatTemplateError("the chat template does not write a chat's messages in order")
    _head, ua1, au1, ua2, au2, tail = pieces
    if ua1 != ua2:
        inexact.append(Inexact("assistant_turns", "the template opens the first assistant turn differently "
                                                  f"({ua1!r}) from later ones ({ua2!r})"))
    input_suffix = _turn_end(ua2, [tail], probes.after(renders.user_only, USER[0]), eos)
    input_suffix = _leave_some(input_suffix, ua2, tail)
    output_sequence, last_output = ua2[len(input_suffix):], tail[len(input_suffix):]
    if not last_output and output_sequence:
        inexact.append(Inexact("generation_prompt", "the template opens the reply with nothing, which ST "
                                                    "reads as 'use the output sequence'"))
    output_suffix = _turn_end(au1, [au2], probes.after(renders.user_assistant, ASSISTANT[0]), eos)
    output_suffix = _leave_some(output_suffix, au1, au2)
    input_sequence, last_input = au1[len(output_suffix):], au2[len(output_suffix):]
    if not last_input and input_sequence:
        inexact.append(Inexact("last_user_turn", "the template opens the last user turn with nothing"))
    return _Turns(
        input_sequence=input_sequence,
        input_suffix=input_suffix,
        output_sequence=output_sequence,
        output_suffix=output_suffix,
        last_input_sequence=last_input if last_input != input_sequence else "",
        last_output_sequence=last_output if last_output != output_sequence else "",
    )


def _turn_end(gap: str, others: list[str], hint: str | None, eos: str) -> str:
    """Where, in the text between two messages, one turn ends and the next begins.

    `hint` is what the template writes after the same kind of message when it is the last one: when the
    gap (and every other gap of that kind) starts with it, that is the turn's end. Otherwise the end is the
    first end-of-turn marker with the newlines after it, or the gap's leading whitespace."""
    every = [gap, *others]
    if hint and all(g.startswith(hint) for g in every):
        return hint
    markers = [m for m in (eos, *END_MARKERS) if m]
    hits = [(gap.find(m), m) for m in markers if gap.find(m) >= 0]
    if hits:
        at, marker = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
        end = at + len(marker)
        end += len(gap[end:]) - len(gap[end:].lstrip("\n"))
        if all(g.startswith(gap[:end]) for g in every):
            return gap[:end]
    lead = gap[: len(gap) - len(gap.lstrip())]
    return lead if all(g.startswith(lead) for g in every) else ""


def _leave_some(end: str, gap: str, last_gap: str) -> str:
    """ST reads an empty last sequence as "use the normal one": when the last gap is all turn end but the
    normal gap is not, the turn end moves into the sequences from its last marker on (Mistral's
    `[/INST]` then opens the reply: `[/INST] ` before an old reply, `[/INST]` before a new one)."""
    if last_gap[len(end):] or not gap[len(end):]:
        return end
    markers = list(_MARKER.finditer(end))
    return end[: markers[-1].start()] if markers else ""


_MARKER = re.compile(r"<[^<>\s]+>|\[/?[A-Z_]+\]")


def stop_sequence(output_suffix: str, eos: str) -> str:
    """The text that ends a reply: the end-of-turn marker in the output suffix."""
    for marker in (eos, *END_MARKERS):
        if marker and marker in output_suffix:
            return marker
    return output_suffix.strip()


# --- the system prompt -------------------------------------------------------------------------------


def _system(instruct: InstructPreset, renders: Renders, chat: str, bos: str, inexact: list[Inexact]) -> bool:
    """Story string prefix and suffix (ST's system prompt block), and the sequences of system messages.
    False when the template has no system block of its own (the story string then becomes a user turn)."""
    problem = _standalone_system(instruct, renders, chat, bos)
    if problem is None:
        _narrator(instruct, renders, bos)
        return True
    # Closest: the story string as a user turn of its own (its closing is set once the turns are final),
    # and system messages written as user ones.
    instruct.story_string_prefix = instruct.input_sequence
    instruct.system_same_as_user = True
    inexact.append(Inexact("system_prompt", f"{problem}; ST's story string is a block of its own, so it is "
                                            "sent as a separate user turn before the chat"))
    return False


def _greeting(instruct: InstructPreset, renders: Renders, bos: str, standalone: bool,
              inexact: list[Inexact]) -> None:
    """How the template opens the character's greeting, the assistant message an ST chat starts with.

    Where it is not the output sequence, either the template writes the reply's opening with the user's
    turn (the original Llama 3 template always ends a user turn with the assistant header): the gap is
    split again so that the opening belongs to the assistant; or it opens a first reply differently, which
    is ST's first output sequence."""
    opening = _greeting_opening(instruct, renders, bos, standalone)
    if opening is None or opening == instruct.output_sequence:
        return
    gap = instruct.input_suffix + instruct.output_sequence
    tail = instruct.input_suffix + (instruct.last_output_sequence or instruct.output_sequence)
    split = len(gap) - len(opening)
    if opening and gap.endswith(opening) and tail.startswith(gap[:split]) and tail[split:]:
        instruct.input_suffix = gap[: len(gap) - len(opening)]
        instruct.output_sequence = opening
        last = tail[len(instruct.input_suffix):]
        instruct.last_output_sequence = last if last != opening else ""
    elif opening:
        instruct.first_output_sequence = opening
    else:
        inexact.append(Inexact("greeting", "the template writes the character's greeting with no opening, "
                                           "which ST reads as 'use the output sequence'"))


def _greeting_opening(instruct: InstructPreset, renders: Renders, bos: str, standalone: bool) -> str | None:
    """What the template writes before a greeting that follows the system block (or opens the chat)."""
    if standalone and renders.greeting:
        pieces = probes.between(_strip(renders.greeting, bos), [SYSTEM, GREETING_MARK])
        if pieces and pieces[1].startswith(instruct.story_string_suffix):
            return pieces[1][len(instruct.story_string_suffix):]
    if not standalone and renders.bare_greeting:
        pieces = probes.between(_strip(renders.bare_greeting, bos), [GREETING_MARK])
        return pieces[0] if pieces else None
    return None


def _standalone_system(instruct: InstructPreset, renders: Renders, chat: str, bos: str) -> str | None:
    """Fill the story string prefix/suffix when the template writes the system message as a block of its
    own before the chat; otherwise say what it does instead."""
    if renders.with_system is None:
        return f"the template refuses a system message ({renders.system_error})"
    full = _strip(renders.with_system, bos)
    if SYSTEM not in full:
        return "the template leaves system messages out"
    pieces = probes.between(full, [SYSTEM, USER[0]])
    if pieces is None:
        where = "last" if full.find(SYSTEM) > full.find(USER[2]) else "a later"
        return f"the template writes the system prompt inside the {where} user message"
    head, gap, _rest = pieces
    if instruct.input_sequence and not gap.endswith(instruct.input_sequence):
        return (f"the template writes the system prompt inside the first user message "
                f"({gap!r} between them)")
    if full[full.index(USER[0]):] != chat[chat.index(USER[0]):]:
        return "a system message changes how the template writes the rest of the chat"
    instruct.story_string_prefix = head
    instruct.story_string_suffix = gap[: len(gap) - len(instruct.input_sequence)]
    return None


def _narrator(instruct: InstructPreset, renders: Renders, bos: str) -> None:
    """System messages inside the chat (ST's narrator): the sequence the template writes around one. A
    template that drops or refuses them gets them as user turns, which it does write."""
    text = _strip(renders.narrator, bos) if renders.narrator else None
    pieces = probes.between(text, [ASSISTANT[0], NARRATOR, USER[1]]) if text else None
    if pieces is not None:
        _before, opening, closing, _after = pieces
        if opening.startswith(instruct.output_suffix) and closing.endswith(instruct.input_sequence):
            instruct.system_sequence = opening[len(instruct.output_suffix):]
            instruct.system_suffix = closing[: len(closing) - len(instruct.input_sequence)]
            return
    instruct.system_same_as_user = True


# --- helpers -------------------------------------------------------------------------------------------


def _strip(text: str, bos: str) -> str:
    """The render without the BOS text at its start: the bridge adds the BOS token itself."""
    return text[len(bos):] if bos and text.startswith(bos) else text


def _notes(writes_bos: bool, bos: str, instruct: InstructPreset, reasoning: bool) -> list[str]:
    notes = []
    if writes_bos:
        notes.append(f"The template begins with the BOS token {bos}: the bridge adds it to every prompt "
                     "(keep SillyTavern's 'Add BOS token' on), so the presets leave it out.")
    opening = instruct.last_output_sequence or instruct.output_sequence
    if reasoning and re.search(r"<think>\s*$|\[THINK\]\s*$", opening):
        notes.append("The generation prompt opens the thinking block: replies begin with the thoughts.")
    return notes
