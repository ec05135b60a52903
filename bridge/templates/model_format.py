"""The prompt format of a model file: derived from the chat template in its GGUF header, or, for a file
without one (or with one that does not work), guessed from its family and marked as a guess."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from ..errors import ChatTemplateError
from ..gguf import ModelInfo, model_info, read_file
from .derive import derive
from .families import FAMILY_EOS, FAMILY_LABELS, FAMILY_TEMPLATES, Guess, family_of_template, guess_family
from .st_presets import PromptFormat

log = logging.getLogger(__name__)
PRESET_SUFFIX = "(st-bridge)"


def format_for_file(path: Path, model_id: str, *, card_format: str | None = None,
                    now: Callable[[], datetime] = datetime.now) -> PromptFormat:
    """The prompt format for the GGUF at `path` (its header is read; nothing is loaded)."""
    header = read_file(path)
    info = model_info(header)
    tokens = header.get("tokenizer.ggml.tokens") or []
    return format_for_model(info, model_id, card_format=card_format, tokens=tokens, now=now)


def format_for_model(info: ModelInfo, model_id: str, *, card_format: str | None = None,
                     tokens: list[str] | None = None,
                     now: Callable[[], datetime] = datetime.now) -> PromptFormat:
    label = _label(info.name or Path(model_id).name)
    problem = ""
    if info.chat_template:
        try:
            fmt = derive(info.chat_template, name=f"{label} {PRESET_SUFFIX}", bos_token=info.bos_token or "",
                         eos_token=info.eos_token or "", family=family_of_template(info.chat_template),
                         now=now)
            fmt.template_sha256 = hashlib.sha256(info.chat_template.encode()).hexdigest()
            return fmt
        except ChatTemplateError as exc:
            log.warning("%s: %s; guessing its prompt format", model_id, exc.message)
            problem = exc.message
    guess = guess_family(card_format=card_format, names=[model_id, info.name or ""], tokens=tokens or [])
    return _guessed(guess, label, problem, now)


def _guessed(guess: Guess, label: str, problem: str, now: Callable[[], datetime]) -> PromptFormat:
    family_label = FAMILY_LABELS[guess.family]
    fmt = derive(FAMILY_TEMPLATES[guess.family], name=f"{label} (st-bridge, guessed {family_label})",
                 eos_token=FAMILY_EOS.get(guess.family, ""), family=guess.family, now=now)
    fmt.source = "guess"
    why = f"its chat template does not work ({problem})" if problem else "it has no chat template"
    fmt.guess_reason = f"{family_label}, from {guess.reason}; {why}"
    return fmt


def _label(name: str) -> str:
    """A preset name ST can store as a file: letters, digits, spaces and . _ - ( ) only."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._()-]+", " ", name).strip()
    return re.sub(r"\s+", " ", cleaned)[:60] or "model"
