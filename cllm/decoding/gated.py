"""Gated decoding: a gated LoRA adapter drafts, the base model verifies, in one forward. Lossless: greedy, the
output is the base model's greedy output whatever the adapter learnt; with temperature > 0 each token is drawn from
the base's (warped) distribution whatever the adapter learnt (`sample_accept`). Batch size 1 here; several rows
under continuous batching (`cllm.decoding.continuous`).

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

With `draft_topk` k > 1 the draft's k - 1 runners-up at the guess's first position are verified too, each as a
branch `[runner-up][rest of the guess]`: most forwards commit one token because that first guess token is wrong
(it is drafted two ahead of the committed text, before the base's next token is known). `topk_tokens` m cuts
each such branch to m rows (m = 1: the runner-up alone, which commits 2 tokens when it is right, for one row).

An adapter with a sampler head (`cllm.decoding.sampler_head`) redrafts the next guess after the forward instead:
from the draft rows' final hidden states and the base's next token, one token after another, each given the one
before it (`sampler_tokens` of them; the rest stay the draft's). Its runners-up for the first token are then the
`draft_topk` branches, each continued by the head's own tokens after it instead of the rest of the guess.

The pool holds the N-grams of the prompt and of the committed text keyed by their first token (prompt lookup, as
Lookahead's pool holds its window's n-grams); the branches keyed by the head's last token are verified beside the
guess in the same forward. With a datastore (`cllm.decoding.datastore`: the base's own responses to training
prompts, REST's retrieval) the continuations of the committed text's longest suffix found there are verified too.

Sampling (temperature > 0): the branches are deterministic proposals, so they are verified as a token tree by
multi-candidate speculative sampling (SpecInfer's rule, Miao et al. 2024, with point-mass drafts): at each node the
distinct next tokens of the branches still alive are tried in turn, each accepted with its probability under the
base's distribution there, renormalized after every rejection; when none is accepted (or a branch ends) the next
token is drawn from what is left. Each committed token is then distributed exactly as base sampling would draw it.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from cllm.decoding.common import (BlockTrajectory, DecodeResult, SeqCache, check_lengths, committed_result, eos_ids,
                                  finish, single_prompt)
from cllm.decoding.datastore import load_datastore
from cllm.decoding.gate import gated, shared_below
from cllm.decoding.lookahead import NgramPool, _forward
from cllm.decoding.options import DRAFT_INPUTS, GatedOptions  # noqa: F401 (re-exported)
from cllm.decoding.sampler_head import HeadContext, Reads, final_hidden, redraft, sampler_of
from cllm.decoding.sampling import warp_logits

def accept_length(branch: list[int], pred: list[int]) -> int:
    """How many leading tokens of `branch` the base confirms: pred[i] is the base's greedy token at branch[i]'s
    position given everything before it, so branch[i] stands while branch[:i+1] == pred[:i+1] (pure rule)."""
    n = 0
    while n < len(branch) and n < len(pred) and branch[n] == pred[n]:
        n += 1
    return n


def sample_accept(branches: list[list[int]], dist, gen: torch.Generator) -> tuple[int, int, int]:
    """Speculative sampling over deterministic branches that all start at the same position (pure rule):
    `dist(k, i)` is the base's warped distribution (V,) at branch k's token i given the text and branch k's tokens
    before i. Returns (a winning branch k, how many of its leading tokens are accepted, the next token drawn after
    them); every token is distributed as the base's sampling would draw it."""
    alive, n = list(range(len(branches))), 0
    p = dist(0, 0).clone()
    while True:
        nexts = list(dict.fromkeys(branches[k][n] for k in alive if len(branches[k]) > n))  # distinct, in order
        for c in nexts:
            if float(torch.rand((), generator=gen)) < float(p[c]):
                break
            p[c] = 0.0  # rejected: the draw continues from p without c
            p = p / p.sum()
        else:
            return alive[0], n, int(torch.multinomial(p, 1, generator=gen))
        alive = [k for k in alive if len(branches[k]) > n and branches[k][n] == c]
        n += 1
        p = dist(alive[0], n).clone()


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


