"""Dialect bodies → one `GenerationRequest`: ST's many names and shapes for the same sampler settings.

Shapes handled here (st-integration.md A.2): `seed` -1 = random; `dry_sequence_breakers` as a JSON string
or an array; `logit_bias` as an object `{"id": bias}` or a list of pairs `[[id, bias | false]]` (false and
-100 ban the token); `custom_token_bans` as a comma-separated string; `sampler_order` in KoboldCpp's
numbering, `samplers` in llama.cpp's names and `sampler_priority` in text-generation-webui's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..engine.types import CHAIN_ORDER, GenerationRequest, SamplingParams
from ..errors import BadRequest
from .schemas import SamplerBody

log = logging.getLogger(__name__)

Tokenize = Callable[[str], list[int]]
Body = TypeVar("Body", bound=BaseModel)

DEFAULT_MAX_TOKENS = 256
BAN_BIAS = -100.0  # OpenAI's and KoboldCpp's "never pick this token"
MAX_BIAS = 1000.0  # a logit raised further only overflows llama.cpp's float32 logits

# KoboldCpp's sampler_order numbers (ST sends [6,0,1,3,4,2,5]); top_a (1) and tfs (3) have no
# llama.cpp sampler.
KOBOLD_ORDER = {0: "top_k", 1: None, 2: "top_p", 3: None, 4: "typical_p", 5: "temperature", 6: "penalties"}

# llama.cpp `samplers` and text-generation-webui `sampler_priority` names → the chain's names
# (CHAIN_ORDER); None: a sampler llama.cpp does not have.
_SPELLINGS: dict[str, str | None] = {
    "top_k": "top_k",
    "top_p": "top_p",
    "nucleus": "top_p",
    "min_p": "min_p",
    "xtc": "xtc",
    "dry": "dry",
    "typical_p": "typical_p",
    "typ_p": "typical_p",
    "typ": "typical_p",
    "typical": "typical_p",
    "temperature": "temperature",
    "temp": "temperature",
    "dynamic_temperature": "temperature",
    "top_n_sigma": "top_n_sigma",
    "penalties": "penalties",
    "repetition_penalty": "penalties",
    "presence_penalty": "penalties",
    "frequency_penalty": "penalties",
    "tfs_z": None,
    "tfs": None,
    "top_a": None,
    "mirostat": None,
    "quadratic_sampling": None,
    "epsilon_cutoff": None,
    "eta_cutoff": None,
    "encoder_repetition_penalty": None,
    "no_repeat_ngram": None,
}
# llama-server also reads each underscored name with dashes ("top-k") and without them ("topk").
SAMPLER_NAMES: dict[str, str | None] = _SPELLINGS | {
    variant: chain
    for name, chain in _SPELLINGS.items()
    if "_" in name
    for variant in (name.replace("_", "-"), name.replace("_", ""))
}

HONOURED = [
    "temperature",
    "dynatemp_range",
    "dynatemp_exponent",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "top_n_sigma",
    "xtc_threshold",
    "xtc_probability",
    "rep_pen",
    "rep_pen_range",
    "frequency_penalty",
    "presence_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "seed",
    "logit_bias",
    "custom_token_bans",
    "grammar",
    "ban_eos_token",
    "min_tokens",
    "n_probs",
    "stop",
    "sampler_order",
    "samplers",
]
# Accepted so ST's bodies work, but they change nothing; a request that turns one on is logged.
IGNORED_WHEN_ACTIVE: dict[str, Any] = {
    "top_a": 0,
    "tfs": 1,
    "rep_pen_slope": 1,
    "smoothing_factor": 0,
    "skew": 0,
    "guidance_scale": 1,
    "epsilon_cutoff": 0,
    "eta_cutoff": 0,
    "encoder_repetition_penalty": 1,
    "no_repeat_ngram_size": 0,
    "penalty_alpha": 0,
    "num_beams": 1,
    "max_tokens_second": 0,
}


def parse(model: type[Body], raw: Any) -> Body:
    """Validate a JSON body, with a message naming the fields that are wrong."""
    if not isinstance(raw, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"invalid request: {problems}") from exc


def to_request(
    body: SamplerBody,
    prompt: str | list[int],
    *,
    n_ctx: int,
    tokenize: Tokenize,
    ooba: bool = False,
    raw: dict[str, Any] | None = None,
) -> GenerationRequest:
    """The engine request for a dialect body. `ooba` selects text-generation-webui's meaning of 0 ranges."""
    if raw:
        _log_ignored(raw)
    return GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens(body.max_tokens, n_ctx),
        stop=stop_strings(body.stop),
        sampling=sampling(body, tokenize, ooba=ooba),
        add_bos=body.add_bos_token if body.add_bos_token is not None else True,
        stream=body.stream,
        n=body.n,
    )


def max_tokens(value: int | None, n_ctx: int) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if value <= 0:  # llama.cpp's n_predict -1: until the context is full
        return max(n_ctx, 1)
    return min(value, n_ctx) if n_ctx else value


def stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [s for s in value if isinstance(s, str) and s]
    raise BadRequest("`stop` must be a string or an array of strings")


def sampling(body: SamplerBody, tokenize: Tokenize, *, ooba: bool = False) -> SamplingParams:
    params = SamplingParams()
    _copy_plain(body, params)
    _apply_dynatemp(body, params)
    if body.repeat_last_n is not None:
        params.repeat_last_n = _range(body.repeat_last_n, ooba)
    if body.dry_penalty_last_n is not None:
        params.dry_penalty_last_n = _range(body.dry_penalty_last_n, ooba)
    if body.dry_sequence_breakers is not None:
        params.dry_sequence_breakers = sequence_breakers(body.dry_sequence_breakers)
    params.seed = body.seed if body.seed is not None and body.seed >= 0 else -1
    params.ignore_eos = bool(body.ban_eos_token or body.ignore_eos)
    params.grammar = grammar(body)
    params.logit_bias, params.banned_tokens = logit_bias(body.logit_bias, tokenize)
    params.banned_tokens = sorted(set(params.banned_tokens) | set(token_bans(body.custom_token_bans)))
    params.order = sampler_order(body)
    return params


