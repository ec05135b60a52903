"""Several replies to one prompt for the price of one prompt (ST's "Multiple swipes per generation", `n`).

The prompt is evaluated once, into sequence 0 of the KV cache (with the usual reuse, `Runner.load_prompt`).
Its cells are then shared with sequences 1..k-1 (`llama_memory_seq_cp` only tags the cells: nothing is
copied or computed), every swipe samples its first token from the prompt's last logits with its own
sampler chain and seed, and from then on one `llama_decode` per step advances all swipes together: a batch
of k tokens, one per sequence, each at its own position. A swipe that ends (end of generation, a stop
string, its length) leaves the batch; when all have, the extra sequences are dropped and sequence 0 holds
the prompt and swipe 0, as after an ordinary reply.

A context holds `capacity()` sequences, fixed when it is created. Models whose cache grows with the number
of sequences (sliding-window layers keep a window per sequence, recurrent layers a state per sequence) get
one, which the planner counted; their swipes run one after another, each reusing the cached prompt (one
prompt token is evaluated again for its logits). So do the swipes beyond the capacity, a round at a time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from bridge.engine.sampling import Chain, build_chain
from bridge.engine.stops import StopScanner
from bridge.engine.types import GenerationRequest, GenerationResult, Timings, TokenChunk, TokenProb
from bridge.engine.vocab import token_piece

if TYPE_CHECKING:
    from bridge.engine.worker import Runner

MAX_PARALLEL = 8  # sequences a context gets for batched swipes; more swipes run in further rounds


def capacity(model: llama_cpp.llama_model_p) -> int:
    """Sequences a new context for `model` should hold: several, unless they cost memory per sequence."""
    if (llama_cpp.llama_model_n_swa(model) or llama_cpp.llama_model_is_recurrent(model)
            or llama_cpp.llama_model_is_hybrid(model)):
        return 1
    return MAX_PARALLEL


@dataclass
class _Swipe:
    """One reply being generated: its sequence, sampler chain, stop scanner and progress."""

    index: int  # the swipe's number in the answer (0 = the main reply)
    seq: int  # its KV sequence
    chain: Chain
    scanner: StopScanner
    limit: int  # tokens it may generate
    n: int = 0
    stop_type: str = "limit"
    decoded: list[int] = field(default_factory=list)  # generated tokens now in its sequence
    done: bool = False

    def result(self) -> GenerationResult:
        return GenerationResult(text=self.scanner.result, stop_type=self.stop_type,  # type: ignore[arg-type]
                                stopping_word=self.scanner.stopped_by, tokens_predicted=self.n,
                                index=self.index)


def run(runner: Runner, req: GenerationRequest, tokens: list[int], emit: Any, cancelled: Any,
        progress: Any = None) -> GenerationResult:
    """`Runner.generate` for `req.n` > 1: the prompt into the cache (once), then the swipes. The result is
    swipe 0's, the others in its `swipes`."""
    started = time.perf_counter()
    restored = runner.switch_chat(tokens)
    reused = runner.load_prompt(tokens, cancelled, progress)
    prompt_done = time.perf_counter()
    results, again = generate(runner, req, tokens, emit, cancelled)
    main, others = results[0], results[1:]
    predicted = sum(r.tokens_predicted for r in results)
    main.swipes = others
    main.tokens_evaluated, main.tokens_cached, main.cache_restored = len(tokens), reused, restored
    main.timings = Timings(prompt_n=len(tokens) - reused + again, prompt_ms=(prompt_done - started) * 1000,
                           predicted_n=predicted, predicted_ms=(time.perf_counter() - prompt_done) * 1000)
    return main


def generate(runner: Runner, req: GenerationRequest, tokens: list[int], emit: Any,
             cancelled: Any) -> tuple[list[GenerationResult], int]:
    """`req.n` replies to the prompt `tokens`, which `runner.load_prompt` has just brought into sequence 0
    (its last logits are the current ones): the replies in swipe order, and how many prompt tokens had to
    be evaluated again between rounds."""
    per_round = max(1, min(llama_cpp.llama_n_seq_max(runner.ctx), req.n))
    results: list[GenerationResult] = []
    again = 0
    for start in range(0, req.n, per_round):
        if start:  # the cache holds the prompt and the last round's swipe 0: one prompt token again
            again += len(tokens) - runner.load_prompt(tokens, cancelled)
        count = min(per_round, req.n - start)
        results += _round(runner, req, tokens, range(start, start + count), emit, cancelled)
        if results[-1].stop_type == "abort":
            break
    return results, again