def read_logits(logits: torch.Tensor, n_draft: int, topk: int) -> tuple[list[int], list[list[int]] | None]:
    """(every row's argmax (L,), the last `n_draft` (draft) rows' next `topk - 1` best tokens or None) of one
    forward's (L, V) logits."""
    pred = logits.argmax(-1).tolist()
    if topk <= 1:
        return pred, None
    return pred, logits[logits.shape[0] - n_draft :].topk(topk, dim=-1).indices[:, 1:].tolist()  # (n_draft, k-1)


def resolve_options(model, opts: GatedOptions) -> GatedOptions:
    """The options with what the loaded adapter was trained on filled in (its gate file): the draft input unless
    given, and the mask token id."""
    from cllm.decoding.gate import gate_state

    state = gate_state(model)
    meta = state.meta if state is not None else {}
    return dataclasses.replace(opts, draft_input=opts.draft_input or meta.get("draft_input", "guess"),
                               mask_token_id=meta.get("mask_token_id", 0))


@torch.inference_mode()
def gated_decode(model, tokenizer, prompt_ids, options: GatedOptions | None = None, max_new_tokens: int = 256,
                 seed: int | list[int] = 0, eos_token_id=None, on_commit=None) -> DecodeResult | list[DecodeResult]:
    """Gated decoding of one prompt (greedy, or sampling with temperature > 0) with a model loaded with a gated
    adapter (`cllm.decoding.gate`).
    `on_commit(0, token_ids)`, if given, is called with the tokens each forward commits (streaming)."""
    opts = options or GatedOptions()
    opts.check()
    prompt, single = single_prompt(prompt_ids, "gated decoding")
    check_lengths(max_new_tokens)
    stop = eos_ids(model, tokenizer, eos_token_id)
    t0 = time.perf_counter()
    cache, run = SeqCache(model), GatedRun(prompt, opts, int(seed[0] if isinstance(seed, list) else seed))
    head = sampler_of(model) if opts.sampler_tokens else None
    reason = None
    while reason is None:
        ids, rel_pos, visible, n_draft = run.inputs()
        S, L = cache.n, len(ids)
        mask = torch.ones(L, S + L, dtype=torch.bool)  # (L, S + L): the cache is seen by all
        mask[:, S:] = visible
        gate = torch.zeros(1, L)  # (1, L): the draft copy at 1
        gate[0, L - n_draft :] = 1.0
        sources = run.draft_sources() if opts.share_below else None
        with gated(model, gate.to(cache.device)), shared_below(model, L - n_draft, sources), \
                final_hidden(model, head is not None) as hidden:
            logits = _forward(cache, ids, [S + p for p in rel_pos], mask)  # (L, V)
        drafter = None
        if head is not None:
            drafter = SamplerDrafter(model, head, hidden[-1][0], logits[L - n_draft :], opts, run.head_ctx)
        taken, reason, keep = run.step(logits, stop, max_new_tokens, drafter)
        cache.keep(list(range(S)) + [S + k for k in keep])
        if on_commit is not None:
            on_commit(0, taken)
    result = committed_result(tokenizer, run.generated, run.accept_lengths, reason, t0, run.stats)
    result.trajectory = run.guess_trajectory()
    return result if single else [result]


