"""The sampler head of a gated draft: the draft's next guess conditioned on the token just before it.

A gated forward verifies the guess and drafts the next one at the same time, so the draft row where the base's next
token (the one every forward commits) now stands read the old guess's token there, usually a wrong one: its
prediction of the token after it is made without knowing it, and half of the forwards commit one token because of
it (docs/experiments/gated.md). "Your LLM Knows the Future" (Samragh et al., 2025) gives its mask-token draft a
small sampler head for the same reason: the next token comes from the draft row's final hidden state *and* the
embedding of the token now known to stand at that row, one token after another, each conditioned on the one before.

Here: `z = h + down(SiLU(up([h; embed(token)])))`, logits = the model's own LM head at `z`, where `h` (d,) is the
draft row's final hidden state (the LM head's input) and `token` the one now at that row's position. `down` starts
at zero, so an untrained head predicts exactly what the draft row does. The head only proposes guess tokens; the
base verifies them as before, so the output stays the base's greedy output whatever the head learnt.

Trained with the gated objective (`--sampler-head`): at a noisy position t the head gets the draft's hidden state and
the fixed point's token t, its target is the base's distribution at the clean position t (the same teacher as the
draft's). Saved beside the adapter as SAMPLER_FILE and loaded with it.

A head made with `base_input` (`--sampler-base`) also reads `f` (d,), the base's final hidden state at the row that
predicted `token` (EAGLE's feature, Li et al. 2024): `z = h + down(SiLU(up([h; embed(token); f])))`. That row is
the verify row of the last accepted token, computed by the base from the verified text alone, where the draft row
read the old guess's token. In training it is the base's (gate 0) hidden state at the clean position t - 1 of the
same forward. Past the first redrafted token no verified row exists, so each next one reads the head's own `z`
before it in its place (EAGLE's draft chain).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

SAMPLER_FILE = "cllm_sampler.safetensors"


class SamplerHead(nn.Module):
    """(h (..., d), e (..., d)[, f (..., d) with `base_input`][, a (..., d) with `attn_heads`]) -> the hidden state
    the LM head reads (..., d)."""

    def __init__(self, hidden_size: int, inner_size: int | None = None, base_input: bool = False,
                 attn_heads: int = 0):
        super().__init__()
        if attn_heads and (not base_input or hidden_size % attn_heads):
            raise ValueError(f"an attending head reads the base (base_input) and splits d = {hidden_size} into "
                             f"heads evenly, got {attn_heads}")
        inner = inner_size or 2 * hidden_size
        width = (3 if base_input else 2) + (1 if attn_heads else 0)
        self.up = nn.Linear(width * hidden_size, inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)
        nn.init.zeros_(self.down.weight)  # untrained: the draft row's own prediction
        if attn_heads:
            d = hidden_size
            self.pair = nn.Linear(2 * d, d, bias=False)  # u = pair([embed(token); f]): one committed token
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.out = nn.Linear(d, d, bias=False)
            nn.init.zeros_(self.out.weight)  # untrained: the attention adds nothing (and its training is visible)
            # ALiBi (Press et al. 2022): head i's score falls by slope_i per position of distance; saved with the
            # weights (their count is the head count)
            self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, attn_heads + 1) / attn_heads))

    @property
    def base_input(self) -> bool:
        """Whether the head also reads the base's hidden state `f` (its input is 3 d wide, 4 d with attention)."""
        return self.up.in_features >= 3 * self.down.out_features

    @property
    def attn_heads(self) -> int:
        """Heads of the attention over the committed text (0: none)."""
        return int(self.slopes.numel()) if hasattr(self, "slopes") else 0

    def forward(self, h: torch.Tensor, e: torch.Tensor, f: torch.Tensor | None = None,
                a: torch.Tensor | None = None) -> torch.Tensor:
        parts = [h, e]
        if self.base_input:
            if f is None:
                raise ValueError("this sampler head reads the base's hidden state: pass f")
            parts.append(f)
        if self.attn_heads:
            if a is None:
                raise ValueError("this sampler head attends to the committed text: pass a")
            parts.append(a)
        return h + self.down(nn.functional.silu(self.up(torch.cat(parts, dim=-1))))

    def keys(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (..., H, d/H) of pair vectors u (..., d)."""
        _, k, v = self.qkv(u).chunk(3, dim=-1)
        shape = (*u.shape[:-1], self.attn_heads, -1)
        return k.reshape(shape), v.reshape(shape)

    def attend(self, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dist: torch.Tensor,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of query pairs u (B, M, d) over keys/values k, v (B, S, H, d/H) at distances dist (B, M, S)
        (query position - key position), where `allowed` (B, M, S) (default all) -> a (B, M, d)."""
        B, M, d = u.shape
        q = self.qkv(u)[..., :d].reshape(B, M, self.attn_heads, -1).transpose(1, 2)  # (B, H, M, d/H)
        scores = q @ k.permute(0, 2, 3, 1) / q.shape[-1] ** 0.5  # (B, H, M, S)
        scores = scores - self.slopes.to(scores.dtype)[:, None, None] * dist[:, None].to(scores.dtype)
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        att = scores.softmax(-1) @ v.transpose(1, 2)  # (B, H, M, d/H)
        return self.out(att.transpose(1, 2).reshape(B, M, d))


class HeadContext:
    """The committed text as an attending head reads it in decoding: one key/value per committed token x_s (s >= 1),
    from u_s = pair([embed(x_s); f_{s-1}]), f_{s-1} the base's final hidden state at the row that predicted x_s
    (what the head's training reads at every clean row). Grows as tokens are committed; lives with the row."""

    def __init__(self):
        self.k = self.v = None  # (1, S, H, d/H)
        self.pos: list[int] = []

    def add(self, model, head: SamplerHead, tokens: list[int], f: torch.Tensor, positions: list[int]) -> None:
        """Append committed tokens with the base's hidden states f (n, d) that predicted them, at text positions."""
        if not tokens:
            return
        e = model.get_input_embeddings()(torch.tensor(tokens, device=f.device)).to(f.dtype)
        k, v = head.keys(head.pair(torch.cat([e, f], dim=-1))[None])  # (1, n, H, d/H)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        self.pos += list(positions)


def new_sampler(model, inner_size: int | None = None, base_input: bool = False, attn_heads: int = 0) -> SamplerHead:
    """A fresh head for `model`, attached to it (`sampler_of` finds it; its parameters are the model's)."""
    head = SamplerHead(model.config.hidden_size, inner_size, base_input, attn_heads)
    return attach_sampler(model, head)


def attach_sampler(model, head: SamplerHead) -> SamplerHead:
    ref = next(model.parameters())
    head.to(device=ref.device, dtype=ref.dtype)
    model.cllm_sampler = head  # a submodule: moved, cast and trained with the model
    return head


def sampler_of(model) -> SamplerHead | None:
    """The sampler head of `model` (or of the model a DDP / DeepSpeed wrapper holds), if it has one."""
    while model is not None:
        head = getattr(model, "cllm_sampler", None)
        if isinstance(head, SamplerHead):
            return head
        model = getattr(model, "module", None)
    return None


def save_sampler(model, folder: str | Path, dtype: torch.dtype | None = None) -> bool:
    """Write the head of `model` (if it has one) to folder/SAMPLER_FILE; returns whether it did."""
    from safetensors.torch import save_file

    head = sampler_of(model)
    if head is None:
        return False
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(Path(folder) / SAMPLER_FILE), metadata={"format": "pt"})
    return True


