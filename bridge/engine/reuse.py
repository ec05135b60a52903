"""How much of the KV cache a new prompt can reuse: the common prefix, plus a shifted middle.

ST resends the whole chat every turn. Usually the new prompt is the old one plus a reply and a new message:
only the new tail needs evaluating. Once the chat outgrows the context, ST drops the oldest messages but
keeps the top (system prompt, character card): the new prompt is `top + (old middle minus its oldest part)
+ new tail`. Instead of re-evaluating everything after `top`, the cache can drop the removed chunk and move
the rest down (KoboldCpp's ContextShift) with llama.cpp's memory operations; then only the tail is new.

Moving cached tokens changes their positions (RoPE is re-applied to the keys by llama.cpp) but not their
values, which were computed while the dropped chunk was still in view: the result is close to, not
bit-identical with, evaluating the trimmed prompt from scratch. KoboldCpp makes the same trade.
"""

from __future__ import annotations

from dataclasses import dataclass

# A shifted run shorter than this is not worth it (and risks matching a few common tokens by chance).
MIN_SHIFT_MATCH = 16
# Candidate alignments examined at most (each costs a slice comparison).
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class ReusePlan:
    """Keep `prefix` cached tokens; then drop `dropped` cached tokens and keep the `shifted` after them."""

    prefix: int
    dropped: int = 0
    shifted: int = 0

    @property
    def reused(self) -> int:
        """Prompt tokens served from the cache (llama-server's `tokens_cached`)."""
        return self.prefix + self.shifted


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: long chats share thousands of tokens and slice equality runs in C.
    block = 256
    while i + block <= n and a[i:i + block] == b[i:i + block]:
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_reuse(cached: list[int], prompt: list[int], *, can_shift: bool = True,
               min_match: int = MIN_SHIFT_MATCH) -> ReusePlan:
    """The cheapest way to get `prompt` into the cache, given the tokens `cached` there now.

    At least the last prompt token is always left to evaluate: its logits start the generation.
    """
    limit = len(prompt) - 1
    prefix = min(common_prefix(cached, prompt), limit)
    if not can_shift or prefix >= len(cached) or prefix >= limit:
        return ReusePlan(prefix)
    best = ReusePlan(prefix)
    want = prompt[prefix:prefix + min_match]
    if len(want) < min_match:
        return best
    first = want[0]
    examined = 0
    start = prefix + 1
    while examined < MAX_CANDIDATES:
        try:
            at = cached.index(first, start)
        except ValueError:
            break
        start = at + 1
        examined += 1
        if cached[at:at + min_match] != want:
            continue
        run = min(common_prefix(cached[at:], prompt[prefix:]), limit - prefix)
        if run >= min_match and run > best.shifted:
            best = ReusePlan(prefix, dropped=at - prefix, shifted=run)
    return best
