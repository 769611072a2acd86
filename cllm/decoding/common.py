"""Pieces every decoder shares: the result dataclass and a KV cache for rows that advance at different speeds."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cllm.errors import CllmError


@functools.cache
def _cache_kwarg(model_cls: type) -> str:
    """The name `model_cls.forward` takes its KV cache by: transformers >= 5.24 says `cache` (`past_key_values` is
    deprecated there, removal announced for 5.40); remote-code and older models still say `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cached_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, attention_mask=None,
                   logits_at: torch.Tensor | None = None):
    """One forward of `input_ids` (B, W) on top of `cache`; returns (logits (B, W, V), the updated cache). With
    `logits_at` (B, P) positions, only those logits are computed (B, P, V): the LM head over every prompt position
    is a fifth of a prefill's work on a small model, and only the last one is needed (as `generate` does)."""
    # A PEFT wrapper's forward takes **kwargs and hands them to the wrapped model: that model's forward decides.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = _cache_kwarg(type(inner))
    extra = {} if logits_at is None else {"logits_to_keep": logits_at}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **{name: cache}, **extra)
    return out.logits, (out.cache if name == "cache" else out.past_key_values)


@dataclass
class BlockTrajectory:
    """One n-token block of a Jacobi decode: every iteration's input state and the fixed point it reached."""

    block_index: int
    start: int  # offset of the block's first token among the generated tokens
    states: list[list[int]]  # y(0) .. y(k): the input state of every iteration, `width` ids each
    fixed_point: list[int]  # the committed tokens; shorter than `width` only when EOS ended the block


@dataclass
class DecodeResult:
    """Output and statistics of decoding one prompt."""

    token_ids: list[int]  # new tokens only (EOS included when it stopped the row)
    text: str
    n_forwards: int  # model forward passes this prompt took part in (the prefill counts as one)
    accept_lengths: list[int]  # tokens committed by each forward pass
    finish_reason: str  # "eos" or "length"
    wall_time_s: float = 0.0  # seconds from the start of the call until this row finished
    n_fast_forward: int = 0  # tokens committed beyond the first in an iteration (CLLM)
    n_stationary: int = 0  # tokens already right and unchanged while an earlier token was still wrong (CLLM)
    trajectory: list[BlockTrajectory] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_forward(self) -> float:
        return self.n_new_tokens / self.n_forwards if self.n_forwards else 0.0


def eos_ids(model, tokenizer, eos_token_id=None) -> set[int]:
    """The ids that end generation: the argument if given, else the model's generation config, else the tokenizer's."""
    if eos_token_id is None:
        gen_cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(i) for i in eos_token_id}


def as_batch(prompt_ids) -> tuple[list[list[int]], bool]:
    """Accept one prompt (list of ids) or a batch (list of lists); return the batch and whether it was single."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) == 0:
        raise CllmError("no prompt given")
    single = isinstance(prompt_ids[0], int)
    batch = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    for i, p in enumerate(batch):
        if len(p) == 0:
            raise CllmError(f"prompt {i} is empty")
    return batch, single


def check_lengths(max_new_tokens: int, block_size: int | None = None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CllmError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise CllmError(f"block_size must be a positive integer, got {block_size!r}")


class RaggedCache:
    """A KV cache for a batch whose rows keep different numbers of tokens per forward pass.

    All rows share one `DynamicCache` of length S; `valid` (B, S) marks which entries a row really owns. A
    forward appends W columns to every row (shorter inputs are right-padded); `keep` then marks, per row, how
    many of the new columns stay valid and crops the columns no row keeps. Dropped entries of one row that
    another row keeps become holes, masked out of attention; position ids come from the count of valid entries,
    so every row sees exactly the context it would see alone. With batch size 1 there are never holes.
    """

    def __init__(self, batch_size: int, device: torch.device, pad_token_id: int):
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # (B, S)
        self.device = device
        self.pad_token_id = pad_token_id
        self._last_width = 0

    @property
    def n_rows(self) -> int:
        return self.valid.shape[0]

    def forward(self, model, inputs: list[list[int]], last: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Run `model` on one token list per row on top of the cache. Returns logits (B, W, V) and the lengths; with
        `last`, only the logits of each row's last `last` inputs (B, last, V), aligned at each row's end (a row
        with fewer inputs has its first input's logits repeated in front)."""
        if len(inputs) != self.n_rows:
            raise ValueError(f"{len(inputs)} inputs for {self.n_rows} cache rows")
        lengths = [len(x) for x in inputs]
        width = max(lengths)
        input_ids = torch.full((self.n_rows, width), self.pad_token_id, dtype=torch.long, device=self.device)
        new_valid = torch.zeros(self.n_rows, width, dtype=torch.bool, device=self.device)  # (B, W)
        for b, x in enumerate(inputs):
            input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long, device=self.device)
            new_valid[b, : len(x)] = True
        start = self.valid.sum(dim=1, keepdim=True)  # (B, 1): tokens each row owns so far
        position_ids = start + torch.arange(width, device=self.device).unsqueeze(0)  # (B, W)
        attention_mask = torch.cat([self.valid, new_valid], dim=1).long()  # (B, S + W)
        if bool(attention_mask.all()):
            attention_mask = None  # no holes and no padding: let the model take its plain causal path
        logits_at = None
        if last is not None:
            ends = torch.tensor(lengths, device=self.device).unsqueeze(1)  # (B, 1)
            logits_at = (ends - last + torch.arange(last, device=self.device)).clamp(min=0)  # (B, last)
        logits, self.cache = cached_forward(model, input_ids, position_ids, self.cache, attention_mask, logits_at)
        self.valid = torch.cat([self.valid, torch.zeros_like(new_valid)], dim=1)
        self._last_width = width
        return logits, lengths

    def forward_tree(self, model, inputs: list[list[int]], rel_positions: list[list[int]],
                     visible: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Like `forward`, but each row's new tokens carry their own positions (after the row's committed tokens)
        and their own (L_b, L_b) visibility among themselves: branches verified side by side (gated decoding).
        Returns logits (B, W, V) of every input and the lengths."""
        lengths = [len(x) for x in inputs]
        B, width, S = self.n_rows, max(lengths), self.valid.shape[1]
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long, device=self.device)
        start = self.valid.sum(dim=1)  # (B,): tokens each row owns so far
        position_ids = start.unsqueeze(1) + torch.arange(width, device=self.device).unsqueeze(0)  # (B, W)
        new = torch.eye(width, dtype=torch.bool, device=self.device).repeat(B, 1, 1)  # (B, W, W): padding sees itself
        for b, (x, pos, vis) in enumerate(zip(inputs, rel_positions, visible)):
            n = len(x)
            input_ids[b, :n] = torch.tensor(x, dtype=torch.long, device=self.device)
            position_ids[b, :n] = start[b] + torch.tensor(pos, dtype=torch.long, device=self.device)
            new[b, :n, :n] = vis.to(self.device)
        old = self.valid.unsqueeze(1).expand(B, width, S)  # (B, W, S): each row's own committed entries
        mask = torch.cat([old, new], dim=2).unsqueeze(1)  # (B, 1, W, S + W), True = visible
        logits, self.cache = cached_forward(model, input_ids, position_ids, self.cache, mask)
        self.valid = torch.cat([self.valid, torch.zeros(B, width, dtype=torch.bool, device=self.device)], dim=1)
        self._last_width = width
        return logits, lengths

    def keep(self, n_keep: list) -> None:
        """After `forward`: row b keeps the KV of its first n_keep[b] new tokens (or of the new tokens at the
        indices n_keep[b], a list: a verified branch); columns nobody keeps are cropped."""
        width = self._last_width
        s0 = self.valid.shape[1] - width
        for b, k in enumerate(n_keep):
            if isinstance(k, int):
                self.valid[b, s0 : s0 + k] = True
            else:
                self.valid[b, [s0 + c for c in k]] = True
        n_keep = [k if isinstance(k, int) else max(k, default=-1) + 1 for k in n_keep]  # columns used
        max_keep = max(n_keep) if n_keep else 0
        if width - max_keep > 0:
            self.cache.crop(-(width - max_keep))  # transformers 5: a negative count of tokens to remove
            self.valid = self.valid[:, : s0 + max_keep]
        self._last_width = 0

    def select(self, rows: list[int]) -> None:
        """Keep only these rows (finished rows leave the batch so they cost nothing)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.valid.shape[1] > 0:
            self.cache.batch_select_indices(idx)
        self.valid = self.valid[idx]
        # Trailing columns no remaining row owns are cropped; holes in the middle stay masked.
        owned = self.valid.any(dim=0).nonzero()
        n_used = int(owned.max()) + 1 if owned.numel() else 0
        n_drop = self.valid.shape[1] - n_used
        if 0 < n_drop < self.valid.shape[1]:
            self.cache.crop(-n_drop)
            self.valid = self.valid[:, :n_used]


    def concat(self, other: "RaggedCache") -> None:
        """Append `other`'s rows below these (continuous batching: a request prefilled on its own joins the running
        batch). The side with fewer columns gets masked columns on the right, so both have S; holes stay masked and
        every row keeps exactly the entries it owned."""
        if self.n_rows == 0 or not self.cache.layers:
            self.cache, self.valid = other.cache, other.valid
            return
        s1, s2 = self.valid.shape[1], other.valid.shape[1]
        width = max(s1, s2)

        def pad(t: torch.Tensor, s: int) -> torch.Tensor:  # (B, H, s, D) -> (B, H, width, D)
            return torch.nn.functional.pad(t, (0, 0, 0, width - s))

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, s1), pad(theirs.keys, s2)], dim=0)
            mine.values = torch.cat([pad(mine.values, s1), pad(theirs.values, s2)], dim=0)
        self.valid = torch.cat([torch.nn.functional.pad(self.valid, (0, width - s1)),
                                torch.nn.functional.pad(other.valid, (0, width - s2))], dim=0)


class SeqCache:
    """The KV cache of one model over one sequence (batch 1) that may lag behind the committed tokens.

    `n` is how many tokens of the sequence the cache holds; `forward` appends tokens and returns their logits,
    `crop` drops entries beyond a length (rejected draft tokens). Draft-then-verify decoders keep one per model.
    """

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache()
        self.n = 0
        self.device = next(model.parameters()).device

    def forward(self, ids: list[int]) -> torch.Tensor:
        """Run the model on `ids` after the cached tokens; logits (len(ids), V) in float32."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, W)
        position_ids = torch.arange(self.n, self.n + len(ids), device=self.device).unsqueeze(0)  # (1, W)
        logits, self.cache = cached_forward(self.model, input_ids, position_ids, self.cache)
        self.n += len(ids)
        return logits[0].float()

    def crop(self, length: int) -> None:
        """Keep the first `length` cached tokens."""
        if length < self.n:
            self.cache.crop(-(self.n - length))  # transformers 5: a negative count of tokens to remove
            self.n = length

    def keep(self, columns: list[int]) -> None:
        """Keep the cached entries at these indices, in this order (a verified branch that was not the first one
        fed after the prefix: its K/V move up to follow the prefix)."""
        # The layers below a gated adapter may hold fewer entries (`cllm.decoding.gate.shared_below`): crop
        # counts from the end, so only a cache of one length per layer is cropped.
        uniform = all(layer.keys.shape[-2] == self.n for layer in self.cache.layers)
        if uniform and columns == list(range(len(columns))):
            self.crop(len(columns))
            return
        idx = torch.tensor(columns, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., idx, :], layer.values[..., idx, :]
        self.n = len(columns)


def committed_result(tokenizer, generated: list[int], accept_lengths: list[int], reason: str, t0: float,
                     extra: dict | None = None) -> DecodeResult:
    """The result of a batch-1 decode that committed `accept_lengths[i]` tokens with its i-th forward."""
    import time

    return DecodeResult(
        token_ids=generated,
        text=tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else "",
        n_forwards=len(accept_lengths),
        accept_lengths=accept_lengths,
        finish_reason=reason,
        wall_time_s=time.perf_counter() - t0,
        n_fast_forward=sum(a - 1 for a in accept_lengths),
        extra=extra or {},
    )


def single_prompt(prompt_ids, method: str) -> tuple[list[int], bool]:
    """Draft-then-verify decoders take one prompt; a batch of one is accepted, more is a clear error."""
    batch, single = as_batch(prompt_ids)
    if len(batch) != 1:
        raise CllmError(f"{method} decodes one prompt at a time (batch size 1), got a batch of {len(batch)}")
    return batch[0], single


def finish(generated: list[int], new: list[int], stop: set[int], max_new_tokens: int) -> tuple[list[int], str | None]:
    """Append `new` to `generated`, cut after the first stop id or at `max_new_tokens`; return (taken, reason)."""
    taken = []
    for tok in new:
        taken.append(tok)
        if tok in stop:
            generated.extend(taken)
            return taken, "eos"
        if len(generated) + len(taken) >= max_new_tokens:
            generated.extend(taken)
            return taken, "length"
    generated.extend(taken)
    return taken, None


class DraftVerifyRun:
    """The state of one prompt under a draft-then-verify decoder (SpS, MTAD): both KV caches, the committed
    sequence, the random generator, and the statistics; `commit` applies one verified round."""

    def __init__(self, target, draft, tokenizer, prompt: list[int], max_new_tokens: int, seed, eos_token_id=None):
        import time

        self.t_cache, self.d_cache = SeqCache(target), SeqCache(draft)
        self.tokenizer = tokenizer
        self.seq = list(prompt)
        self.generated: list[int] = []
        self.accept_lengths: list[int] = []
        self.stats = {"iterations": 0, "drafted": 0, "accepted": 0, "draft_forwards": 0}
        self.reason: str | None = None
        self.max_new_tokens = max_new_tokens
        seed = seed[0] if isinstance(seed, list) else seed
        self.gen = torch.Generator(device=self.t_cache.device).manual_seed(int(seed))
        self.stop = eos_ids(target, tokenizer, eos_token_id)
        self.t0 = time.perf_counter()

    def draft_length(self, gamma: int) -> int:
        """Never draft past the length cap (0 when only one token is left: a plain target step)."""
        return min(gamma, self.max_new_tokens - len(self.generated) - 1)

    def commit(self, draft_ids: list[int], n_accepted: int, next_id: int) -> None:
        """Keep the first n_accepted drafts and the target's token; crop both caches to the accepted prefix."""
        base = len(self.seq)
        taken, self.reason = finish(self.generated, draft_ids[:n_accepted] + [next_id], self.stop,
                                    self.max_new_tokens)
        self.seq += taken
        self.t_cache.crop(base + n_accepted)  # the target holds seq + all drafts; the draft seq + all but the last
        self.d_cache.crop(base + n_accepted)
        self.accept_lengths.append(len(taken))
        self.stats["iterations"] += 1
        self.stats["drafted"] += len(draft_ids)
        self.stats["draft_forwards"] += len(draft_ids)
        self.stats["accepted"] += min(n_accepted, len(taken))

    def result(self) -> DecodeResult:
        import time

        return DecodeResult(
            token_ids=self.generated,
            text=self.tokenizer.decode(self.generated, skip_special_tokens=True) if self.tokenizer else "",
            n_forwards=self.stats["iterations"],
            accept_lengths=self.accept_lengths,
            finish_reason=self.reason,
            wall_time_s=time.perf_counter() - self.t0,
            extra=self.stats,
        )