def load_sampler(model, folder: str | Path) -> SamplerHead | None:
    """Attach the head saved in folder/SAMPLER_FILE to `model`; None when the folder has none."""
    from safetensors.torch import load_file

    path = Path(folder) / SAMPLER_FILE
    if not path.is_file():
        return None
    state = load_file(str(path))
    d = model.config.hidden_size
    heads = state["slopes"].numel() if "slopes" in state else 0
    head = SamplerHead(d, state["up.weight"].shape[0], base_input=state["up.weight"].shape[1] >= 3 * d,
                       attn_heads=heads)
    head.load_state_dict(state)
    return attach_sampler(model, head)


@contextlib.contextmanager
def final_hidden(model, enabled: bool = True):
    """Forwards inside this block record the LM head's input, the final hidden states (B, T, d), in the yielded
    list (one entry per forward); nothing is recorded when not `enabled`."""
    box: list[torch.Tensor] = []
    if not enabled:
        yield box
        return
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: box.append(args[0]))
    try:
        yield box
    finally:
        handle.remove()


def head_logits(model, head: SamplerHead, hidden: torch.Tensor, tokens: torch.Tensor,
                candidates: torch.Tensor | None = None, base: torch.Tensor | None = None,
                attn: torch.Tensor | None = None) -> torch.Tensor:
    """The head's logits (..., V) at draft hidden states (..., d) given the tokens (...) known at their positions
    (and, for a `base_input` head, the base's hidden states `base` (..., d) that predicted them; for an attending
    head its attention output `attn` (..., d)); with `candidates` (K,) only theirs (..., K): a product with K rows
    of the LM head instead of all V."""
    return lm_logits(model, head_state(model, head, hidden, tokens, base, attn), candidates)