_PLAIN = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "top_n_sigma",
    "xtc_threshold",
    "xtc_probability",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "min_tokens",
    "n_probs",
]


def _copy_plain(body: SamplerBody, params: SamplingParams) -> None:
    for name in _PLAIN:
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    if params.top_k < 0:
        params.top_k = 0
    params.n_probs = max(0, min(params.n_probs, 100))


def _apply_dynatemp(body: SamplerBody, params: SamplingParams) -> None:
    if body.dynatemp_exponent is not None:
        params.dynatemp_exponent = body.dynatemp_exponent
    if body.dynatemp_range is not None:  # llama.cpp: temperature ± range
        params.dynatemp_range = max(0.0, body.dynatemp_range)
    if body.dynamic_temperature and body.dynatemp_low is not None and body.dynatemp_high is not None:
        low, high = sorted((body.dynatemp_low, body.dynatemp_high))
        params.temperature = (low + high) / 2
        params.dynatemp_range = (high - low) / 2


def _range(value: int, ooba: bool) -> int:
    """text-generation-webui reads a range of 0 as 'all tokens'; llama.cpp and KoboldCpp as 'none'."""
    return -1 if ooba and value == 0 else value


def sequence_breakers(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            value = [value]  # a single breaker given as a plain string
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest("`dry_sequence_breakers` must be an array of strings or a JSON string of one")
    return value


def grammar(body: SamplerBody) -> str:
    if body.json_schema:
        from llama_cpp.llama_grammar import json_schema_to_gbnf  # heavy import, only when asked

        try:
            return json_schema_to_gbnf(json.dumps(body.json_schema))
        except Exception as exc:  # the converter asserts on what it does not know: the client's schema
            why = exc or type(exc).__name__
            raise BadRequest(f"`json_schema` cannot be turned into a grammar: {why}") from exc
    return body.grammar or body.grammar_string or ""


def logit_bias(value: Any, tokenize: Tokenize) -> tuple[dict[int, float], list[int]]:
    """(biases, banned ids) from an object or a list of pairs; ids may be strings, text is tokenized."""
    if not value:
        return {}, []
    pairs = value.items() if isinstance(value, dict) else value
    if not isinstance(pairs, Iterable) or isinstance(pairs, str):
        raise BadRequest("`logit_bias` must be an object {token: bias} or a list of [token, bias] pairs")
    biases: dict[int, float] = {}
    banned: list[int] = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise BadRequest(f"`logit_bias` entry {pair!r} is not a [token, bias] pair")
        key, bias = pair
        for token in _bias_tokens(key, tokenize):
            if bias is False or (
                isinstance(bias, int | float) and not isinstance(bias, bool) and bias <= BAN_BIAS
            ):
                banned.append(token)
            elif isinstance(bias, int | float) and not isinstance(bias, bool) and bias <= MAX_BIAS:
                biases[token] = float(bias)
            else:
                raise BadRequest(f"`logit_bias` for token {key!r} must be false or a number up to "
                                 f"{MAX_BIAS:g} ({BAN_BIAS:g} or less bans it)")
    return biases, banned


def _bias_tokens(key: Any, tokenize: Tokenize) -> list[int]:
    if isinstance(key, int) and not isinstance(key, bool):
        return [key]
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return [int(key)]
    if isinstance(key, str) and key:  # llama.cpp: a string biases each of its tokens
        return tokenize(key)
    raise BadRequest(f"`logit_bias` key {key!r} is not a token id or text")


def token_bans(value: Any) -> list[int]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRequest('`custom_token_bans` must be token ids separated by commas, e.g. "13,198", '
                         "or a list of them")
    try:
        return [int(str(item).strip()) for item in items if str(item).strip()]
    except ValueError as exc:
        raise BadRequest('`custom_token_bans` must be token ids separated by commas, e.g. "13,198"') from exc


def sampler_order(body: SamplerBody) -> list[str]:
    """The chain order in CHAIN_ORDER's names, or [] for llama.cpp's default."""
    if body.sampler_order:
        named = [KOBOLD_ORDER.get(n) for n in body.sampler_order]
    elif body.samplers:
        named = [SAMPLER_NAMES.get(n.lower()) for n in body.samplers]
    elif body.sampler_priority:
        named = [SAMPLER_NAMES.get(n.lower()) for n in body.sampler_priority]
    else:
        return []
    order = _complete(list(dict.fromkeys(n for n in named if n)))
    if body.temperature_last:
        order = [n for n in order if n != "temperature"] + ["temperature"]
    return order


def _complete(order: list[str]) -> list[str]:
    """Add the samplers the request left out, each after its predecessor in llama.cpp's default order
    (llama-server does the same), so a sampler that is switched on still applies."""
    for index, name in enumerate(CHAIN_ORDER):
        if name in order:
            continue
        before = [n for n in CHAIN_ORDER[:index] if n in order]
        order.insert(order.index(before[-1]) + 1 if before else 0, name)
    return order


def _log_ignored(raw: dict[str, Any]) -> None:
    active = [
        name for name, off in IGNORED_WHEN_ACTIVE.items() if name in raw and raw[name] not in (off, None)
    ]
    if raw.get("banned_strings"):
        active.append("banned_strings")
    if active:
        log.info("request sets samplers this bridge does not apply: %s", ", ".join(active))
