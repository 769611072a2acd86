"""A draft whose LM head scores only a subset of the vocabulary: the cost of drafting where a small draft spends
it (a 49k-row head is a large share of a few-layer draft's forward), with the verification left exact.

`PrunedVocabDraft(draft, token_ids)` runs the draft's decoder as usual and multiplies the last hidden states by
the K kept rows of its LM head only; every other token gets probability 0 (logit -inf). SpS stays exact: it
accepts a drafted token with min(1, p/q) and resamples a rejection from norm(max(p - q, 0)), which covers the
tokens the draft cannot propose, so its output is still distributed as target sampling (tests/test_speculative.py
checks it with a chi-square test). MTAD's rule is not a rejection sampler; there the subset changes what the draft
proposes, as any other draft would. Choose the subset with `frequent_tokens` over the target's own outputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from cllm.decoding.common import _cache_kwarg
from cllm.errors import CllmError


def frequent_tokens(sequences, k: int, always=()) -> list[int]:
    """The k most frequent ids of `sequences` (lists of token ids), plus `always` (EOS, ...), sorted."""
    if k < 1:
        raise CllmError(f"the pruned draft vocabulary needs k >= 1 tokens, got {k}")
    counts = Counter(t for seq in sequences for t in seq)
    keep = {t for t, _ in counts.most_common(k)} | set(always)
    return sorted(keep)


@dataclass
class _Output:
    logits: torch.Tensor
    cache: object


class PrunedVocabDraft(nn.Module):
    """`draft` with its LM head cut to `token_ids`; logits keep the full width (the target's), -inf elsewhere."""

    def __init__(self, draft, token_ids: list[int]):
        super().__init__()
        head = draft.get_output_embeddings()
        if not token_ids or max(token_ids) >= head.weight.shape[0] or min(token_ids) < 0:
            raise CllmError(f"pruned draft vocabulary: ids must lie in 0 .. {head.weight.shape[0] - 1}")
        self.draft = draft
        self.config = draft.config
        self.generation_config = getattr(draft, "generation_config", None)
        self.register_buffer("token_ids", torch.tensor(sorted(set(token_ids)), dtype=torch.long), persistent=False)
        self.head_weight = nn.Parameter(head.weight.detach()[self.token_ids].clone(), requires_grad=False)  # (K, d)
        self.head_bias = None if head.bias is None else nn.Parameter(head.bias.detach()[self.token_ids].clone(),
                                                                     requires_grad=False)
        self.vocab_size = head.weight.shape[0]

    def get_output_embeddings(self):
        return self.draft.get_output_embeddings()  # the full head: the compatibility check compares widths

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None, **kwargs):
        decoder = self.draft.get_decoder()
        name = _cache_kwarg(type(decoder))
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, **{name: cache})
        hidden = out.last_hidden_state  # (B, W, d)
        kept = nn.functional.linear(hidden, self.head_weight, self.head_bias)  # (B, W, K)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))  # (B, W, V)
        logits[..., self.token_ids] = kept
        return _Output(logits=logits, cache=out.cache if name == "cache" else out.past_key_values)
