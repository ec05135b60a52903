"""Why the pick beats the runner-up, and why each runner-up ranks lower, in the guide's terms.

A candidate's score is its quality less three costs (slow writing, a long first reply, running partly on
the CPU). Comparing two candidates term by term says which terms decided between them; the words name the
evidence: the ratings and where they come from, tokens per second, the wait for the first reply, where the
model runs. "Qwen2.5-32B at Q4_K_M: rated better than Mixtral-8x7B (Arena 1274 (estimated), UGI 30.3 vs
Arena 1197, UGI 24.9), runs fully on your GPU, ~35 tokens/s, first reply after ~4 s at 8k."
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .speed import describe_wait

if TYPE_CHECKING:
    from .recommend import Candidate

WHERE = {"full_gpu": "runs fully on your GPU", "partial_gpu": "runs partly on your GPU",
         "cpu_only": "runs on your CPU"}
# Differences smaller than these do not decide anything worth saying.
SAME_POINTS = 3.0  # rating points
SAME_NATS = 0.01


def explain_ranking(ranked: list[Candidate], n_ctx: int) -> None:
    """Set each candidate's reason: the pick against the runner-up, each runner-up against the pick."""
    if not ranked:
        return
    top = ranked[0]
    why = _why_better(top, ranked[1]) if len(ranked) > 1 else "the only model that runs well here"
    top.reason = f"best pick: {top.name} at {top.quant}: {why}, {_facts(top)}; {top.reason}"
    for c in ranked[1:]:
        c.reason = f"runner-up ({_why_lower(c, top)}): {_describe(c)}; {c.reason}"


def _terms(a: Candidate, b: Candidate) -> dict[str, float]:
    """How much better `a` is than `b` on each term of the score, in nats (negative: worse)."""
    return {
        "quality": a.quality - b.quality,
        "speed": b.speed_cost - a.speed_cost,
        "wait": b.wait_cost - a.wait_cost,
        "placement": b.placement_cost - a.placement_cost,
    }


def _why_better(top: Candidate, runner: Candidate) -> str:
    terms = _terms(top, runner)
    said = [_better_words(name, top, runner) for name, gain in sorted(terms.items(), key=lambda t: -t[1])
            if gain > SAME_NATS][:2]
    said = [words for words in said if words]
    return " and ".join(said) if said else f"as good as {runner.name} here, with more context or speed"


def _better_words(term: str, top: Candidate, runner: Candidate) -> str:
    if term == "quality":
        if abs(top.rating.get("points", 0) - runner.rating.get("points", 0)) < SAME_POINTS:
            return (f"the same rating as {runner.name} and less lost to its quant "
                    f"({top.quant} vs {runner.quant})")
        word = "rated" if top.rating.get("estimated") or runner.rating.get("estimated") else "measured"
        return f"{word} better than {runner.name} ({_rated(top)} vs {_rated(runner)})"
    if term == "speed":
        return (f"faster than {runner.name} (~{top.expected_tok_s:.0f} vs ~{runner.expected_tok_s:.0f} "
                "tokens/s)")
    if term == "wait":
        return (f"its first reply comes sooner than {runner.name}'s ({describe_wait(top.first_reply_s)} vs "
                f"{describe_wait(runner.first_reply_s)})")
    return f"fully on the GPU where {runner.name} is not"


def _why_lower(c: Candidate, top: Candidate) -> str:
    """The term that puts `c` under the pick, in words."""
    term, loss = min(_terms(c, top).items(), key=lambda t: t[1])
    if loss >= -SAME_NATS:
        return "as good, another model"
    if term == "quality":
        if abs(c.rating.get("points", 0) - top.rating.get("points", 0)) < SAME_POINTS:
            return f"more quantized: {c.quant} loses more"
        bigger = "bigger, but " if c.params_b > top.params_b else ""
        return f"{bigger}rated lower: {_rated(c)} vs {_rated(top)}"
    if term == "speed":
        return (f"{'bigger, but ' if c.params_b > top.params_b else ''}writes ~{c.expected_tok_s:.1f} "
                "tokens/s, slower than reading speed (~6)")
    if term == "wait":
        return (f"first reply after {describe_wait(c.first_reply_s)} at a full context, vs "
                f"{describe_wait(top.first_reply_s)}")
    return f"{'bigger, but ' if c.params_b > top.params_b else ''}only partly on the GPU"


def _rated(c: Candidate) -> str:
    """"1304 at Q4_K_M (Arena 1274, UGI 30.3)": the rating this file keeps, and what it rests on."""
    return f"{c.points:.0f} at {c.quant} ({c.rating.get('basis')})"


def _facts(c: Candidate) -> str:
    wait = describe_wait(c.first_reply_s)
    return (f"{WHERE.get(c.verdict, c.verdict)}, ~{c.expected_tok_s:.0f} tokens/s, first reply after {wait} "
            f"at {_ctx(c.n_ctx)}")


def _describe(c: Candidate) -> str:
    moe = f" ({c.active_params_b:g}B active)" if c.active_params_b < c.params_b else ""
    size = f"{c.params_b:g}B{moe}"
    return f"{c.name}, {size} at {c.quant}, rated {c.points:.0f}, {_facts(c)}"


def _ctx(n_ctx: int) -> str:
    return f"{n_ctx // 1024}k" if n_ctx % 1024 == 0 else f"{n_ctx} tokens"
