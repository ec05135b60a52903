"""ST's samplers (`SamplingParams`) as a llama.cpp native sampler chain.

The chain is built once per request and runs entirely in C (`llama_sampler_sample`), so sampling costs no
Python per candidate. Its layout, as llama.cpp's own `common_sampler` builds it:

    logit bias (+ banned tokens, + EOG tokens when ignore_eos)   always first: a ban is a ban
    grammar (GBNF)                                                before any cut, so a valid token survives
    the samplers in the request's order (`order`, CHAIN_ORDER's names), each only when it is on
    mirostat 1/2, or dist(seed), or greedy when temperature <= 0  picks the token

Repetition penalties and DRY look at history: `Chain.accept_history()` feeds them the prompt's tail, as
llama-server does, without touching the grammar (which must only see generated tokens).
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass, field

import llama_cpp

from bridge.engine.types import CHAIN_ORDER, SamplingParams
from bridge.errors import BadRequest


def resolve_seed(seed: int) -> int:
    """-1 (or any negative) means a fresh random seed; llama.cpp takes a uint32."""
    if seed < 0:
        return random.randrange(0, 2**32 - 1)
    return seed & 0xFFFFFFFF


@dataclass
class Chain:
    """A built sampler chain and the handles the worker needs; `free()` releases it."""

    sampler: llama_cpp.llama_sampler_p
    seed: int
    history_samplers: list[llama_cpp.llama_sampler_p] = field(default_factory=list)
    history_len: int = 0

    def accept_history(self, tokens: list[int]) -> None:
        """Let penalties and DRY see the prompt's last tokens (generated ones are accepted by sampling)."""
        if not self.history_samplers:
            return
        tail = tokens[-self.history_len:] if self.history_len > 0 else tokens
        for smpl in self.history_samplers:
            for token in tail:
                llama_cpp.llama_sampler_accept(smpl, token)

    def free(self) -> None:
        if self.sampler:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None  # type: ignore[assignment]


def build_chain(params: SamplingParams, *, vocab: llama_cpp.llama_vocab_p, n_vocab: int, n_ctx: int,
                eog_tokens: list[int]) -> Chain:
    """The llama.cpp sampler chain for `params`. Raises BadRequest for a grammar llama.cpp rejects."""
    seed = resolve_seed(params.seed)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    built = Chain(sampler=chain, seed=seed)
    try:
        _add_bias(chain, params, n_vocab, eog_tokens)
        if params.grammar.strip():
            _add(chain, _grammar(params.grammar, vocab))
        greedy = params.temperature <= 0 and params.mirostat == 0
        # Mirostat replaces the truncation samplers (llama.cpp's common_sampler does the same): temperature,
        # then mirostat picks.
        order = ["temperature"] if params.mirostat else params.order or CHAIN_ORDER
        for name in order:
            if greedy and name == "temperature":
                continue  # temp <= 0 keeps only the best token: that is exactly the greedy pick below
            smpl = _stage(name, params, vocab=vocab, n_vocab=n_vocab, n_ctx=n_ctx, seed=seed)
            if smpl is None:
                continue
            _add(chain, smpl)
            if name in ("penalties", "dry"):
                built.history_samplers.append(smpl)
        _add_picker(chain, params, n_vocab, seed, greedy)
    except BaseException:
        built.free()
        raise
    if built.history_samplers:
        built.history_len = _history_len(params, n_ctx)
    return built


def _add(chain: llama_cpp.llama_sampler_p, smpl: llama_cpp.llama_sampler_p | None) -> None:
    if not smpl:
        raise RuntimeError("llama.cpp could not create a sampler")
    llama_cpp.llama_sampler_chain_add(chain, smpl)


def _history_len(params: SamplingParams, n_ctx: int) -> int:
    lengths = []
    if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        lengths.append(n_ctx if params.repeat_last_n < 0 else params.repeat_last_n)
    if params.dry_multiplier > 0:
        lengths.append(n_ctx if params.dry_penalty_last_n < 0 else params.dry_penalty_last_n)
    return max(lengths, default=0)


