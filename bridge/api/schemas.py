"""Request bodies of the three dialects and the management API, as pydantic models.

ST forwards its whole parameter object with several names for the same value (`max_tokens`, `n_predict`,
`max_new_tokens`...) plus keys of its own (`api_type`, `api_server`), so generation bodies ignore unknown
fields and list every alias with `AliasChoices`. Fields ST sends in more than one shape (`logit_bias`,
`dry_sequence_breakers`, `stop`) are typed loosely here and normalised in `translate.py`.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

MAX_SWIPES = 16  # replies one request may ask for (`n`); ST's "swipes per generation" goes to 10


def _alias(*names: str) -> Any:
    return Field(None, validation_alias=AliasChoices(*names))


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class SamplerBody(_Lenient):
    """Every sampler field the bridge reads, under all the names ST and the real servers use."""

    max_tokens: int | None = _alias("max_tokens", "n_predict", "max_new_tokens", "max_length", "num_predict")
    temperature: float | None = _alias("temperature", "temp")
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = _alias("typical_p", "typical")
    top_n_sigma: float | None = _alias("top_n_sigma", "nsigma")
    xtc_threshold: float | None = None
    xtc_probability: float | None = None
    repeat_penalty: float | None = _alias("rep_pen", "repetition_penalty", "repeat_penalty")
    repeat_last_n: int | None = _alias(
        "rep_pen_range", "repetition_penalty_range", "repeat_last_n", "penalty_last_n"
    )
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: Any = None  # a JSON-encoded string (ST 1.12) or an array
    mirostat: int | None = _alias("mirostat_mode", "mirostat")
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    seed: int | None = _alias("seed", "sampler_seed")
    dynamic_temperature: bool | None = None
    dynatemp_low: float | None = None
    dynatemp_high: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    logit_bias: Any = None  # {"id": bias} or [[id, bias | false], ...]
    custom_token_bans: Any = None  # "1,2,3" or a list of ids
    banned_strings: list[str] | None = None
    grammar: str | None = None
    grammar_string: str | None = None
    json_schema: dict[str, Any] | None = None
    ban_eos_token: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    n_probs: int | None = _alias("n_probs", "logprobs")
    stop: Any = _alias("stop", "stopping_strings", "stop_sequence")
    sampler_order: list[int] | None = None  # KoboldCpp numbering
    samplers: list[str] | None = None  # llama.cpp names
    sampler_priority: list[str] | None = None  # text-generation-webui names
    temperature_last: bool | None = None
    add_bos_token: bool | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_SWIPES)  # replies from one prompt (ST's multi-swipe; engine/swipes.py)


class CompletionBody(SamplerBody):
    """`POST /v1/completions` (KoboldCpp and text-generation-webui as ST calls them, and OpenAI)."""

    prompt: str | list[int] | list[str] = ""
    model: str | None = None


class LlamaCompletionBody(SamplerBody):
    """`POST /completion` (llama.cpp's server)."""

    prompt: str | list[int] | list[str | int] = ""


class KoboldGenerateBody(SamplerBody):
    """`POST /api/v1/generate` and `/api/extra/generate/stream` (KoboldAI's native API)."""

    prompt: str = ""


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = ""


class ChatCompletionBody(SamplerBody):
    messages: list[ChatMessage]
    model: str | None = None


class TokenizeBody(_Lenient):
    text: str = Field("", validation_alias=AliasChoices("text", "prompt", "content"))
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(_Lenient):
    tokens: list[int] = Field(default_factory=list, validation_alias=AliasChoices("tokens", "ids"))


class LoadBody(BaseModel):
    """`POST /bridge/v1/load`: our own API, so unknown fields are a mistake worth reporting."""

    model_config = ConfigDict(extra="forbid")

    model: str
    ctx: int | None = Field(None, ge=256)
    gpu_layers: int | str | None = None  # a number, or "auto"
    kv_type: str | None = Field(None, pattern=r"^(f16|q8_0|q4_0)$")
    flash_attn: bool | None = None
