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
from pathlib import Path

import torch
from torch import nn

SAMPLER_FILE = "cllm_sampler.safetensors"


class SamplerHead(nn.Module):
    """(h (..., d), e (..., d)[, f (..., d) with `base_input`]) -> the hidden state the LM head reads (..., d)."""

    def __init__(self, hidden_size: int, inner_size: int | None = None, base_input: bool = False):
        super().__init__()
        inner = inner_size or 2 * hidden_size
        self.up = nn.Linear((3 if base_input else 2) * hidden_size, inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)
        nn.init.zeros_(self.down.weight)  # untrained: the draft row's own prediction

    @property
    def base_input(self) -> bool:
        """Whether the head also reads the base's hidden state `f` (its input is 3 d wide)."""
        return self.up.in_features == 3 * self.down.out_features

    def forward(self, h: torch.Tensor, e: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
        if self.base_input:
            if f is None:
                raise ValueError("this sampler head reads the base's hidden state: pass f")
            return h + self.down(nn.functional.silu(self.up(torch.cat([h, e, f], dim=-1))))
        return h + self.down(nn.functional.silu(self.up(torch.cat([h, e], dim=-1))))


def new_sampler(model, inner_size: int | None = None, base_input: bool = False) -> SamplerHead:
    """A fresh head for `model`, attached to it (`sampler_of` finds it; its parameters are the model's)."""
    head = SamplerHead(model.config.hidden_size, inner_size, base_input)
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
    head = SamplerHead(d, state["up.weight"].shape[0], base_input=state["up.weight"].shape[1] == 3 * d)
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
                candidates: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """The head's logits (..., V) at draft hidden states (..., d) given the tokens (...) known at their positions
    (and, for a `base_input` head, the base's hidden states `base` (..., d) that predicted them); with `candidates`
    (K,) only theirs (..., K): a product with K rows of the LM head instead of all V."""
    return lm_logits(model, head_state(model, head, hidden, tokens, base), candidates)


def head_state(model, head: SamplerHead, hidden: torch.Tensor, tokens: torch.Tensor,
               base: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden state z (..., d) the LM head reads (see `head_logits`)."""
    e = model.get_input_embeddings()(tokens)
    return head(hidden, e.to(hidden.dtype), base)


def lm_logits(model, z: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head at z (..., d): (..., V), or with `candidates` (K,) only their rows (..., K)."""
    out = model.get_output_embeddings()
    if candidates is None:
        return out(z)
    bias = out.bias[candidates] if getattr(out, "bias", None) is not None else None
    return nn.functional.linear(z, out.weight[candidates], bias)


def redraft(model, head: SamplerHead, hidden: torch.Tensor, token: int, count: int, topk: int = 1,
            candidates: torch.Tensor | None = None,
            base: torch.Tensor | None = None) -> tuple[list[int], list[int], torch.Tensor | None]:
    """The next `count` guess tokens from consecutive draft rows' hidden states `hidden` (>= count, d), the first
    row's position holding `token`: each next token is the head's argmax given the row and the token before it,
    over the whole vocabulary or over that row's `candidates` (>= count, K). A `base_input` head reads `base` (d,)
    for the first token (the base's hidden state that predicted `token`) and its own z before each next one.
    Returns (the tokens, the head's `topk - 1` runners-up for the first one, the first one's z (d,) or None)."""
    out, alts, first, f = [], [], None, base
    device = hidden.device
    for j in range(count):
        cand = candidates[j] if candidates is not None else None
        z = head_state(model, head, hidden[j], torch.tensor(token, device=device), f)  # (d,)
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
