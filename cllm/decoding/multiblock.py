"""Multi-block Jacobi decoding with rejection recycling (Jacobi Forcing, Hu et al. 2025): greedy and lossless.

The window holds up to K blocks of n guessed tokens after the committed text. One forward feeds
`head + window` (head: the committed tokens without KV yet), so every slot gets a prediction and one more
prediction falls after the window. Verification is plain greedy verification over the whole window: the
leading guesses equal to their predictions are right, and so is the prediction after them; those tokens are
committed (a run may continue past the first block when the first block converges in the same forward; every
committed token is still the model's own greedy choice, so the output equals greedy AR). The other slots take
their shifted prediction as the next guess, exactly as single-block Jacobi.

A new block enters the window once the newest block has at least r*n leading tokens that agree with their
predictions (its "accepted" part, assuming its context is right), while fewer than K blocks are in flight; its
first guess is the prediction that fell after the window.

Rejection recycling: the tail of a rejected guess (from its first wrong token on) goes into a small pool keyed
by that token. When the last committed token equals a key, up to `n_recycle` pooled tails are verified as extra
batch rows on the same cache, and the row with the most accepted tokens wins. Batch size 1.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import torch

from cllm.decoding.common import (
    DecodeResult,
    SeqCache,
    cached_forward,
    check_lengths,
    committed_result,
    eos_ids,
    finish,
    single_prompt,
)
from cllm.decoding.jacobi import init_guess
from cllm.decoding.options import MultiblockOptions


def n_leading_matches(guess: list[int], pred: list[int]) -> int:
    """How many leading guesses equal their predictions (pure rule; `pred` may be longer than `guess`)."""
    k = 0
    while k < len(guess) and guess[k] == pred[k]:
        k += 1
    return k


def pick_row(guesses: list[list[int]], preds: list[list[int]]) -> tuple[int, int]:
    """(winning row, its leading matches): the most accepted tokens, the first (main) row on ties."""
    best, best_n = 0, -1
    for r, (g, p) in enumerate(zip(guesses, preds)):
        n = n_leading_matches(g, p)
        if n > best_n:
            best, best_n = r, n
    return best, best_n


@dataclass
class _Block:
    size: int  # slots of the block
    done: int = 0  # slots already committed (only the first block has any)

    @property
    def open(self) -> int:
        return self.size - self.done


class RecyclePool:
    """Rejected guess tails by their first token; the most recent `per_key` tails of each key are kept."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self.tails: dict[int, deque] = defaultdict(lambda: deque(maxlen=per_key))

    def add(self, tail: list[int]) -> None:
        if self.per_key and len(tail) >= 2 and tuple(tail[1:]) not in self.tails[tail[0]]:
            self.tails[tail[0]].appendleft(tuple(tail[1:]))

    def candidates(self, token: int, k: int) -> list[list[int]]:
        return [list(t) for t in list(self.tails.get(token, ()))[:k]]


