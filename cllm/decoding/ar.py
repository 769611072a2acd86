"""Autoregressive baseline: one token per forward pass with a KV cache, greedy or sampled.

Greedy output is token-identical to `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import time

import torch

from cllm.decoding.common import DecodeResult, RaggedCache, as_batch, check_lengths, eos_ids
from cllm.decoding.options import SamplingOptions
from cllm.decoding.sampling import sample_token, warp_logits


@torch.inference_mode()
def ar_decode(
    model,
    tokenizer,
    prompt_ids,
    options: SamplingOptions | None = None,
    max_new_tokens: int = 256,
    seed: int | list[int] = 0,
    eos_token_id: int | list[int] | None = None,
    on_commit=None,
) -> list[DecodeResult] | DecodeResult:
    """Decode one prompt (list of ids) or a batch (list of lists); greedy with the default options
    (`SamplingOptions(temperature=0)`).

    Each row of a batch gets its own random generator (`seed + row` or the given list), so a row's sample does
    not depend on the batch it ran in. `on_commit(row, [token])`, if given, is called with every token (streaming);
    an exception it raises stops the decode.
    """
    batch, single = as_batch(prompt_ids)
    check_lengths(max_new_tokens)
    opts = options or SamplingOptions()
    opts.check()
    temperature, top_k, top_p = opts.temperature, opts.top_k, opts.top_p
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer, eos_token_id)
    seeds = seed if isinstance(seed, list) else [seed + i for i in range(len(batch))]
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

    t0 = time.perf_counter()
    cache = RaggedCache(len(batch), device, pad_id)
    active = list(range(len(batch)))  # caller's row index of every cache row
    inputs = [list(p) for p in batch]  # the prefill: whole prompts
    generated: list[list[int]] = [[] for _ in batch]
    results: list[DecodeResult | None] = [None] * len(batch)
    while active:
        logits, lengths = cache.forward(model, inputs, last=1)  # (B, 1, V): only each row's last position
        cache.keep(lengths)  # every input token is committed context
        last_logits = logits[:, -1]  # (B, V)
        next_ids = _next_tokens(last_logits, [generators[row] for row in active], temperature, top_k, top_p)
        still = []
        for r, (row, tok) in enumerate(zip(active, next_ids)):
            generated[row].append(tok)
            if on_commit is not None:
                on_commit(row, [tok])
            if tok in stop or len(generated[row]) >= max_new_tokens:
                results[row] = _result(generated[row], tokenizer, "eos" if tok in stop else "length",
                                       time.perf_counter() - t0)
            else:
                still.append(r)
        if len(still) < len(active):
            if still:
                cache.select(still)
            active = [active[r] for r in still]
            next_ids = [next_ids[r] for r in still]
        inputs = [[t] for t in next_ids]
    return results[0] if single else results


def _next_tokens(last_logits: torch.Tensor, generators: list, temperature: float, top_k, top_p) -> list[int]:
    """The next token of every row from its last logits (B, V): argmax, or a sample from its own generator."""
    if temperature == 0:
        return last_logits.argmax(dim=-1).tolist()
    return [int(sample_token(warp_logits(last_logits[r : r + 1], temperature, top_k, top_p), g))
            for r, g in enumerate(generators)]


def _result(generated: list[int], tokenizer, reason: str, wall: float) -> DecodeResult:
    n = len(generated)
    return DecodeResult(token_ids=generated, n_forwards=n, accept_lengths=[1] * n, finish_reason=reason,
                        text=tokenizer.decode(generated, skip_special_tokens=True) if tokenizer else "",
                        wall_time_s=wall)
