"""Gated decoding: a gated LoRA adapter drafts, the base model verifies, in one forward. Greedy and lossless: the
output is the base model's greedy output whatever the adapter learnt. Batch size 1.

One forward feeds, after the KV cache of the committed text:

    [head: committed tokens without KV] [guess: g tokens] [pool: G n-grams of N-1] [draft: g tokens]
     gate 0                              gate 0            gate 0                    gate 1

Head, guess and pool are the verify side, run by the base (gate 0): the guess and every pooled n-gram continue
the head, each seeing the head and its own earlier tokens. The longest run of a branch's tokens equal to the
base's greedy predictions is committed, with the base's prediction after it (as Jacobi and speculative decoding
commit); only the K/V of the head and of the winning branch's accepted tokens stay in the cache, so the cache
only ever holds the base model's K/V of verified text.

The draft side (gate 1: base + adapter) sits at the guess's text positions, sees the head and itself (causally),
never the verify side. It reads either the guess itself (`draft_input="guess"`: a Jacobi state, the adapter was
trained on the base's Jacobi trajectories to jump to the fixed point) or mask tokens (`"mask"`: predict the next
tokens from the committed text alone). Its output at guess position i predicts the token after it; those past
the committed run become the next guess.

The pool holds the N-grams of the prompt and of the committed text keyed by their first token (prompt lookup, as
Lookahead's pool holds its window's n-grams); the branches keyed by the head's last token are verified beside the
guess in the same forward.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from cllm.decoding.common import DecodeResult, SeqCache, check_lengths, committed_result, eos_ids, finish, single_prompt
from cllm.decoding.gate import gated
from cllm.decoding.lookahead import NgramPool, _forward
from cllm.decoding.options import DRAFT_INPUTS, GatedOptions  # noqa: F401 (re-exported)

def accept_length(branch: list[int], pred: list[int]) -> int:
    """How many leading tokens of `branch` the base confirms: pred[i] is the base's greedy token at branch[i]'s
    position given everything before it, so branch[i] stands while branch[:i+1] == pred[:i+1] (pure rule)."""
    n = 0
    while n < len(branch) and n < len(pred) and branch[n] == pred[n]:
        n += 1
    return n


def lookup_continuation(text: list[int], length: int, max_ngram: int = 2) -> list[int]:
    """Prompt lookup (Saxena 2023; Hugging Face's `prompt_lookup_num_tokens`): the `length` tokens that followed the
    most recent earlier occurrence of the text's last `max_ngram` tokens (else of fewer), or [] (pure rule)."""
    for k in range(min(max_ngram, len(text) - 1), 0, -1):
        suffix = text[-k:]
        for start in range(len(text) - k - 1, -1, -1):  # most recent first, the suffix itself excluded
            if text[start : start + k] == suffix:
                return text[start + k : start + k + length]
    return []


def branch_mask(n_head: int, lengths: list[int]) -> torch.Tensor:
    """(L, L) bool visibility among this forward's tokens: the head causal; each branch sees the head and its own
    earlier tokens (the cache is seen by all)."""
    L = n_head + sum(lengths)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    allowed[:, :n_head] = True
    allowed[:n_head, :n_head] = torch.ones(n_head, n_head, dtype=torch.bool).tril()
    start = n_head
    for g in lengths:
        allowed[start : start + g, start : start + g] = torch.ones(g, g, dtype=torch.bool).tril()
        start += g
    return allowed


@torch.inference_mode()
def gated_decode(model, tokenizer, prompt_ids, options: GatedOptions | None = None, max_new_tokens: int = 256,
                 seed: int | list[int] = 0, eos_token_id=None, on_commit=None) -> DecodeResult | list[DecodeResult]:
    """Greedy gated decoding of one prompt with a model loaded with a gated adapter (`cllm.decoding.gate`).
    `on_commit(0, token_ids)`, if given, is called with the tokens each forward commits (streaming)."""
    opts = options or GatedOptions()
    opts.check()
    if opts.draft_input is None:
        opts = dataclasses.replace(opts, draft_input="guess")
    prompt, single = single_prompt(prompt_ids, "gated decoding")
    check_lengths(max_new_tokens)
    stop = eos_ids(model, tokenizer, eos_token_id)
    gen = torch.Generator().manual_seed(int(seed[0] if isinstance(seed, list) else seed))
    t0 = time.perf_counter()
    run = _GatedRun(SeqCache(model), prompt, opts, gen)
    reason = None
    while reason is None:
        taken, reason = run.step(stop, max_new_tokens)
        if on_commit is not None:
            on_commit(0, taken)
    result = committed_result(tokenizer, run.generated, run.accept_lengths, reason, t0, run.stats)
    return result if single else [result]


class _GatedRun:
    """One prompt under gated decoding: the committed text, the guess and the n-gram pool."""

    def __init__(self, cache: SeqCache, prompt: list[int], opts: GatedOptions, gen: torch.Generator):
        self.cache, self.opts = cache, opts
        self.width = opts.block_size - 1
        self.head, self.generated, self.prompt = list(prompt), [], list(prompt)
        self.accept_lengths: list[int] = []
        self.pool = NgramPool(opts.pool_candidates)
        self._add_ngrams(prompt, 0)
        idx = torch.randint(len(prompt), (self.width,), generator=gen).tolist()
        self.guess = [prompt[i] for i in idx]  # y(0): prompt tokens at random, as Jacobi starts
        self.stats = {"tokens_from_draft": 0, "tokens_from_pool": 0, "pool_verified": 0}

    def _add_ngrams(self, text: list[int], start: int) -> None:
        """The pool gets the N-grams of `text` that begin at index >= start."""
        N = self.opts.pool_ngram
        for i in range(max(start, 0), len(text) - N + 1):
            self.pool.add(text[i], tuple(text[i + 1 : i + N]))

    def step(self, stop: set[int], max_new_tokens: int) -> tuple[list[int], str | None]:
        """One forward: verify the guess and the pooled n-grams, draft the next guess; returns (the tokens
        committed, the finish reason once the decode ends)."""
        head, cache = self.head, self.cache
        cands = [list(c) for c in self.pool.get(head[-1])]
        if self.opts.lookup_tokens:
            found = lookup_continuation(self.prompt + self.generated, self.opts.lookup_tokens)
            cands = ([found] if found else []) + [c for c in cands if c != found[: len(c)]]
        draft_in = self.guess if self.opts.draft_input == "guess" else [self.opts.mask_token_id] * self.width
        branches = [self.guess, *cands]
        lengths = [len(b) for b in branches] + [self.width]
        ids = head + [t for b in branches for t in b] + draft_in
        S, h = cache.n, len(head)
        last_pos = S + h - 1
        pos = list(range(S, S + h)) + [last_pos + 1 + j for g in lengths for j in range(g)]
        mask = torch.ones(len(ids), S + len(ids), dtype=torch.bool)  # (L, S + L): the cache is seen by all
        mask[:, S:] = branch_mask(h, lengths)
        gate = torch.zeros(1, len(ids))  # (1, L): the draft copy at 1
        gate[0, len(ids) - self.width :] = 1.0
        with gated(cache.model, gate.to(cache.device)):
            pred = _forward(cache, ids, pos, mask).argmax(-1).tolist()  # (L,)
        first = pred[h - 1]  # the base's next token after the committed text
        best, best_n, start, best_start = 0, -1, h, h
        for k, b in enumerate(branches):
            n = accept_length(b, [first] + pred[start : start + len(b) - 1])
            if n > best_n:
                best, best_n, best_start = k, n, start
            start += len(b)
        winner = branches[best]
        correct = winner[:best_n] + [first if best_n == 0 else pred[best_start + best_n - 1]]
        taken, reason = finish(self.generated, correct, stop, max_new_tokens)
        self._record(best, best_n, len(cands))
        # the cache keeps the head and the winning branch's accepted tokens (indices S + position in `ids`)
        cache.keep(list(range(S + h)) + list(range(S + best_start, S + best_start + best_n)))
        self.head = [taken[-1]]
        self.accept_lengths.append(len(taken))
        self._add_ngrams(self.generated, len(self.generated) - len(taken) - self.opts.pool_ngram)
        drafted = pred[len(ids) - self.width :]  # drafted[i] predicts the token after guess position i
        self.guess = self._fill(drafted[best_n:] if best_n < self.width else [], taken[-1])
        return taken, reason

    def _fill(self, guess: list[int], last: int) -> list[int]:
        """The next guess: the draft's tokens past the committed run, then (the window moved on by the tokens
        committed) continued from the pool's most recent n-gram after the last token, else that token repeated."""
        guess = list(guess)
        while len(guess) < self.width:
            key = guess[-1] if guess else last
            grams = self.pool.get(key)
            guess += list(grams[-1]) if grams else [key]
        return guess[: self.width]

    def _record(self, best: int, n: int, n_cands: int) -> None:
        self.stats["pool_verified"] += n_cands
        self.stats["tokens_from_pool" if best else "tokens_from_draft"] += n