class SamplerDrafter:
    """`GatedRun.apply`'s redrafter from one forward's final hidden states `hidden` (L, d), its last n_draft rows
    the draft's, and the draft rows' logits (n_draft, V). Called with (draft row, the token now at its position, how
    many, the forward's row that predicted that token or None) it returns the head's tokens from that row on and its
    first runners-up. A head that reads the base's hidden state gets that row's (the verified prefix's); with None
    (a runner-up branch's tail, chained after the last call's first token) the z of that first token. An attending
    head reads the committed text from `ctx` (the row's), which `commit(tokens, rows, positions)` extends with the
    tokens this forward committed and the rows that predicted them."""

    def __init__(self, model, head, hidden: torch.Tensor, logits: torch.Tensor, opts: GatedOptions,
                 ctx: HeadContext | None = None):
        self.model, self.head, self.hidden, self.logits, self.opts, self.ctx = model, head, hidden, logits, opts, ctx
        self.draft = hidden[hidden.shape[0] - logits.shape[0] :]  # (n_draft, d)
        self.first: torch.Tensor | None = None  # the z of the last call's first token

    def __call__(self, row: int, token: int, count: int, base_row: int | None = None) -> tuple[list[int], list[int]]:
        opts = self.opts
        if opts.sampler_tokens > 0:
            count = min(count, opts.sampler_tokens)
        cand = None
        if opts.sampler_candidates:  # (count, K): each row's own most likely tokens
            k = min(opts.sampler_candidates, self.logits.shape[-1])
            cand = self.logits[row : row + count].topk(k, dim=-1).indices
        base = self.hidden[base_row] if base_row is not None else self.first
        # the committed token is the context's last; a runner-up's tail starts one position after it
        reads = Reads(base, self.ctx, fresh=base_row is None)
        tokens, alts, z = redraft(self.model, self.head, self.draft[row : row + count], token, count,
                                  opts.draft_topk, cand, reads)
        if base_row is not None:
            self.first = z
        return tokens, alts

    def commit(self, tokens: list[int], rows: list[int], positions: list[int]) -> None:
        if self.ctx is not None and self.head.attn_heads:
            self.ctx.add(self.model, self.head, tokens, self.hidden[rows], positions)


