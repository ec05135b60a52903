"""ST's samplers on the real engine (tiny random-weights model): each setting has the effect it promises."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bridge.api import translate
from bridge.api.schemas import SamplerBody
from bridge.engine.client import Engine
from bridge.engine.stops import StopScanner
from bridge.engine.types import (
    CHAIN_ORDER,
    GenerationRequest,
    GenerationResult,
    LoadSpec,
    SamplingParams,
    TokenChunk,
)
from bridge.errors import BadRequest

# Tests on the engine share one loaded model (and so one event loop) per module.
on_engine = pytest.mark.asyncio(loop_scope="module")

PROMPT = ("<|im_start|>user\nTell me the story of the dragon and the knight.<|im_end|>\n"
          "<|im_start|>assistant\n")
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model: Path) -> AsyncIterator[Engine]:
    engine = Engine()
    await engine.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=2048, n_threads=1))
    yield engine
    await engine.close()


async def run(engine: Engine, max_tokens: int = 32, stop: list[str] | None = None, prompt: str = PROMPT,
              **sampling: object) -> tuple[list[TokenChunk], GenerationResult]:
    req = GenerationRequest(prompt=prompt, max_tokens=max_tokens, stop=stop or [],
                            sampling=SamplingParams(**sampling))  # type: ignore[arg-type]
    items = [item async for item in engine.generate(req)]
    result = items[-1]
    assert isinstance(result, GenerationResult), result
    chunks = [c for c in items[:-1] if isinstance(c, TokenChunk)]
    assert "".join(c.text for c in chunks) == result.text  # what streamed is exactly the answer
    return chunks, result


def token_ids(chunks: list[TokenChunk]) -> list[int]:
    return [c.token_id for c in chunks if c.token_id is not None]


# ---- seeds -----------------------------------------------------------------------------------------------

@on_engine
async def test_a_fixed_seed_repeats_and_another_seed_differs(engine: Engine) -> None:
    first = (await run(engine, temperature=1.0, seed=42, ignore_eos=True))[1].text
    again = (await run(engine, temperature=1.0, seed=42, ignore_eos=True))[1].text
    other = (await run(engine, temperature=1.0, seed=43, ignore_eos=True))[1].text
    assert first == again
    assert other != first


@on_engine
async def test_seed_minus_one_is_random(engine: Engine) -> None:
    texts = {(await run(engine, temperature=1.0, seed=-1, ignore_eos=True))[1].text for _ in range(3)}
    assert len(texts) > 1


# ---- stop strings ----------------------------------------------------------------------------------------

@on_engine
async def test_stop_string_ends_generation_and_never_streams(engine: Engine) -> None:
    _, full = await run(engine, max_tokens=48, **GREEDY)
    # A stop string from the middle of the greedy text, so we know where generation must end.
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = full.text.index(stop)
    chunks, result = await run(engine, max_tokens=48, stop=[stop], **GREEDY)
    assert result.text == full.text[:cut]
    assert result.stop_type == "word" and result.stopping_word == stop
    streamed = "".join(c.text for c in chunks)
    assert stop not in streamed and streamed == full.text[:cut]  # not even its first characters


@on_engine
async def test_text_held_for_a_stop_string_that_never_completes_is_released(engine: Engine) -> None:
    _, full = await run(engine, max_tokens=24, **GREEDY)
    almost = full.text[-2:] + "\u2603never"  # starts like the text's tail, never matches
    chunks, result = await run(engine, max_tokens=24, stop=[almost], **GREEDY)
    assert result.text == full.text and result.stop_type == "limit"
    assert chunks[-1].token_id is None  # the held-back tail came as a final text-only chunk


def test_partial_utf8_and_held_stop_prefix() -> None:
    scanner = StopScanner(["END"])
    assert scanner.feed(b"caf\xc3") == "caf"  # half of "é" waits for its second byte
    assert scanner.feed(b"\xa9 E") == "\u00e9 "  # "E" might start "END": held
    assert scanner.feed(b"N") == ""
    assert scanner.feed(b"Dmore") == "" and scanner.stopped_by == "END"
    assert scanner.result == "caf\u00e9 "


# ---- bans, bias, grammar ---------------------------------------------------------------------------------

@on_engine
async def test_banned_tokens_never_appear(engine: Engine) -> None:
    chunks, _ = await run(engine, max_tokens=48, **GREEDY)
    common = [token for token, _ in Counter(token_ids(chunks)).most_common(3)]
    banned, _ = await run(engine, max_tokens=48, banned_tokens=common, **GREEDY)
    assert not set(token_ids(banned)) & set(common)
    assert len(token_ids(banned)) == 48


@on_engine
async def test_logit_bias_minus_100_removes_a_token(engine: Engine) -> None:
    chunks, _ = await run(engine, max_tokens=32, **GREEDY)
    first = token_ids(chunks)[0]
    biased, _ = await run(engine, max_tokens=32, logit_bias={first: -100.0}, **GREEDY)
    assert first not in token_ids(biased)


@on_engine
async def test_positive_logit_bias_forces_a_token(engine: Engine) -> None:
    favourite = engine.tokenize(" dragon")[-1]
    chunks, _ = await run(engine, max_tokens=8, logit_bias={favourite: 100.0}, **GREEDY)
    assert token_ids(chunks) == [favourite] * 8


@on_engine
async def test_grammar_allows_only_yes_or_no(engine: Engine) -> None:
    answers = set()
    for seed in range(6):
        _, result = await run(engine, max_tokens=16, temperature=1.5, seed=seed,
                              grammar='root ::= "yes" | "no"')
        assert result.text in ("yes", "no")
        assert result.stop_type == "eos"  # the grammar ends, so the model must stop
        answers.add(result.text)
    assert answers  # (both usually appear; either is valid)


@on_engine
async def test_a_broken_grammar_is_a_bad_request(engine: Engine) -> None:
    with pytest.raises(BadRequest, match="grammar"):
        await run(engine, grammar="root ::= (")
    assert (await run(engine, max_tokens=4, **GREEDY))[1].tokens_predicted == 4  # the engine is fine


# ---- end of generation -----------------------------------------------------------------------------------

@on_engine
async def test_eos_ignore_eos_and_min_tokens(engine: Engine) -> None:
    # For this prompt the tiny model's greedy reply ends with an end-of-generation token early.
    prompt = "Once upon a time"
    _, natural = await run(engine, max_tokens=64, prompt=prompt, temperature=0.0)
    assert natural.stop_type == "eos" and natural.tokens_predicted < 30
    _, ignored = await run(engine, max_tokens=64, prompt=prompt, temperature=0.0, ignore_eos=True)
    assert ignored.stop_type == "limit" and ignored.tokens_predicted == 64
    _, at_least = await run(engine, max_tokens=64, prompt=prompt, temperature=0.0, min_tokens=40)
    assert at_least.tokens_predicted >= 40


# ---- probabilities ---------------------------------------------------------------------------------------

@on_engine
async def test_n_probs_reports_sorted_top_candidates(engine: Engine) -> None:
    chunks, _ = await run(engine, max_tokens=6, n_probs=5, **GREEDY)
    for chunk in chunks:
        assert len(chunk.top) == 5
        logprobs = [p.logprob for p in chunk.top]
        assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
        assert chunk.top[0].token_id == chunk.token_id  # greedy picks the most likely
        assert chunk.logprob == pytest.approx(chunk.top[0].logprob)
    texts = [(c.top[0].token, c.text) for c in chunks if c.text and "\ufffd" not in c.text]
    assert texts and all(piece == text for piece, text in texts)  # each candidate carries its text


# ---- the other samplers ----------------------------------------------------------------------------------

SETTINGS = {
    "repetition penalty": {"repeat_penalty": 1.5, "repeat_last_n": 64},
    "frequency and presence": {"frequency_penalty": 1.0, "presence_penalty": 1.0},
    "dry": {"dry_multiplier": 2.0, "dry_allowed_length": 1, "dry_sequence_breakers": ["\n", ":"]},
}


@on_engine
@pytest.mark.parametrize("name", list(SETTINGS))
async def test_history_penalties_break_greedy_loops(engine: Engine, name: str) -> None:
    # Greedy decoding of random weights falls into a loop; every history penalty must push it out of it.
    plain, _ = await run(engine, max_tokens=64, **GREEDY)
    penalised, _ = await run(engine, max_tokens=64, **GREEDY, **SETTINGS[name])
    assert token_ids(penalised) != token_ids(plain)
    assert len(set(token_ids(penalised))) > len(set(token_ids(plain)))


@pytest.mark.parametrize("settings", [
    {"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.2}, {"typical_p": 0.5}, {"top_n_sigma": 1.0},
    {"xtc_probability": 1.0, "xtc_threshold": 0.05}, {"dynatemp_range": 0.5},
    {"mirostat": 1, "mirostat_tau": 3.0}, {"mirostat": 2, "mirostat_tau": 3.0},
], ids=lambda s: ",".join(s))
@on_engine
async def test_each_sampler_is_applied_and_seeded(engine: Engine, settings: dict[str, object]) -> None:
    base = {"temperature": 1.0, "seed": 7, "ignore_eos": True, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    _, reference = await run(engine, max_tokens=24, **base)
    _, once = await run(engine, max_tokens=24, **(base | settings))
    _, twice = await run(engine, max_tokens=24, **(base | settings))
    assert once.text == twice.text  # seeded: reproducible
    assert once.text != reference.text  # and it changed what was sampled


@on_engine
async def test_sampler_order_is_followed(engine: Engine) -> None:
    # min_p after a high temperature lets many more tokens through than min_p before it.
    settings = {"temperature": 3.0, "min_p": 0.3, "top_k": 0, "top_p": 1.0, "seed": 5, "ignore_eos": True}
    _, temp_first = await run(engine, max_tokens=32, order=["temperature", "min_p"], **settings)
    _, min_p_first = await run(engine, max_tokens=32, order=["min_p", "temperature"], **settings)
    assert temp_first.text != min_p_first.text


@on_engine
async def test_top_k_1_is_greedy(engine: Engine) -> None:
    greedy, _ = await run(engine, max_tokens=24, **GREEDY)
    top1, _ = await run(engine, max_tokens=24, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert token_ids(top1) == token_ids(greedy)


def test_order_accepts_llamacpp_ooba_and_koboldcpp_names() -> None:
    def order(**body: object) -> list[str]:
        return translate.sampler_order(SamplerBody.model_validate(body))

    assert order() == []  # the engine's default: CHAIN_ORDER
    named = order(samplers=["temp", "top-k", "bogus", "topk", "typ_p"])  # llama-server's spellings
    assert [n for n in named if n in ("temperature", "top_k", "typical_p")] == ["temperature", "top_k",
                                                                                "typical_p"]
    assert sorted(named) == sorted(CHAIN_ORDER)  # the rest keep their default place
    ooba = order(sampler_priority=["repetition_penalty", "top_a", "dynamic_temperature", "min_p"])
    assert ooba[0] == "penalties" and ooba.index("temperature") < ooba.index("min_p")
    kobold = order(sampler_order=[6, 0, 1, 3, 4, 2, 5])  # KoboldCpp's ids; 1 (top_a) and 3 (tfs) are gone
    assert [n for n in kobold if n in ("penalties", "top_k", "typical_p", "top_p", "temperature")] == [
        "penalties", "top_k", "typical_p", "top_p", "temperature"]
    assert order(samplers=["temperature", "top_k"], temperature_last=True)[-1] == "temperature"


# A value other than the neutral one for every name the bridge reports as honoured.
HONOURED_VALUES: dict[str, object] = {
    "temperature": 0.3, "dynatemp_range": 0.5, "dynatemp_exponent": 2.0, "top_k": 7, "top_p": 0.5,
    "min_p": 0.2, "typical_p": 0.5, "top_n_sigma": 1.5, "xtc_threshold": 0.2, "xtc_probability": 0.5,
    "rep_pen": 1.2, "rep_pen_range": 128, "frequency_penalty": 0.5, "presence_penalty": 0.5,
    "dry_multiplier": 0.8, "dry_base": 2.0, "dry_allowed_length": 3, "dry_penalty_last_n": 100,
    "dry_sequence_breakers": ["x"], "mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2, "seed": 5,
    "logit_bias": {"5": 2.0}, "custom_token_bans": "5,6", "grammar": 'root ::= "a"', "ban_eos_token": True,
    "min_tokens": 4, "n_probs": 3, "stop": ["x"], "sampler_order": [0, 2], "samplers": ["top_k"],
}


def _request(body: dict[str, object]) -> GenerationRequest:
    return translate.to_request(SamplerBody.model_validate(body), "p", n_ctx=2048,
                                tokenize=lambda text: [ord(c) for c in text])


def test_every_honoured_sampler_reaches_the_engine_and_ignored_ones_do_not() -> None:
    """The list `/props` and `/api/extra/version` report is the truth: each name changes the request."""
    assert sorted(HONOURED_VALUES) == sorted(translate.HONOURED)
    neutral = _request({})
    for name, value in HONOURED_VALUES.items():
        assert _request({name: value}) != neutral, name
    for name in translate.IGNORED_WHEN_ACTIVE:
        assert _request({name: 0.5}) == neutral, name
