"""Continuous batching: requests join one running batch between forwards and leave it when done (`cllm serve`).

A joining request is prefilled on its own (its first forward is exactly the one it would have alone: the prompt,
plus the Jacobi guess for a Jacobi row) and its KV rows are then appended to the running `RaggedCache`
(`concat`). Every later forward runs all rows at once, each on its own input (one token for AR, the open part of
the block for Jacobi), and each keeps only its own committed entries; a finished or cancelled row's cache rows are
dropped before the next forward. Rows never see each other (the mask), so every row's greedy output is the one it
gets decoded alone: `tests/test_continuous.py` checks joins and leaves mid-decode against solo decodes.

AR rows sample with their own generator (`seed`, as `ar_decode` seeds a batch of one) and their own temperature,
top-k and top-p, so requests with different sampling settings share a batch. Jacobi rows are greedy.

Gated rows (`cllm.decoding.gated`, a model loaded with a gated adapter) carry their branches and their draft copy
side by side: while one is in the batch, every forward gives each row its own positions and visibility among its
new tokens (`RaggedCache.forward_tree`) and a per-position gate (the draft copies at 1, everything else at 0, the
base exactly); a gated row keeps the K/V of its head and of its winning branch's accepted tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cllm.decoding import jacobi
from cllm.decoding.common import RaggedCache, check_lengths
from cllm.decoding.gate import gated
from cllm.decoding.gated import GatedRun, SamplerDrafter
from cllm.decoding.options import GatedOptions
from cllm.decoding.sampler_head import final_hidden, sampler_of
from cllm.decoding.sampling import check_sampling_args, sample_token, warp_logits
from cllm.errors import CllmError

METHODS = ("ar", "jacobi", "gated")


@dataclass
class Row:
    """One request in the batch. `on_commit(tokens) -> bool` is called with every iteration's committed tokens;
    returning True ends the row (a stop string matched). `cancelled` ends it before its next forward."""

    method: str
    prompt: list[int]
    max_new_tokens: int
    on_commit: object = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    block_size: int = 16
    init: str = "prompt"
    options: GatedOptions | None = None  # gated rows: their options (draft input and mask id resolved)
    generated: list[int] = field(default_factory=list)
    n_forwards: int = 0
    finish_reason: str | None = None  # eos, length, stop, cancelled
    cancelled: bool = False
    _state: object = None

    def start(self, device, pad_id: int) -> None:
        if self.method not in METHODS:
            raise CllmError(f"continuous batching runs {', '.join(METHODS)}, not {self.method}")
        check_lengths(self.max_new_tokens, self.block_size if self.method == "jacobi" else None)
        if self.method == "gated":
            self._state = GatedRun(self.prompt, self.options or GatedOptions(), int(self.seed))
        elif self.method == "ar":
            check_sampling_args(self.temperature, self.top_k, self.top_p)
            self._state = {"head": list(self.prompt), "gen": torch.Generator(device=device).manual_seed(int(self.seed))}
        else:
            row = jacobi._Row(prompt=self.prompt, generator=torch.Generator().manual_seed(int(self.seed)),
                              head=list(self.prompt))
            jacobi._start_block(row, self.block_size, self.max_new_tokens, self.init, pad_id)
            self._state = row

    def step_input(self) -> list[int]:
        if self.method == "gated":
            return self._state.inputs()[0]
        return self._state["head"] if self.method == "ar" else self._state.step_input()

    def tree_input(self) -> tuple[list[int], list[int], torch.Tensor, int]:
        """(tokens, positions after the committed ones, (L, L) visibility, draft tokens at the end) of this step."""
        if self.method == "gated":
            return self._state.inputs()
        ids = self.step_input()
        return ids, list(range(len(ids))), torch.ones(len(ids), len(ids), dtype=torch.bool).tril(), 0

    def n_logits(self) -> int:
        """How many of its last inputs' logits the row reads: from the last committed token on (gated: all)."""
        if self.method == "gated":
            return len(self.step_input())
        return len(self.step_input()) - len(self._state["head"] if self.method == "ar" else self._state.head) + 1

    def consume(self, logits: torch.Tensor, stop: set[int], pad_id: int, drafter=None) -> int | list[int]:
        """Apply one forward's logits of this row's last inputs (K, V), K >= `n_logits()` (gated: with the sampler
        head's `drafter` of this row's draft rows, if any); returns how many new KV entries it keeps (gated: which)."""
        self.n_forwards += 1
        if self.method == "gated":
            new, n_keep = self._gated(logits, stop, drafter)
        else:
            new, n_keep = {"ar": self._ar, "jacobi": self._jacobi}[self.method](logits, stop, pad_id)
        self.generated.extend(new)
        if self.finish_reason is None and len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.on_commit is not None and self.on_commit(new) and self.finish_reason is None:
            self.finish_reason = "stop"
        return n_keep

    def _ar(self, logits: torch.Tensor, stop: set[int], pad_id: int) -> tuple[list[int], int]:
        head = self._state["head"]
        last = logits[-1:]  # (1, V): the last input is the last committed token
        if self.temperature == 0:
            tok = int(last.argmax(dim=-1))
        else:
            tok = int(sample_token(warp_logits(last, self.temperature, self.top_k, self.top_p), self._state["gen"]))
        self._state["head"] = [tok]
        if tok in stop:
            self.finish_reason = "eos"
        return [tok], len(head)

    def _jacobi(self, logits: torch.Tensor, stop: set[int], pad_id: int) -> tuple[list[int], int]:
        row = self._state
        n_head = len(row.head)
        n_in = len(row.step_input())
        pred = [pad_id] * (n_in - len(logits)) + logits.argmax(dim=-1).tolist()  # (W,): unread ones padded
        n_new = jacobi._iterate(row, pred, stop, self.block_size, self.max_new_tokens, self.init, pad_id, False)
        self.finish_reason = row.finish_reason
        return row.generated[-n_new:], n_head + n_new - 1

    def _gated(self, logits: torch.Tensor, stop: set[int], drafter) -> tuple[list[int], list[int]]:
        taken, reason, keep = self._state.step(logits, stop, self.max_new_tokens, drafter)
        self.finish_reason = reason
        return taken, keep