@torch.inference_mode()
def multiblock_decode(
    model,
    tokenizer,
    prompt_ids,
    options: MultiblockOptions | None = None,
    max_new_tokens: int = 256,
    seed: int | list[int] = 0,
    eos_token_id: int | list[int] | None = None,
) -> DecodeResult | list[DecodeResult]:
    """Greedy multi-block Jacobi decoding of one prompt. `n_blocks` K blocks of `block_size` n in flight, a new
    one once the newest has `spawn_ratio` r * n accepted, `n_recycle` extra verification rows from the pool."""
    prompt, single = single_prompt(prompt_ids, "multi-block Jacobi")
    opts = options or MultiblockOptions()
    opts.check()
    check_lengths(max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    stop = eos_ids(model, tokenizer, eos_token_id)
    gen = torch.Generator().manual_seed(int(seed[0] if isinstance(seed, list) else seed))
    t0 = time.perf_counter()
    run = _Window(SeqCache(model), prompt, opts, max_new_tokens, pad_id, gen)
    run.start_block(None)
    reason = None
    while reason is None:
        reason = run.iterate(stop)

    result = committed_result(tokenizer, run.generated, run.accept_lengths, reason, t0, run.stats)
    return result if single else [result]


class _Window:
    """The state of one multi-block decode: the committed text, the blocks in flight and their guesses, the pool."""

    def __init__(self, cache: SeqCache, prompt: list[int], opts: MultiblockOptions, max_new_tokens: int, pad_id: int,
                 gen: torch.Generator):
        self.cache, self.prompt, self.gen = cache, prompt, gen
        self.block_size, self.max_new_tokens, self.n_blocks = opts.block_size, max_new_tokens, opts.n_blocks
        self.need = math.ceil(opts.spawn_ratio * opts.block_size)  # accepted tokens before the next block enters
        self.n_recycle, self.init, self.pad_id = opts.n_recycle, opts.init, pad_id
        self.head, self.generated = list(prompt), []
        self.accept_lengths: list[int] = []
        self.stats = {"rows": 0, "recycled_wins": 0, "blocks_started": 0, "max_in_flight": 0}
        self.pool = RecyclePool(per_key=max(opts.n_recycle, 1) if opts.n_recycle else 0)
        self.blocks: list[_Block] = []
        self.guess: list[int] = []  # the window's open slots, block after block

    def start_block(self, first: int | None) -> None:
        room = self.max_new_tokens - len(self.generated) - len(self.guess)
        if room <= 0:
            return
        size = min(self.block_size, room)
        fresh = init_guess(self.init, size, self.prompt, self.head[-1], self.pad_id, self.gen)
        if first is not None:
            fresh[0] = first
        self.blocks.append(_Block(size))
        self.guess.extend(fresh)
        self.stats["blocks_started"] += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], len(self.blocks))

    def iterate(self, stop: set[int]) -> str | None:
        """One forward: verify the window (and recycled rows), commit, move the guesses, maybe let a block in.
        Returns the finish reason once the decode ends."""
        guess, head, cache = self.guess, self.head, self.cache
        rows = [guess] + [_fill(c, guess) for c in self.pool.candidates(head[-1], self.n_recycle)]
        rows = [r for i, r in enumerate(rows) if r not in rows[:i]]  # a tail equal to the window is no extra row
        n_cached = cache.n
        logits = _forward_rows(cache, head, rows)  # (R, len(head) + W, V)
        W = len(guess)
        # The input position of head[-1] predicts slot 0; the one of slot i predicts slot i + 1.
        preds = logits[:, len(head) - 1 :].argmax(-1).tolist()  # (R, W + 1)
        best, matches = pick_row(rows, preds)
        self.stats["rows"] += len(rows)
        self.stats["recycled_wins"] += best > 0
        row, pred = rows[best], preds[best]
        if matches < W:
            self.pool.add(guess[n_leading_matches(guess, preds[0]) :])  # the main row's rejected tail
        taken, reason = finish(self.generated, pred[: matches + 1], stop, self.max_new_tokens)
        self.accept_lengths.append(len(taken))
        if len(rows) > 1:
            cache.cache.batch_select_indices(torch.tensor([best], device=cache.device))
        cache.crop(n_cached + len(head) + matches)  # KV of head + the accepted guesses (now committed)
        self.head = [taken[-1]]
        # Is the newest block ready to let a new one in? (measured before the commit removes slots)
        newest_start = W - self.blocks[-1].open
        ready = self.blocks[-1].done + n_leading_matches(row[newest_start:], pred[newest_start:]) >= self.need
        _consume(self.blocks, matches + 1)
        guess[:] = pred[matches + 1 : W]
        next_guess = pred[W] if matches < W else None  # all matched: pred[W] was committed
        if reason is None:
            if not self.blocks:
                self.start_block(None)
            elif ready and len(self.blocks) < self.n_blocks:
                self.start_block(next_guess)
        return reason


def _fill(tail: list[int], guess: list[int]) -> list[int]:
    """A pooled tail laid over the window's slots: the tail where it reaches, the window's guesses after it."""
    return list(tail[: len(guess)]) + guess[len(tail) :]


def _forward_rows(cache: SeqCache, head: list[int], rows: list[list[int]]) -> torch.Tensor:
    """One forward of `head + row` for every row on the shared cache; logits (R, len(head) + W, V)."""
    if len(rows) == 1:
        return cache.forward(head + rows[0]).unsqueeze(0)
    R = len(rows)
    if cache.n:
        cache.cache.batch_repeat_interleave(R)  # every row continues from the same committed context
    input_ids = torch.tensor([head + r for r in rows], dtype=torch.long, device=cache.device)  # (R, L)
    position_ids = torch.arange(cache.n, cache.n + input_ids.shape[1], device=cache.device).expand(R, -1)
    logits, cache.cache = cached_forward(cache.model, input_ids, position_ids, cache.cache)
    cache.n += input_ids.shape[1]
    return logits.float()


def _consume(blocks: list[_Block], n: int) -> None:
    """Mark n committed slots from the front; fully committed blocks leave the window (an overflow of one
    token past the window, the bonus prediction, belongs to no block)."""
    while n > 0 and blocks:
        take = min(n, blocks[0].open)
        blocks[0].done += take
        n -= take
        if blocks[0].open == 0:
            blocks.pop(0)