def _add_bias(chain: llama_cpp.llama_sampler_p, params: SamplingParams, n_vocab: int,
              eog_tokens: list[int]) -> None:
    """Logit bias, banned tokens and (for ignore_eos) the end-of-generation tokens, in one sampler."""
    bias: dict[int, float] = {}
    for token, value in params.logit_bias.items():
        token = int(token)
        if not 0 <= token < n_vocab:
            raise BadRequest(f"logit_bias names token {token}, but the vocabulary has 0..{n_vocab - 1}")
        # OpenAI's -100 (and anything at or below it) means "never": make it a true ban.
        bias[token] = float("-inf") if value <= -100 else float(value)
    for token in params.banned_tokens:
        if 0 <= int(token) < n_vocab:
            bias[int(token)] = float("-inf")
    if params.ignore_eos:
        for token in eog_tokens:
            bias[token] = float("-inf")
    if not bias:
        return
    array = (llama_cpp.llama_logit_bias * len(bias))()
    for i, (token, value) in enumerate(bias.items()):
        array[i].token = token
        array[i].bias = value
    _add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), array))


def _grammar(grammar: str, vocab: llama_cpp.llama_vocab_p) -> llama_cpp.llama_sampler_p:
    smpl = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not smpl:
        raise BadRequest("the GBNF grammar could not be parsed (llama.cpp rejected it; check its rules)")
    return smpl


def _stage(name: str, p: SamplingParams, *, vocab: llama_cpp.llama_vocab_p, n_vocab: int, n_ctx: int,
           seed: int) -> llama_cpp.llama_sampler_p | None:
    """One sampler of the ordered part, or None when its settings make it a no-op."""
    if name == "top_k":
        return llama_cpp.llama_sampler_init_top_k(p.top_k) if p.top_k > 0 else None
    if name == "top_p":
        return llama_cpp.llama_sampler_init_top_p(p.top_p, 1) if 0 < p.top_p < 1 else None
    if name == "min_p":
        return llama_cpp.llama_sampler_init_min_p(p.min_p, 1) if 0 < p.min_p <= 1 else None
    if name == "typical_p":
        return llama_cpp.llama_sampler_init_typical(p.typical_p, 1) if 0 < p.typical_p < 1 else None
    if name == "top_n_sigma":
        return llama_cpp.llama_sampler_init_top_n_sigma(p.top_n_sigma) if p.top_n_sigma > 0 else None
    if name == "xtc":
        if p.xtc_probability <= 0 or p.xtc_threshold > 0.5:
            return None  # above 0.5 XTC can never find two tokens to cut between: llama.cpp's "off"
        return llama_cpp.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, 1, seed)
    if name == "temperature":
        if p.dynatemp_range > 0:
            return llama_cpp.llama_sampler_init_temp_ext(p.temperature, p.dynatemp_range, p.dynatemp_exponent)
        return llama_cpp.llama_sampler_init_temp(p.temperature)
    if name == "penalties":
        return _penalties(p, n_vocab, n_ctx)
    if name == "dry":
        return _dry(p, vocab, n_ctx)
    return None


def _penalties(p: SamplingParams, n_vocab: int, n_ctx: int) -> llama_cpp.llama_sampler_p | None:
    if p.repeat_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty:
        return None
    if p.repeat_penalty <= 0:
        raise BadRequest(f"repetition penalty must be above 0 (1.0 turns it off), got {p.repeat_penalty}")
    last_n = n_ctx if p.repeat_last_n < 0 else p.repeat_last_n
    if last_n == 0:
        return None
    return llama_cpp.llama_sampler_init_penalties(
        n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
    )


def _dry(p: SamplingParams, vocab: llama_cpp.llama_vocab_p, n_ctx: int) -> llama_cpp.llama_sampler_p | None:
    if p.dry_multiplier <= 0:
        return None
    breakers = [b.encode("utf-8") for b in p.dry_sequence_breakers if b]
    array = (ctypes.c_char_p * max(len(breakers), 1))(*breakers)
    last_n = n_ctx if p.dry_penalty_last_n < 0 else p.dry_penalty_last_n
    return llama_cpp.llama_sampler_init_dry(
        vocab, p.dry_multiplier, p.dry_base, p.dry_allowed_length, last_n, array, len(breakers)
    )


def _add_picker(chain: llama_cpp.llama_sampler_p, p: SamplingParams, n_vocab: int, seed: int,
                greedy: bool) -> None:
    """The sampler that picks the token: mirostat, greedy, or a seeded draw."""
    if p.mirostat == 1:
        _add(chain, llama_cpp.llama_sampler_init_mirostat(n_vocab, seed, p.mirostat_tau, p.mirostat_eta, 100))
    elif p.mirostat == 2:
        _add(chain, llama_cpp.llama_sampler_init_mirostat_v2(seed, p.mirostat_tau, p.mirostat_eta))
    elif greedy:
        _add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        _add(chain, llama_cpp.llama_sampler_init_dist(seed))
