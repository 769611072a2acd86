"""Quality metrics of generated text that need a model: token log-probs and perplexity under the target."""

from __future__ import annotations

import math

import torch


@torch.inference_mode()
def token_logprobs(model, prompt_ids: list[int], new_ids: list[int]) -> list[float]:
    """log p(new_ids[t] | prompt, new_ids[:t]) under the model's UNWARPED distribution, one forward pass."""
    if not new_ids:
        return []
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + new_ids], dtype=torch.long, device=device)  # (1, P + N)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()  # (N, V)
    logp = logits.log_softmax(-1)
    return logp[torch.arange(len(new_ids)), torch.tensor(new_ids, device=device)].tolist()


def perplexity(per_prompt_logprobs: list[list[float]]) -> float | None:
    """exp(- mean over prompts of the mean token log-prob), as the MTAD code computes it (empty prompts skipped)."""
    means = [sum(lp) / len(lp) for lp in per_prompt_logprobs if lp]
    if not means:
        return None
    return math.exp(-sum(means) / len(means))