class GatedRun:
    """One prompt under gated decoding, without its cache: the committed text, the guess and the n-gram pool.
    `inputs()` gives a forward's tokens, `apply(pred)` takes the base's and the draft's argmax of them; the caller
    owns the cache (`gated_decode`: its own; continuous batching: a row of the shared one)."""

    def __init__(self, prompt: list[int], opts: GatedOptions, seed: int = 0):
        if opts.draft_input is None:
            opts = dataclasses.replace(opts, draft_input="guess")
        self.opts = opts
        self.width = opts.block_size - 1
        self.head, self.generated, self.prompt = list(prompt), [], list(prompt)
        self.accept_lengths: list[int] = []
        self.pool = NgramPool(opts.pool_candidates)
        self.store = load_datastore(opts.datastore) if opts.datastore else None
        self._add_ngrams(prompt, 0)
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(prompt), (self.width,), generator=gen).tolist()
        self.guess = [prompt[i] for i in idx]  # y(0): prompt tokens at random, as Jacobi starts
        # forward_rows: the rows (tokens) of every forward, which set its cost
        self.stats = {"tokens_from_draft": 0, "tokens_from_pool": 0, "pool_verified": 0, "forward_rows": 0}
        self._rng = torch.Generator().manual_seed(seed)  # sampling's draws (temperature > 0)
        self.head_ctx = HeadContext()  # the committed text as an attending sampler head reads it
        self._branches: list[list[int]] = []
        self._alts: list[int] = []  # the draft's runners-up for the guess's first token (draft_topk)
        self._tails: dict[int, list[int]] = {}  # a runner-up -> the sampler head's tokens after it
        self._n_alt = self._n_store = 0  # runner-up and datastore branches among them
        self.guesses: list[tuple[int, list[int]]] = []  # (offset among the generated tokens, guess) of each forward

    def guess_trajectory(self) -> list[BlockTrajectory]:
        """Each forward's guess as the draft read it (one state) with the committed tokens at its positions as the
        fixed point: the on-policy states `cllm gen --decoder gated` records. Consecutive guesses overlap."""
        return [BlockTrajectory(i, start, [guess], self.generated[start : start + len(guess)])
                for i, (start, guess) in enumerate(self.guesses)]

    def _add_ngrams(self, text: list[int], start: int) -> None:
        """The pool gets the N-grams of `text` that begin at index >= start."""
        N = self.opts.pool_ngram
        for i in range(max(start, 0), len(text) - N + 1):
            self.pool.add(text[i], tuple(text[i + 1 : i + N]))

    def inputs(self) -> tuple[list[int], list[int], torch.Tensor, int]:
        """This forward's tokens `[head][guess][pooled n-grams][lookup][draft]`, their positions after the
        committed tokens that have K/V, their (L, L) visibility, and how many at the end are the draft (gate 1)."""
        head = self.head
        cands = [list(c) for c in self.pool.get(head[-1])]
        if self.opts.lookup_tokens:
            found = lookup_continuation(self.prompt + self.generated, self.opts.lookup_tokens)
            cands = ([found] if found else []) + [c for c in cands if c != found[: len(c)]]
        self._n_store = 0
        if self.store is not None:
            o = self.opts
            for c in self.store.continuations(self.prompt + self.generated, o.datastore_candidates, o.datastore_tokens,
                                              min_share=o.datastore_share):
                if not any(c == b[: len(c)] for b in cands):  # a prefix of a branch already verified adds nothing
                    cands.append(c)
                    self._n_store += 1
        draft_in = self.guess if self.opts.draft_input == "guess" else [self.opts.mask_token_id] * self.width
        alt = [self._alt_branch(a)[: self._alt_rows] for a in self._alts if a != self.guess[0]]
        self._branches, self._n_alt = [self.guess, *alt, *cands], len(alt)
        lengths = [len(b) for b in self._branches] + [self.width]
        h = len(head)
        ids = head + [t for b in self._branches for t in b] + draft_in
        self.stats["forward_rows"] += len(ids)
        rel_pos = list(range(h)) + [h + j for g in lengths for j in range(g)]
        return ids, rel_pos, branch_mask(h, lengths), self.width

    def draft_sources(self) -> list[int] | None:
        """The rows of the last `inputs()` that the draft rows copy below the adapter: the guess (the first branch,
        after the head: same tokens, positions and visibility); None for mask drafts (their tokens differ)."""
        if self.opts.draft_input != "guess":
            return None
        h = len(self.head)
        return list(range(h, h + self.width))

    def step(self, logits: torch.Tensor, stop: set[int], max_new_tokens: int,
             drafter=None) -> tuple[list[int], str | None, list[int]]:
        """`apply` with one forward's logits (L, V) of the last `inputs()`: greedy, or with temperature > 0 the
        branch and tokens `sample_accept` draws."""
        pred, alts = read_logits(logits, self.width, self.opts.draft_topk)
        choice = self._sampled(logits) if self.opts.temperature > 0 else None
        return self.apply(pred, stop, max_new_tokens, alts, drafter, choice)

    def _sampled(self, logits: torch.Tensor) -> tuple[int, int, int]:
        h, o = len(self.head), self.opts
        starts = [h + sum(len(b) for b in self._branches[:k]) for k in range(len(self._branches))]

        def dist(k: int, i: int) -> torch.Tensor:  # (V,): the row before branch k's token i
            row = h - 1 if i == 0 else starts[k] + i - 1
            return warp_logits(logits[row], o.temperature, o.top_k, o.top_p).softmax(-1).cpu()
        return sample_accept(self._branches, dist, self._rng)

    def apply(self, pred: list[int], stop: set[int], max_new_tokens: int, alts: list[list[int]] | None = None,
              drafter=None, choice: tuple[int, int, int] | None = None) -> tuple[list[int], str | None, list[int]]:
        """Verify the branches against the base's argmax `pred` (L,), commit, draft the next guess (and keep the
        draft's runners-up `alts` (width, k - 1) at its first position, from `read_logits`; with a sampler
        head's `drafter` (`SamplerDrafter`) the head redrafts it from the committed token on); returns (the
        tokens committed, the finish reason once the decode ends, the indices of this forward's tokens whose K/V
        stay: the head and the winning branch's accepted tokens)."""
        branches, h = self._branches, len(self.head)
        self.guesses.append((len(self.generated), list(self.guess)))
        best, best_n, nxt = choice if choice is not None else self._greedy_choice(pred)
        best_start = h + sum(len(b) for b in branches[:best])
        winner = branches[best]
        correct = winner[:best_n] + [nxt]
        taken, reason = finish(self.generated, correct, stop, max_new_tokens)
        self._record(best, best_n)
        keep = list(range(h)) + list(range(best_start, best_start + best_n))
        if reason is None and getattr(drafter, "commit", None) is not None:
            # kept row i predicted the committed token after it: head[1:] (the prompt, first forward), then taken
            C = len(self.prompt) + len(self.generated)
            drafter.commit(self.head[1:] + taken, keep, list(range(C - len(keep), C)))
        self.head = [taken[-1]]
        self.accept_lengths.append(len(taken))
        self._add_ngrams(self.generated, len(self.generated) - len(taken) - self.opts.pool_ngram)
        drafted = pred[len(pred) - self.width :]  # drafted[i] predicts the token after guess position i
        guess = drafted[best_n:] if best_n < self.width else []
        self._alts = alts[best_n] if alts is not None and best_n < self.width else []
        if drafter is not None and guess and reason is None:
            # draft row best_n stands where the committed token `taken[-1]` now is: the head knows it
            # the base's hidden state that predicted it: the last accepted row's, or the head's last row's
            redrafted, self._alts = drafter(best_n, taken[-1], len(guess), best_start + best_n - 1 if best_n else h - 1)
            guess = redrafted + guess[len(redrafted) :]
        self._tails = self._head_tails(drafter, best_n, guess) if drafter is not None and reason is None else {}
        self.guess = self._fill(guess, taken[-1])
        return taken, reason, keep

    def _greedy_choice(self, pred: list[int]) -> tuple[int, int, int]:
        """(the branch with the longest run of the base's argmax, that run's length, the base's token after it)."""
        h = len(self.head)
        first = pred[h - 1]  # the base's next token after the committed text
        best, best_n, start, best_start = 0, -1, h, h
        for k, b in enumerate(self._branches):
            n = accept_length(b, [first] + pred[start : start + len(b) - 1])
            if n > best_n:
                best, best_n, best_start = k, n, start
            start += len(b)
        return best, best_n, first if best_n == 0 else pred[best_start + best_n - 1]

    @property
    def _alt_rows(self) -> int:
        """Rows of one runner-up branch (topk_tokens; 0 = as many as the guess)."""
        return self.opts.topk_tokens or self.width

    def _alt_branch(self, alt: int) -> list[int]:
        """A runner-up's branch: the runner-up at the guess's first position, then the head's tokens after it (if it
        drafted them), then the rest of the guess."""
        tail = self._tails.get(alt, [])
        return [alt, *tail, *self.guess[1 + len(tail) :]]

    def _head_tails(self, drafter, row: int, guess: list[int]) -> dict[int, list[int]]:
        """The sampler head's tokens after each runner-up (other than the guess's first token): draft row `row + 1`
        stands where the runner-up would be, so the head reads it with the runner-up, then chains (as many as the
        branch holds after it)."""
        count = min(self._alt_rows, len(guess)) - 1
        if count <= 0 or self.opts.draft_topk <= 1:
            return {}
        return {a: drafter(row + 1, a, count, None)[0] for a in self._alts if a != guess[0]}

    def _fill(self, guess: list[int], last: int) -> list[int]:
        """The next guess: the draft's tokens past the committed run, then (the window moved on by the tokens
        committed) continued from the pool's most recent n-gram after the last token, else that token repeated."""
        guess = list(guess)
        while len(guess) < self.width:
            key = guess[-1] if guess else last
            grams = self.pool.get(key)
            guess += list(grams[-1]) if grams else [key]
        return guess[: self.width]

    def _record(self, best: int, n: int) -> None:
        self.stats["pool_verified"] += len(self._branches) - 1 - self._n_alt
        key = "tokens_from_draft" if best == 0 else "tokens_from_topk" if best <= self._n_alt else "tokens_from_pool"
        if best >= len(self._branches) - self._n_store:
            key = "tokens_from_datastore"
        self.stats[key] = self.stats.get(key, 0) + n

