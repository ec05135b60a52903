"""Prompt-format families: which one a template is, and the format to guess for a model without one.

Older GGUFs (Kunoichi, most Llama 2 and Mistral 7B fine-tunes) carry no chat template; their model cards
name the format instead ("Prompt template: Alpaca"). For those the bridge picks the family the card, the
model's name or its vocabulary implies, and derives the presets from that family's own template, below,
marked as a guess with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Each family's template, written as the family's models are prompted (the BOS token is the bridge's).
FAMILY_TEMPLATES: dict[str, str] = {
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
        "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + '</s>' }}"
        "{% else %}{{ raise_exception('Mistral has no system role') }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "metharme": (
        "{% for m in messages %}{% set tag = {'system': '<|system|>', 'user': '<|user|>'}.get(m['role'], "
        "'<|model|>') %}{{ tag + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|model|>' }}{% endif %}"
    ),
    "vicuna": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'ASSISTANT: ' + m['content'] + '</s>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}
FAMILY_EOS = {"mistral": "</s>", "vicuna": "</s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
FAMILY_LABELS = {
    "alpaca": "Alpaca", "chatml": "ChatML", "llama3": "Llama 3", "mistral": "Mistral [INST]",
    "gemma": "Gemma", "metharme": "Metharme (Pygmalion)", "vicuna": "Vicuna",
}
DEFAULT_FAMILY = "alpaca"  # what most template-less role-play fine-tunes of 2023-24 were trained on

# Words in a model card's "prompt format" line or a model's name, and the family each means. Order
# matters: a card line "Alpaca ... ChatML" names Alpaca first.
_WORDS = (
    (r"\balpaca\b", "alpaca"), (r"\bchat ?ml\b", "chatml"), (r"\bllama[ -]?3|\bl3\b|\bl3[.-]", "llama3"),
    (r"\bmetharme\b|\bpygmalion\b", "metharme"), (r"\bgemma\b", "gemma"), (r"\bvicuna\b", "vicuna"),
    (r"\bmi[sx]tral\b|\[inst\]", "mistral"), (r"\bqwen|\bhermes\b|\bdolphin\b|\byi\b", "chatml"),
)
# Special tokens in a vocabulary, and the family whose turns they mark.
_TOKENS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
           ("[INST]", "mistral"))
# Texts in a chat template that name its family (for the `family` field of derived formats).
_TEMPLATE_MARKS = (
    ("<|start_header_id|>", "llama3"), ("<|im_sep|>", "phi4"), ("<|im_start|>", "chatml"),
    ("[SYSTEM_PROMPT]", "mistral-v7"), ("[INST]", "mistral"), ("<|turn>", "gemma4"),
    ("<start_of_turn>", "gemma"), ("<|user|>", "phi3"), ("<|START_OF_TURN_TOKEN|>", "command-r"),
    ("<｜User｜>", "deepseek"), ("<|start_of_role|>", "granite"), ("<|start|>", "gpt-oss"),
    ("[gMASK]", "glm"), ("### Instruction", "alpaca"),
)


@dataclass(frozen=True)
class Guess:
    family: str
    reason: str


def family_of_template(template: str) -> str:
    """The family a chat template belongs to, by the turn markers it writes ("custom" if none)."""
    return next((family for mark, family in _TEMPLATE_MARKS if mark in template), "custom")


def guess_family(*, card_format: str | None, names: list[str], tokens: list[str]) -> Guess:
    """The family of a model without a chat template: what its model card says, else its name, else the
    special tokens of its vocabulary, else Alpaca."""
    if card_format and (family := _by_words(card_format)):
        return Guess(family, f"the model card's prompt format: {card_format.split('(')[0].strip()}")
    for name in names:
        if name and (family := _by_words(name)):
            return Guess(family, f"the model's name ({name})")
    vocabulary = set(tokens)
    for token, family in _TOKENS:
        if token in vocabulary:
            return Guess(family, f"its vocabulary has the {token} token")
    return Guess(DEFAULT_FAMILY, "nothing names the format; Alpaca is what most template-less fine-tunes use")


def _by_words(text: str) -> str | None:
    lowered = text.lower()
    hits = [(m.start(), family) for pattern, family in _WORDS if (m := re.search(pattern, lowered))]
    return min(hits)[1] if hits else None
