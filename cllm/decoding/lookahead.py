"""Lookahead decoding (Fu et al., ICML 2024): Jacobi n-grams collected and verified in the same forward; greedy and
lossless. Batch size 1.

One forward feeds three parts after the KV cache:

    [head: committed tokens without KV] [lookahead branch: N-1 levels of W tokens] [verification: G n-grams of N-1]

The lookahead branch is a 2D window of Jacobi iterates. Level l, column i stands at text position P+1+l+i (P: the
last committed token) and sees the head, level 0 up to column i and the tokens of levels 1..l in column i: a
contiguous sequence, so its output is the model's greedy guess for position P+2+l+i given those guesses. The last
level's outputs are the next level; the levels move up one each step (the oldest leaves). Column i then holds an
n-gram (level 0, level 1, ..., level N-2, new output) whose first token keys it into a pool (the G most recent
per key). While the window fills (the first N-2 steps) each step adds a level and drops a column.

The verification branch holds the pool's n-grams keyed by the last committed token, each seeing the head and its
own earlier tokens. The longest run of a candidate's tokens equal to the model's greedy predictions is committed,
with the prediction after it; every committed token is the model's own greedy choice, so the output equals greedy
AR. The window only proposes: when a step commits more than one token its positions drift, which costs speed,
never correctness (the released code does the same, `ALWAYS_FWD_ONE`).
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict

import torch

from cllm.decoding.common import (DecodeResult, SeqCache, cached_forward, check_lengths, committed_result, eos_ids,
                                  finish, single_prompt)
from cllm.decoding.options import LookaheadOptions


class NgramPool:
    """n-grams by their first token; the `per_key` most recently seen values of each key (least recent dropped)."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self.values: dict[int, OrderedDict] = defaultdict(OrderedDict)

    def add(self, key: int, value: tuple[int, ...]) -> None:
        if self.per_key < 1:
            return
        bucket = self.values[key]
        bucket.pop(value, None)
        bucket[value] = None
        if len(bucket) > self.per_key:
            bucket.popitem(last=False)

    def get(self, key: int) -> list[tuple[int, ...]]:
        return list(self.values.get(key, ()))


def allowed_mask(n_head: int, n_levels: int, width: int, guess_lens: list[int]) -> torch.Tensor:
    """Which of this forward's tokens each of them sees (L, L) bool, in input order head, levels, guesses (the
    cache is seen by all). See the module doc for the rule."""
    n_look = n_levels * width
    L = n_head + n_look + sum(guess_lens)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    allowed[:, :n_head] = True
    allowed[:n_head, :n_head] = torch.ones(n_head, n_head, dtype=torch.bool).tril()
    cols = torch.arange(width)
    for level in range(n_levels):
        rows = n_head + level * width + cols
        # level 0 up to the own column
        allowed[rows.unsqueeze(1), n_head + cols.unsqueeze(0)] = cols.unsqueeze(0) <= cols.unsqueeze(1)
        for m in range(1, level + 1):  # the same column of levels 1 .. level (itself included)
            allowed[rows, n_head + m * width + cols] = True
    start = n_head + n_look
    for g in guess_lens:
        allowed[start : start + g, start : start + g] = torch.ones(g, g, dtype=torch.bool).tril()
        start += g
    return allowed


def positions(last_pos: int, n_head: int, n_levels: int, width: int, guess_lens: list[int]) -> list[int]:
    """Text positions of this forward's tokens (the head ends at `last_pos`)."""
    head = list(range(last_pos - n_head + 1, last_pos + 1))
    look = [last_pos + 1 + level + i for level in range(n_levels) for i in range(width)]
    guess = [last_pos + 1 + j for g in guess_lens for j in range(g)]
    return head + look + guess


@torch.inference_mode()
def lookahead_decode(model, tokenizer, prompt_ids, options: LookaheadOptions | None = None, max_new_tokens: int = 256,
                     seed: int | list[int] = 0, eos_token_id: int | list[int] | None = None,
                     on_commit=None) -> DecodeResult | list[DecodeResult]:
    """Greedy lookahead decoding of one prompt: window W, n-gram size N, at most G verified n-grams per step.
    `on_commit(0, token_ids)`, if given, is called with the tokens each forward commits (streaming)."""
    prompt, single = single_prompt(prompt_ids, "lookahead decoding")
    opts = options or LookaheadOptions()
    opts.check()
    check_lengths(max_new_tokens)
    stop = eos_ids(model, tokenizer, eos_token_id)
    gen = torch.Generator().manual_seed(int(seed[0] if isinstance(seed, list) else seed))
    t0 = time.perf_counter()
    run = _Lookahead(SeqCache(model), prompt, opts.window, opts.ngram, opts.guesses, gen)
    reason = None
    while reason is None:
        reason = run.step(stop, max_new_tokens)
        if on_commit is not None:
            on_commit(0, run.head)  # the tokens this step committed (the next head)
    result = committed_result(tokenizer, run.generated, run.accept_lengths, reason, t0, run.stats)
    return result if single else [result]


