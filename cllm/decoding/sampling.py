"""Logit warping and sampling shared by every sampling decoder (AR now; SpS and MTAD warp the same way).

Order follows Hugging Face and the MTAD code: temperature, then top-k, then top-p. Pure tensor functions.
"""

from __future__ import annotations

import torch

from cllm.decoding.options import SamplingOptions


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    SamplingOptions(temperature, top_k, top_p).check()


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Return logits (..., V) divided by the temperature with filtered tokens set to -inf."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Only the tokens still in play need sorting: after top-k that is k of them, not the whole vocabulary.
        n_live = int(torch.isfinite(logits).sum(dim=-1).max())
        sorted_logits, order = torch.topk(logits, max(n_live, 1), dim=-1)  # descending
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        kept = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, kept)
    return logits


def sample_token(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row from already-warped logits (B, V) -> (B,)."""
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