def head_state(model, head: SamplerHead, hidden: torch.Tensor, tokens: torch.Tensor,
               base: torch.Tensor | None = None, attn: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden state z (..., d) the LM head reads (see `head_logits`)."""
    e = model.get_input_embeddings()(tokens)
    return head(hidden, e.to(hidden.dtype), base, attn)


def packed_attention(model, head: SamplerHead, input_ids: torch.Tensor, f_prev: torch.Tensor, teacher: torch.Tensor,
                     dist: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Training: an attending head's output (B, M, d) at the pairs `teacher` (B, M) of a packed forward, every row
    s a key from its token input_ids (B, T) and f_prev (B, T, d), the base's hidden state that predicted it, where
    `allowed` (B, M, T), at distances `dist` (B, M, T) (`cllm.training.losses.sampler_context`)."""
    e = model.get_input_embeddings()(input_ids).to(f_prev.dtype)
    u = head.pair(torch.cat([e, f_prev], dim=-1))  # (B, T, d)
    k, v = head.keys(u)  # (B, T, H, d/H)
    u_q = u.gather(1, teacher.unsqueeze(-1).expand(-1, -1, u.shape[-1]))  # (B, M, d)
    return head.attend(u_q, k, v, dist, allowed)


def lm_logits(model, z: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head at z (..., d): (..., V), or with `candidates` (K,) only their rows (..., K)."""
    out = model.get_output_embeddings()
    if candidates is None:
        return out(z)
    bias = out.bias[candidates] if getattr(out, "bias", None) is not None else None
    return nn.functional.linear(z, out.weight[candidates], bias)


@dataclasses.dataclass
class Reads:
    """What a redraft's head reads besides the draft rows."""

    base: torch.Tensor | None = None  # (d,): the base's row that predicted the first token (a `base_input` head)
    ctx: HeadContext | None = None  # the committed text (an attending head)
    fresh: bool = False  # the first token is not committed, so not in ctx (a runner-up's tail)


def redraft(model, head: SamplerHead, hidden: torch.Tensor, token: int, count: int, topk: int = 1,
            candidates: torch.Tensor | None = None,
            reads: Reads | None = None) -> tuple[list[int], list[int], torch.Tensor | None]:
    """The next `count` guess tokens from consecutive draft rows' hidden states `hidden` (>= count, d), the first
    row's position holding `token`: each next token is the head's argmax given the row and the token before it,
    over the whole vocabulary or over that row's `candidates` (>= count, K). A `base_input` head reads `reads.base`
    for the first token (the base's hidden state that predicted `token`) and its own z before each next one. An
    attending head attends to the committed text `reads.ctx` and to this chain's own tokens, the first one position
    after the context's last (`fresh`) or the context's last itself.
    Returns (the tokens, the head's `topk - 1` runners-up for the first one, the first one's z (d,) or None)."""
    reads = reads or Reads()
    ctx, base = reads.ctx, reads.base
    position = (ctx.pos[-1] if ctx is not None and ctx.pos else 0) + reads.fresh
    out, alts, first, f = [], [], None, base
    device = hidden.device
    chain = ([], [], [])  # this chain's keys, values (1, 1, H, d/H) and positions
    for j in range(count):
        cand = candidates[j] if candidates is not None else None
        tok = torch.tensor(token, device=device)
        a = None
        if head.attn_heads:
            a = _chain_attention(model, head, tok, f, ctx, chain, position + j, j > 0 or reads.fresh)
        z = head_state(model, head, hidden[j], tok, f, a)  # (d,)
        logits = lm_logits(model, z, cand)  # (V,) or (K,)
        f = z  # what the next token's head reads in place of a verified row
        if j == 0:
            first = z
            if topk > 1:
                best = logits.topk(min(topk, logits.shape[-1])).indices[1:]
                alts = (cand[best] if cand is not None else best).tolist()
        token = int(logits.argmax()) if cand is None else int(cand[logits.argmax()])
        out.append(token)
    return out, alts, first


def _chain_attention(model, head: SamplerHead, token: torch.Tensor, f: torch.Tensor, ctx: HeadContext | None,
                     chain: tuple[list, list, list], position: int, new: bool) -> torch.Tensor:
    """The attention output (d,) of the pair (token, f) at `position` over the committed text and the chain's
    pairs, this one appended to the chain first when it is `new` (not committed)."""
    e = model.get_input_embeddings()(token).to(f.dtype)
    u = head.pair(torch.cat([e, f], dim=-1))[None, None]  # (1, 1, d)
    if new:
        k, v = head.keys(u)
        chain[0].append(k), chain[1].append(v), chain[2].append(position)
    has = ctx is not None and ctx.k is not None
    keys = torch.cat(([ctx.k] if has else []) + chain[0], dim=1)  # (1, S, H, d/H)
    values = torch.cat(([ctx.v] if has else []) + chain[1], dim=1)
    pos = torch.tensor((ctx.pos if has else []) + chain[2], device=u.device)
    return head.attend(u, keys, values, (position - pos)[None, None])[0, 0]