class _Lookahead:
    """The state of one lookahead decode: committed text, the 2D window and the n-gram pool."""

    def __init__(self, cache: SeqCache, prompt: list[int], window: int, ngram: int, guesses: int, gen):
        self.cache, self.ngram, self.guesses = cache, ngram, guesses
        self.head, self.generated = list(prompt), []
        self.accept_lengths: list[int] = []
        self.pool = NgramPool(guesses)
        # Level 0 starts as prompt tokens at random, N-2 columns wider: each filling step drops one (module doc).
        idx = torch.randint(len(prompt), (window + max(ngram - 2, 0),), generator=gen).tolist()
        self.levels = [[prompt[i] for i in idx]] if ngram > 2 else []
        self.stats = {"guesses_verified": 0, "tokens_from_guesses": 0}

    def step(self, stop: set[int], max_new_tokens: int) -> str | None:
        """One forward: extend the window, verify the pooled n-grams of the last token, commit. Returns the finish
        reason once the decode ends."""
        cache, head = self.cache, self.head
        full = self.ngram == 2 or len(self.levels) == self.ngram - 1
        cands = [list(c) for c in self.pool.get(head[-1])] if full else []
        width = len(self.levels[0]) if self.levels else 0
        ids = head + [t for level in self.levels for t in level] + [t for c in cands for t in c]
        n_cached = cache.n
        last_pos = n_cached + len(head) - 1
        allowed = allowed_mask(len(head), len(self.levels), width, [len(c) for c in cands])
        mask = torch.ones(len(ids), n_cached + len(ids), dtype=torch.bool)  # (L, S + L): the cache is seen by all
        mask[:, n_cached:] = allowed
        logits = _forward(cache, ids, positions(last_pos, len(head), len(self.levels), width,
                                                 [len(c) for c in cands]), mask)  # (L, V)
        pred = logits.argmax(-1).tolist()
        first = pred[len(head) - 1]  # the model's next token after the committed text
        taken_guess = self._verify(cands, pred, len(head) + len(self.levels) * width, first)
        self._update_window(pred, len(head), width)
        taken, reason = finish(self.generated, [first] + taken_guess, stop, max_new_tokens)
        self.accept_lengths.append(len(taken))
        # Keep the KV of the head only; the committed tokens after it are the next head (their KV comes then).
        cache.crop(n_cached + len(head))
        self.head = list(taken)
        done = len(self.generated)
        for i in range(max(0, done - len(taken) - self.ngram + 1), done - self.ngram + 1):  # n-grams of the new text
            self.pool.add(self.generated[i], tuple(self.generated[i + 1 : i + self.ngram]))
        return reason

    def _verify(self, cands: list[list[int]], pred: list[int], start: int, first: int) -> list[int]:
        """The tokens after `first` that the best candidate gets right, each the model's prediction after the one
        before (the candidate's first token must equal `first`)."""
        best: list[int] = []
        for c in cands:
            correct = [first] + pred[start : start + len(c)]  # what the model predicts at each candidate position
            n = 0
            while n < len(c) and c[n] == correct[n]:
                n += 1
            if n > len(best):
                best = correct[1 : n + 1]  # c[:n] == correct[:n]; the prediction after c[n-1] comes free
            start += len(c)
        self.stats["guesses_verified"] += len(cands)
        self.stats["tokens_from_guesses"] += len(best)
        return best

    def _update_window(self, pred: list[int], n_head: int, width: int) -> None:
        """The last level's outputs become the next level; full windows give every column's n-gram to the pool."""
        if self.ngram == 2:  # no window: the pool holds the committed text's 2-grams only
            return
        last = n_head + (len(self.levels) - 1) * width
        new = pred[last : last + width]
        if len(self.levels) == self.ngram - 1:
            for i in range(width):
                value = tuple(level[i] for level in self.levels[1:]) + (new[i],)
                self.pool.add(self.levels[0][i], value)
            self.levels = self.levels[1:] + [new]
        else:  # filling: every level drops its first column, which the next committed token passes
            self.levels = [level[1:] for level in self.levels] + [new[1:]]


def _forward(cache: SeqCache, ids: list[int], pos: list[int], mask: torch.Tensor) -> torch.Tensor:
    """One forward of `ids` at positions `pos` with an explicit (L, S + L) visibility mask; logits (L, V)."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=cache.device)  # (1, L)
    position_ids = torch.tensor([pos], dtype=torch.long, device=cache.device)  # (1, L)
    attention_mask = mask.to(cache.device)[None, None]  # (1, 1, L, S + L), True = visible
    logits, cache.cache = cached_forward(cache.model, input_ids, position_ids, cache.cache, attention_mask)
    cache.n += len(ids)
    return logits[0].float()
