"""Where SillyTavern's own shipped presets differ from the models' templates (README "Prompt formats").

The same proof as test_prompt_format_proof.py, run with the instruct and context presets ST ships for each
family (as installed from npm) instead of the derived ones: does ST, with its own preset for the family,
write the model's own prompt? Once with a system prompt (the story string) and once without one. The
tables below are the answer for each release; the README explains each difference.
"""

from __future__ import annotations

from bridge.errors import ChatTemplateError
from tests.fixtures.st_assembly import CHAT, MANIFEST, STORY, assemble, jinja_prompt, shipped_presets

# model -> (same with a system prompt, same without one); None: the template refuses a system prompt.
SAME_AS_TEMPLATE_1_19 = {
    "Meta-Llama-3-8B-Instruct": (True, True),
    "Llama-3.1-8B-Instruct": (False, False),  # no "Cutting Knowledge Date / Today Date" system header
    "Llama-3.2-3B-Instruct": (False, False),
    "Llama-3.3-70B-Instruct": (False, False),
    "Qwen2.5-7B-Instruct": (True, False),  # without a system prompt Qwen 2.5 writes its default one
    "Qwen3-0.6B": (True, True),
    "QwQ-32B": (False, False),  # the generation prompt's <think> block is missing
    "Mistral-Nemo-Instruct-2407": (False, True),  # story string as an [INST] turn + "Understood."
    "Mistral-Small-3.2-24B-Instruct-2506": (True, False),  # no default system prompt without one
    "Mistral-Large-Instruct-2411": (False, False),  # "[/INST] " with a space before the reply
    "Mistral-7B-Instruct-v0.2": (None, False),  # "[/INST]" spacing differs from the template's
    "gemma-2-2b-it": (None, True),
    "gemma-7b-it": (None, True),
    "gemma-4-31B-it": (False, False),  # no empty thought channel after "<|turn>model\n"
    "Phi-3.5-mini-instruct": (True, True),
    "Phi-3-mini-4k-instruct": (False, True),  # a <|system|> block the template never writes
    "c4ai-command-r-plus": (True, True),
    "c4ai-command-r7b-12-2024 (tool_use)": (False, False),  # no preamble, no <|START_RESPONSE|>
    "DeepSeek-R1-Distill-Llama-8B": (False, False),  # no "<think>\n" after "<｜Assistant｜>"
    "DeepSeek-R1-Distill-Qwen-32B": (False, False),
    "glm-4-9b-chat": (False, False),  # story string without "<|system|>", turns without newlines
    "GLM-4.6": (False, False),
    "GLM-4.7-Flash": (False, False),
    "OpenHermes-2.5-Mistral-7B": (True, True),
    "Hermes-2-Pro-Llama-3-8B (tool_use)": (False, False),  # no tool-use system preamble
    "Hermes-3-Llama-3.1-8B (tool_use)": (False, False),
    "SmolLM3-3B": (False, False),  # ChatML without SmolLM 3's metadata system header
    "gpt-oss-120b": (False, False),  # Harmony without the model's own system message (date, channels)
    "deepseek-coder-33b-instruct": (False, False),  # Alpaca's blank lines; this template has none
}


def _verdicts(version: str) -> dict[str, tuple[bool | None, bool]]:
    cases, entries = [], {}
    for entry in MANIFEST["templates"]:
        try:
            presets = shipped_presets(version, entry["st_preset"]) if entry["st_preset"] else None
        except FileNotFoundError:  # this release has no preset for the family
            presets = None
        if presets is None:
            continue
        entries[entry["model"]] = entry
        cases += [{"id": entry["model"], "presets": presets, "story": STORY, "chat": CHAT},
                  {"id": f"{entry['model']}|no system", "presets": presets, "story": {}, "chat": CHAT}]
    answers = assemble(version, cases)
    verdicts: dict[str, tuple[bool | None, bool]] = {}
    for model, entry in entries.items():
        try:
            with_system: bool | None = answers[model]["prompt"] == jinja_prompt(entry)
        except ChatTemplateError:
            with_system = None
        chat_only = answers[f"{model}|no system"]["prompt"] == jinja_prompt(entry, system=False)
        verdicts[model] = (with_system, chat_only)
    return verdicts


def test_sillytavern_1_19_presets_against_the_templates() -> None:
    assert _verdicts("1.19.0") == SAME_AS_TEMPLATE_1_19


def test_sillytavern_1_12_presets_never_write_these_models_prompts() -> None:
    """1.12's presets write names ("User: ...") in every message (names_behavior "always") and older story
    strings: none of them gives any of these models its own prompt."""
    verdicts = _verdicts("1.12.14")
    assert verdicts and not any(with_system or chat_only for with_system, chat_only in verdicts.values())