def prefill_groups(rows: list[Row], max_padding: float = 0.25) -> list[list[Row]]:
    """Joining rows in groups of similar input length, one prefill forward each: a group grows (shortest first)
    while its padded size stays within (1 + max_padding) x its real tokens. One padded forward over many prompts
    is cheaper per token than one each, but padding a short prompt to a long one is paid in full (pure rule)."""
    groups: list[list[Row]] = []
    real = 0
    for n, _, row in sorted((len(row.step_input()), i, row) for i, row in enumerate(rows)):
        if groups and n * (len(groups[-1]) + 1) <= (1 + max_padding) * (real + n):
            groups[-1].append(row)
            real += n
        else:
            groups.append([row])
            real = n
    return groups


class ContinuousBatch:
    """The running batch of one model. `step(joining)` prefills the joining rows (those of similar length together
    in one forward), then runs one forward over all running rows; it returns the rows that finished in this step.
    Not thread-safe: one thread (the server's worker) owns it."""

    def __init__(self, model, stop: set[int], pad_id: int):
        self.model, self.stop, self.pad_id = model, stop, pad_id
        self.device = next(model.parameters()).device
        self.cache = RaggedCache(0, self.device, pad_id)
        self.rows: list[Row] = []
        self.forwards = 0

    @torch.inference_mode()
    def step(self, joining: list[Row] = ()) -> list[Row]:
        done = self._drop_cancelled()
        if joining:
            for row in joining:
                row.start(self.device, self.pad_id)
            for group in prefill_groups(list(joining)):
                done += self._prefill(group)
        if self.rows:
            done += self._forward()
        return done

    def _prefill(self, joining: list[Row]) -> list[Row]:
        """The joining rows' prompts in one forward of their own (ragged, padded like the batch's steps); those
        not finished by it join the running cache. Returns the finished ones."""
        group = RaggedCache(len(joining), self.device, self.pad_id)
        group.keep(self._run(group, joining))
        still = [j for j, row in enumerate(joining) if row.finish_reason is None]
        if still:
            if len(still) < len(joining):
                group.select(still)
            self.cache.concat(group)
            self.rows += [joining[j] for j in still]
        return [row for row in joining if row.finish_reason is not None]

    def _forward(self) -> list[Row]:
        self.cache.keep(self._run(self.cache, self.rows))
        return self._leave([row for row in self.rows if row.finish_reason is not None])

    def _run(self, cache: RaggedCache, rows: list[Row]) -> list:
        """One forward of these rows on `cache`, computing only the logits they read; each row consumes its own.
        Returns how many new entries each keeps (gated rows: which)."""
        if any(row.method == "gated" for row in rows):
            return self._run_tree(cache, rows)
        last = max(row.n_logits() for row in rows)
        logits, lengths = cache.forward(self.model, [row.step_input() for row in rows], last=last)  # (B, last, V)
        self.forwards += 1
        return [row.consume(logits[b, last - min(last, n) :], self.stop, self.pad_id)
                for b, (row, n) in enumerate(zip(rows, lengths))]

    def _run_tree(self, cache: RaggedCache, rows: list[Row]) -> list:
        """One forward with per-row positions, visibility and gate (a gated row is in the batch)."""
        parts = [row.tree_input() for row in rows]
        gate = torch.zeros(len(rows), max(len(p[0]) for p in parts))  # (B, W): the draft copies at 1
        for b, (ids, _, _, n_draft) in enumerate(parts):
            gate[b, len(ids) - n_draft : len(ids)] = 1.0
        head = sampler_of(self.model)
        with gated(self.model, gate.to(self.device)), final_hidden(self.model, head is not None) as hidden:
            logits, lengths = cache.forward_tree(self.model, *[[p[i] for p in parts] for i in range(3)])  # (B, W, V)
        self.forwards += 1
        keep = []
        for b, (row, n, part) in enumerate(zip(rows, lengths, parts)):
            drafter = None
            opts = row._state.opts if row.method == "gated" else None
            if head is not None and opts is not None and opts.sampler_tokens:
                n_draft = part[3]  # the row's draft rows are its last inputs
                drafter = SamplerDrafter(self.model, head, hidden[-1][b, :n],
                                         logits[b, n - n_draft : n], opts, row._state.head_ctx)
            keep.append(row.consume(logits[b, :n], self.stop, self.pad_id, drafter))
        return keep

    def _drop_cancelled(self) -> list[Row]:
        for row in self.rows:
            if row.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        return self._leave([row for row in self.rows if row.finish_reason is not None])

    def _leave(self, gone: list[Row]) -> list[Row]:
        if gone:
            still = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
            self.cache.select(still)
            self.rows = [self.rows[i] for i in still]
        return gone

    def fail_all(self) -> list[Row]:
        """After an exception in a forward: every running row leaves, the cache starts empty."""
        rows, self.rows = self.rows, []
        self.cache = RaggedCache(0, self.device, self.pad_id)
        return rows