def _round(runner: Runner, req: GenerationRequest, tokens: list[int], indexes: range, emit: Any,
           cancelled: Any) -> list[GenerationResult]:
    mem, first = runner.mem, indexes[0]
    room = max(1, (runner.n_ctx - len(tokens)) // len(indexes))  # the sequences share the cache's cells
    swipes: list[_Swipe] = []
    batch = llama_cpp.llama_batch_init(len(indexes), 0, 1)
    try:
        for i in indexes:
            swipes.append(_Swipe(index=i, seq=i - first, chain=_chain(runner, req, i),
                                 scanner=StopScanner(list(req.stop)), limit=min(req.max_tokens, room)))
            swipes[-1].chain.accept_history(tokens)
            if swipes[-1].seq:
                llama_cpp.llama_memory_seq_rm(mem, swipes[-1].seq, -1, -1)
                llama_cpp.llama_memory_seq_cp(mem, 0, swipes[-1].seq, -1, -1)
        _steps(runner, req, swipes, batch, len(tokens), emit, cancelled)
    finally:
        llama_cpp.llama_batch_free(batch)
        for swipe in swipes:
            swipe.chain.free()
            if swipe.seq:
                llama_cpp.llama_memory_seq_rm(mem, swipe.seq, -1, -1)
    runner.cached = tokens + swipes[0].decoded
    return [swipe.result() for swipe in swipes]


def _chain(runner: Runner, req: GenerationRequest, index: int) -> Chain:
    """Swipe `index`'s sampler chain: the request's samplers, with a seed of its own (a fixed seed gives
    fixed, different swipes: seed, seed + 1, ...)."""
    seed = req.sampling.seed + index if req.sampling.seed >= 0 else -1
    params = dataclasses.replace(req.sampling, seed=seed)
    return build_chain(params, vocab=runner.vocab, n_vocab=runner.n_vocab, n_ctx=runner.n_ctx,
                       eog_tokens=runner.eog)


def _steps(runner: Runner, req: GenerationRequest, swipes: list[_Swipe], batch: Any, n_prompt: int,
           emit: Any, cancelled: Any) -> None:
    """Sample every live swipe, then decode their new tokens as one batch; until all are done."""
    from bridge.engine.worker import Cancelled  # (the worker module imports this one)

    outputs = {swipe.seq: -1 for swipe in swipes}  # where each swipe's logits are: the prompt's, at first
    try:
        while True:
            step = [(swipe, token) for swipe in swipes if not swipe.done
                    if (token := _next_token(runner, req, swipe, outputs[swipe.seq], emit)) is not None]
            if not step:
                return
            batch.n_tokens = len(step)
            for slot, (swipe, token) in enumerate(step):
                batch.token[slot] = token
                batch.pos[slot] = n_prompt + len(swipe.decoded)
                batch.n_seq_id[slot] = 1
                batch.seq_id[slot][0] = swipe.seq
                batch.logits[slot] = 1
                outputs[swipe.seq] = slot
            rc = llama_cpp.llama_decode(runner.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) for {len(step)} swipes")
            for swipe, token in step:
                swipe.decoded.append(token)
            cancelled()
    except Cancelled:
        for swipe in swipes:
            if not swipe.done:
                swipe.stop_type, swipe.done = "abort", True


def _next_token(runner: Runner, req: GenerationRequest, swipe: _Swipe, output: int, emit: Any) -> int | None:
    """Sample `swipe`'s next token from the logits at `output` and show its text; the token when it must be
    decoded for the next step, None when the swipe is done."""
    if swipe.n < req.sampling.min_tokens:
        _ban(runner, output)
    top = _top(runner, output, req.sampling.n_probs) if req.sampling.n_probs > 0 else None
    token = llama_cpp.llama_sampler_sample(swipe.chain.sampler, runner.ctx, output)
    if llama_cpp.llama_vocab_is_eog(runner.vocab, token):
        return _finish(swipe, "eos", emit)
    swipe.n += 1
    text = swipe.scanner.feed(token_piece(runner.vocab, token))
    logprob, candidates = _probs(runner, top, token)
    emit(TokenChunk(text=text, token_id=token, logprob=logprob, top=candidates, index=swipe.index))
    if swipe.scanner.stopped_by:
        return _finish(swipe, "word", emit)
    if swipe.n >= swipe.limit:
        return _finish(swipe, "limit", emit)  # the last token needs no decode: nothing reads its logits
    return token


def _finish(swipe: _Swipe, stop_type: str, emit: Any) -> None:
    swipe.stop_type, swipe.done = stop_type, True
    tail = swipe.scanner.finish()
    if tail:
        emit(TokenChunk(text=tail, index=swipe.index))
    return None


def _ban(runner: Runner, output: int) -> None:
    """min_tokens: end-of-generation tokens cannot be picked yet."""
    logits = llama_cpp.llama_get_logits_ith(runner.ctx, output)
    for token in runner.eog:
        logits[token] = -math.inf


def _top(runner: Runner, output: int, n_probs: int) -> tuple[np.ndarray, np.ndarray]:
    raw = llama_cpp.llama_get_logits_ith(runner.ctx, output)
    logits = np.ctypeslib.as_array(raw, shape=(runner.n_vocab,))
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    k = min(n_probs, runner.n_vocab)
    best = np.argpartition(-logprobs, k - 1)[:k]
    return logprobs, best[np.argsort(-logprobs[best])]


def _probs(runner: Runner, top: tuple[np.ndarray, np.ndarray] | None,
           token: int) -> tuple[float | None, list[TokenProb]]:
    if top is None:
        return None, []
    logprobs, best = top
    return float(logprobs[token]), [
        TokenProb(token=token_piece(runner.vocab, int(t)).decode("utf-8", errors="replace"), token_id=int(t),
                  logprob=float(logprobs[t]))
        for t in best
    ]
