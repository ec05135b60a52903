"""SillyTavern's Advanced Formatting presets, as the JSON ST itself saves: instruct, context and reasoning.

Field names and defaults follow ST 1.19's shipped presets (`default/content/presets/{instruct,context,
reasoning}/*.json`). ST 1.12 has no `story_string_prefix` / `story_string_suffix`; the extension folds those
into the story string there (st-extension/presets.js).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# ST 1.19's default story string (context preset "Default"): the character card's fields, one per line, with
# the trailing newlines trimmed. The derived context preset keeps this body; the model's own wrapping goes
# into the instruct preset's story_string_prefix / story_string_suffix.
STORY_STRING = (
    "{{#if anchorBefore}}{{anchorBefore}}\n{{/if}}{{#if system}}{{system}}\n{{/if}}"
    "{{#if wiBefore}}{{wiBefore}}\n{{/if}}{{#if description}}{{description}}\n{{/if}}"
    "{{#if personality}}{{personality}}\n{{/if}}{{#if scenario}}{{scenario}}\n{{/if}}"
    "{{#if wiAfter}}{{wiAfter}}\n{{/if}}{{#if persona}}{{persona}}\n{{/if}}"
    "{{#if anchorAfter}}{{anchorAfter}}\n{{/if}}{{trim}}"
)


@dataclass
class InstructPreset:
    """ST's instruct template. `wrap` is always off: every newline the model expects is in a sequence."""

    name: str
    input_sequence: str = ""
    input_suffix: str = ""
    output_sequence: str = ""
    output_suffix: str = ""
    system_sequence: str = ""
    system_suffix: str = ""
    first_input_sequence: str = ""
    first_output_sequence: str = ""
    last_input_sequence: str = ""
    last_output_sequence: str = ""
    last_system_sequence: str = ""
    stop_sequence: str = ""
    story_string_prefix: str = ""
    story_string_suffix: str = ""
    system_same_as_user: bool = False
    user_alignment_message: str = ""
    wrap: bool = False
    macro: bool = True
    names_behavior: Literal["none", "force", "always"] = "force"
    activation_regex: str = ""
    skip_examples: bool = False
    sequences_as_stop_strings: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ContextPreset:
    """ST's context template (story string and the chat's separators)."""

    name: str
    story_string: str = STORY_STRING
    example_separator: str = ""
    chat_start: str = ""
    use_stop_strings: bool = False
    names_as_stop_strings: bool = True
    story_string_position: int = 0  # in the prompt, before the chat (ST's IN_PROMPT)
    story_string_depth: int = 1
    story_string_role: int = 0
    always_force_name2: bool = True
    trim_sentences: bool = False
    single_line: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReasoningPreset:
    """ST's reasoning template: how a reply's thinking block is opened, closed and separated."""

    name: str
    prefix: str
    suffix: str
    separator: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Inexact:
    """A part of the model's template that ST's preset format cannot express; the preset does the closest."""

    part: str  # e.g. "system_prompt"
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class PromptFormat:
    """Everything ST needs to write a model's prompts, and how sure the bridge is of it."""

    name: str  # the name the presets are installed under in ST
    source: Literal["template", "guess"]
    family: str  # a family name when known ("llama3", "chatml", ...), else "custom"
    instruct: InstructPreset
    context: ContextPreset
    reasoning: ReasoningPreset | None = None
    bos_token: str = ""  # the BOS text the template writes; the bridge adds the BOS token itself
    template_writes_bos: bool = False
    inexact: list[Inexact] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    guess_reason: str = ""  # for a guess: why this family
    template_sha256: str = ""  # of the template derived from (ST's "Derive templates" hashes the same)

    @property
    def exact(self) -> bool:
        return not self.inexact

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "family": self.family,
            "exact": self.exact,
            "inexact": [i.to_dict() for i in self.inexact],
            "notes": self.notes,
            "guess_reason": self.guess_reason,
            "bos_token": self.bos_token,
            "template_writes_bos": self.template_writes_bos,
            "template_sha256": self.template_sha256,
            "instruct": self.instruct.to_dict(),
            "context": self.context.to_dict(),
            "reasoning": self.reasoning.to_dict() if self.reasoning else None,
        }
