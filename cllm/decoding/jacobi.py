"""Jacobi decoding with a KV cache: greedy, lossless, several tokens per forward pass when the model allows it.

This is the one Jacobi iteration of the code base; data generation calls it with `record_trajectory=True`.

The generated text is split into fixed blocks of n positions (the last block may be shorter so that
`max_new_tokens` is met exactly). For a block with state y (n ids) of which the first c are committed, one
iteration feeds `head + y[c:n-1]` on top of the committed cache, where `head` holds the tokens that are
known to be right but have no KV entry yet (the whole prompt in the very first forward, so the prefill is also
the first iteration; afterwards the last committed token). The argmax at the input position of y[i-1]
predicts q[i]. q[c] is always right; the converged prefix is the run of y[c+j] == q[c+j], j = 0, 1, ...
(CLLM fast-forwarding), so q[c .. c+k] is committed and only the KV of `head + y[c:c+k]` is kept. The
remaining positions take the shifted prediction q as their next guess. A block converges in at most n
iterations and its fixed point is exactly the greedy AR continuation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cllm.decoding.common import (
    BlockTrajectory,
    DecodeResult,
    RaggedCache,
    as_batch,
    check_lengths,
    eos_ids,
)
from cllm.decoding.options import INIT_STRATEGIES, JacobiOptions
from cllm.errors import CllmError



def n_to_commit(guess: list[int], pred: list[int]) -> int:
    """How many of `pred` to commit for the unconverged part of a block (pure rule, at least 1).

    guess[j] and pred[j] are the input and the prediction at the j-th uncommitted position. pred[0] is always
    right; pred[j+1] is right when guess[0..j] were already right, i.e. equal to pred[0..j].
    """
    if len(guess) != len(pred) or not pred:
        raise ValueError("guess and pred must be non-empty and of equal length")
    k = 0
    while k < len(pred) - 1 and guess[k] == pred[k]:
        k += 1
    return k + 1


def init_guess(strategy: str, width: int, prompt: list[int], last_token: int, pad_id: int, generator) -> list[int]:
    """The initial state y(0) of a block: it changes the speed, never the output."""
    if strategy == "prompt":  # CLLM: random tokens drawn from the prompt
        idx = torch.randint(len(prompt), (width,), generator=generator)
        return [prompt[i] for i in idx.tolist()]
    if strategy == "repeat":
        return [last_token] * width
    if strategy == "pad":
        return [pad_id] * width
    raise CllmError(f"unknown init strategy {strategy!r}; choose one of {INIT_STRATEGIES}")


@dataclass
class _Row:
    """Decoding state of one prompt."""

    prompt: list[int]
    generator: torch.Generator
    head: list[int]  # known-right tokens without KV entries yet
    generated: list[int] = field(default_factory=list)
    y: list[int] = field(default_factory=list)  # current block state (block frame, `width` ids)
    c: int = 0  # committed positions of the block
    held: list[int] = field(default_factory=list)  # iterations y[i] has kept its value, for stationary tokens
    states: list[list[int]] = field(default_factory=list)
    block_index: int = 0
    block_start: int = 0
    n_forwards: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    n_fast_forward: int = 0
    n_stationary: int = 0
    trajectory: list[BlockTrajectory] = field(default_factory=list)
    finish_reason: str | None = None

    def step_input(self) -> list[int]:
        return self.head + self.y[self.c : len(self.y) - 1]


@torch.inference_mode()
def jacobi_decode(
    model,
    tokenizer,
    prompt_ids,
    options: JacobiOptions | None = None,
    max_new_tokens: int = 256,
    seed: int | list[int] = 0,
    eos_token_id: int | list[int] | None = None,
    on_commit=None,
) -> list[DecodeResult] | DecodeResult:
    """Greedy Jacobi decoding of one prompt (list of ids) or a batch (list of lists).

    Rows of a batch commit at their own pace (see `RaggedCache`); finished rows leave the batch. Each row's
    initial guesses come from its own generator (`seed + row`, or the given list of seeds). `on_commit(row,
    token_ids)`, if given, is called with the tokens each iteration commits (streaming); an exception it raises
    stops the decode.
    """
    batch, single = as_batch(prompt_ids)
    opts = options or JacobiOptions()
    opts.check()
    check_lengths(max_new_tokens)
    block_size, init, record_trajectory = opts.block_size, opts.init, opts.record_trajectory
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer, eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    seeds = seed if isinstance(seed, list) else [seed + i for i in range(len(batch))]
    if len(seeds) != len(batch):
        raise CllmError(f"{len(seeds)} seeds for {len(batch)} prompts")

    t0 = time.perf_counter()
    rows = [_Row(prompt=p, generator=torch.Generator().manual_seed(int(s)), head=list(p)) for p, s in zip(batch, seeds)]
    for row in rows:
        _start_block(row, block_size, max_new_tokens, init, pad_id)
    results: list[DecodeResult | None] = [None] * len(rows)
    cache = RaggedCache(len(rows), device, pad_id)
    active = list(range(len(rows)))
    while active:
        inputs = [rows[i].step_input() for i in active]
        logits, _ = cache.forward(model, inputs)  # (B, W, V)
        pred_ids = logits.argmax(dim=-1).tolist()  # (B, W)
        n_keep, still = [], []
        for r, i in enumerate(active):
            row = rows[i]
            n_head = len(row.head)
            n_new = _iterate(row, pred_ids[r], stop, block_size, max_new_tokens, init, pad_id, record_trajectory)
            n_keep.append(n_head + n_new - 1)
            if on_commit is not None:
                on_commit(i, row.generated[-n_new:])
            if row.finish_reason is None:
                still.append(r)
            else:
                results[i] = _result(row, tokenizer, time.perf_counter() - t0, record_trajectory)
        cache.keep(n_keep)
        if len(still) < len(active):
            if still:
                cache.select(still)
            active = [active[r] for r in still]
    return results[0] if single else results


def _iterate(row: _Row, pred_ids: list[int], stop: set[int], block_size: int, max_new_tokens: int, init: str,
             pad_id: int, record: bool) -> int:
    """One Jacobi iteration of a row from its forward's argmax ids (W,): commit, and when the block converged (or EOS
    ended it) close it and open the next one or finish the row. Returns the tokens committed."""
    n_head = len(row.head)
    n_open = len(row.y) - row.c
    # The input position of y[c+j-1] (or the last head token for j = 0) predicts y[c+j].
    n_new = _commit(row, pred_ids[n_head - 1 : n_head - 1 + n_open], stop)
    if row.c == len(row.y) or row.finish_reason is not None:
        _finish_block(row, record)
        if row.finish_reason is None and len(row.generated) >= max_new_tokens:
            row.finish_reason = "length"
        elif row.finish_reason is None:
            _start_block(row, block_size, max_new_tokens, init, pad_id)
    return n_new


def _start_block(row: _Row, block_size: int, max_new_tokens: int, init: str, pad_id: int) -> None:
    width = min(block_size, max_new_tokens - len(row.generated))
    row.y = init_guess(init, width, row.prompt, row.head[-1], pad_id, row.generator)
    row.c = 0
    row.held = [1] * width
    row.states = []
    row.block_start = len(row.generated)


def _commit(row: _Row, pred: list[int], stop: set[int]) -> int:
    """Apply one iteration's predictions to a row; returns how many tokens it committed."""
    c, y_in = row.c, list(row.y)
    row.states.append(y_in)
    m = n_to_commit(y_in[c:], pred)
    committed = pred[:m]
    for j, tok in enumerate(committed):  # EOS inside the accepted run ends the row there
        if tok in stop:
            committed = committed[: j + 1]
            row.finish_reason = "eos"
            break
    n = len(committed)
    for j in range(n):  # CLLM stationary tokens: right before, unchanged since, while earlier ones were wrong
        if y_in[c + j] == committed[j] and row.held[c + j] >= 2:
            row.n_stationary += 1
    new_y = y_in[:c] + pred  # the shifted prediction is the next guess of every open position
    for i in range(c + n, len(new_y)):
        row.held[i] = row.held[i] + 1 if new_y[i] == y_in[i] else 1
    row.y = new_y
    row.c = c + n
    row.generated.extend(committed)
    row.head = [committed[-1]]
    row.n_forwards += 1
    row.accept_lengths.append(n)
    row.n_fast_forward += n - 1
    return n


def _finish_block(row: _Row, record: bool) -> None:
    if record:
        row.trajectory.append(
            BlockTrajectory(
                block_index=row.block_index,
                start=row.block_start,
                states=row.states,
                fixed_point=row.generated[row.block_start :],
            )
        )
    row.block_index += 1


def _result(row: _Row, tokenizer, wall: float, record: bool) -> DecodeResult:
    return DecodeResult(
        token_ids=row.generated,
        text=tokenizer.decode(row.generated, skip_special_tokens=True) if tokenizer is not None else "",
        n_forwards=row.n_forwards,
        accept_lengths=row.accept_lengths,
        finish_reason=row.finish_reason or "length",
        wall_time_s=wall,
        n_fast_forward=row.n_fast_forward,
        n_stationary=row.n_stationary,
        trajectory=row.trajectory if record else None,
    )
