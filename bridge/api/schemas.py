"""Request bodies of the three dialects and the management API, as pydantic models.

ST forwards its whole parameter object with several names for the same value (`max_tokens`, `n_predict`,
`max_new_tokens`...) plus keys of its own (`api_type`, `api_server`), so generation bodies ignore unknown
fields and list every alias with `AliasChoices`. Fields ST sends in more than one shape (`logit_bias`,
`dry_sequence_breakers`, `stop`) are typed loosely here and normalised in `translate.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

MAX_SWIPES = 16  # replies one request may ask for (`n`); ST's "swipes per generation" goes to 10

# Bounds of every number a request may carry. Generous (any value a client really sends passes), finite
# (nothing reaches llama.cpp's int32/float fields, or a loop, unbounded), and stated in the 400 a request
# outside them gets ("temperature: Input should be less than or equal to 100").
MAX_TOKENS = 1 << 20  # tokens: more than any context
MAX_CTX = 1 << 24  # context tokens a load may ask for
MAX_TOKEN_ID = (1 << 31) - 1  # llama_token is an int32
MAX_LAST_N = 1 << 24  # penalty windows (-1 = the whole context)
MAX_SEED = (1 << 64) - 1  # reduced to llama.cpp's uint32 by the engine
MAX_GPU_LAYERS = 10_000


def _alias(*names: str, **bounds: Any) -> Any:
    return Field(None, validation_alias=AliasChoices(*names), **bounds)


def _num(**bounds: Any) -> Any:
    return Field(None, **bounds)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
SamplerNumber = Annotated[int, Field(ge=0, le=99)]


class SamplerBody(_Lenient):
    """Every sampler field the bridge reads, under all the names ST and the real servers use."""

    max_tokens: int | None = _alias("max_tokens", "n_predict", "max_new_tokens", "max_length", "num_predict",
                                    ge=-1, le=MAX_TOKENS)
    temperature: float | None = _alias("temperature", "temp", ge=0, le=100)
    top_k: int | None = _num(ge=-1, le=MAX_TOKEN_ID)
    top_p: float | None = _num(ge=0, le=1)
    min_p: float | None = _num(ge=0, le=1)
    typical_p: float | None = _alias("typical_p", "typical", ge=0, le=1)
    top_n_sigma: float | None = _alias("top_n_sigma", "nsigma", ge=-1, le=100)
    xtc_threshold: float | None = _num(ge=0, le=1)
    xtc_probability: float | None = _num(ge=0, le=1)
    repeat_penalty: float | None = _alias("rep_pen", "repetition_penalty", "repeat_penalty", ge=0, le=100)
    repeat_last_n: int | None = _alias(
        "rep_pen_range", "repetition_penalty_range", "repeat_last_n", "penalty_last_n", ge=-1, le=MAX_LAST_N
    )
    frequency_penalty: float | None = _num(ge=-100, le=100)
    presence_penalty: float | None = _num(ge=-100, le=100)
    dry_multiplier: float | None = _num(ge=0, le=100)
    dry_base: float | None = _num(ge=0, le=100)
    dry_allowed_length: int | None = _num(ge=0, le=MAX_LAST_N)
    dry_penalty_last_n: int | None = _num(ge=-1, le=MAX_LAST_N)
    dry_sequence_breakers: Any = None  # a JSON-encoded string (ST 1.12) or an array
    mirostat: int | None = _alias("mirostat_mode", "mirostat", ge=0, le=2)
    mirostat_tau: float | None = _num(ge=0, le=100)
    mirostat_eta: float | None = _num(ge=0, le=100)
    seed: int | None = _alias("seed", "sampler_seed", ge=-(1 << 63), le=MAX_SEED)
    dynamic_temperature: bool | None = None
    dynatemp_low: float | None = _num(ge=0, le=100)
    dynatemp_high: float | None = _num(ge=0, le=100)
    dynatemp_range: float | None = _num(ge=0, le=100)
    dynatemp_exponent: float | None = _num(ge=0, le=100)
    logit_bias: Any = None  # {"id": bias} or [[id, bias | false], ...]
    custom_token_bans: Any = None  # "1,2,3" or a list of ids
    banned_strings: list[str] | None = None
    grammar: str | None = None
    grammar_string: str | None = None
    json_schema: dict[str, Any] | None = None
    ban_eos_token: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = _num(ge=0, le=MAX_TOKENS)
    n_probs: int | None = _alias("n_probs", "logprobs", ge=0, le=100)
    stop: Any = _alias("stop", "stopping_strings", "stop_sequence")
    sampler_order: list[SamplerNumber] | None = None  # KoboldCpp numbering
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
    tokens: list[TokenId] = Field(default_factory=list, validation_alias=AliasChoices("tokens", "ids"))


class LoadBody(BaseModel):
    """`POST /bridge/v1/load`: our own API, so unknown fields are a mistake worth reporting."""

    model_config = ConfigDict(extra="forbid")

    model: str
    ctx: int | None = Field(None, ge=256, le=MAX_CTX)
    gpu_layers: Annotated[int, Field(ge=-1, le=MAX_GPU_LAYERS)] | Literal["auto"] | None = None
    kv_type: str | None = Field(None, pattern=r"^(f16|q8_0|q4_0)$")
    flash_attn: bool | None = None
