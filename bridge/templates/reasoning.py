"""The reasoning (thinking) block of a template, as ST's reasoning preset: prefix, suffix, separator.

The tags come from the template text; the whitespace around them follows ST's own presets for the same
tags (DeepSeek for <think>, Gemma 4, OpenAI Harmony), which match how those models write their thoughts.
"""

from __future__ import annotations

from .st_presets import ReasoningPreset

# (text the template must contain, prefix, suffix, separator); the first match wins.
KNOWN = (
    ("<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>analysis<|message|>",
     "<|start|>assistant<|channel|>final<|message|>", ""),  # gpt-oss (ST's "OpenAI Harmony")
    ("<|channel>thought", "<|channel>thought\n", "<channel|>", "\n\n"),  # Gemma 4
    ("<|START_THINKING|>", "<|START_THINKING|>", "<|END_THINKING|>", "\n"),  # Command R7B / A
    ("[THINK]", "[THINK]", "[/THINK]", "\n\n"),  # Magistral
    ("<seed:think>", "<seed:think>", "</seed:think>", "\n\n"),  # Seed-OSS
    ("</think>", "<think>\n", "\n</think>", "\n\n"),  # DeepSeek R1, Qwen 3, GLM, SmolLM 3, ...
)


def reasoning_for(template: str, *, name: str) -> ReasoningPreset | None:
    """The reasoning preset for a template that writes thinking blocks, else None."""
    for needle, prefix, suffix, separator in KNOWN:
        if needle in template:
            return ReasoningPreset(name=name, prefix=prefix, suffix=suffix, separator=separator)
    return None
