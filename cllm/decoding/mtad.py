"""MTAD, multi-token assisted decoding (Qin et al., ICLR 2025): approximate sampling from the target's JOINT
distribution over a block of gamma tokens, with a small draft. Lossy by design.

One iteration:
1. `beam_draft`: beam sampling over the draft's joint distribution. Step 1 draws B tokens from the warped q_1;
   each later step scores every (beam b, token v) by w_b * q_b(v), draws B pairs in proportion, extends each
   survivor's running log Q, and renormalises the weights w = s / sum(s) of the drawn scores s (so w is
   proportional to the beams' joint draft probabilities). The draft cache is expanded to B rows and re-indexed
   by parent beam at every step, then reduced to the beam of largest weight.
2. One target forward over the chosen gamma tokens gives p_1..p_{gamma+1} (warped exactly like q).
3. `mtad_accept`: n = max{i : log P_i - log Q_i > log tau} over the cumulative sums (the longest passing prefix,
   not the first failure; 0 if none).
4. Emit x_1..x_n and one token sampled from p_{n+1} (no residual correction); crop both caches.
tau -> infinity never accepts (plain target sampling); B = 1 is ancestral drafting. Batch size 1.

`beam_weights="released"` renormalises as the MTAD authors' code does (`strategies.py`: `log_softmax` over the
drawn scores taken as log-weights, where they are probabilities): the weights then stay near uniform, the next
draws follow the draft's per-step q more than the joint Q, and the final argmax is the beam with the largest last
step score w * q, which need not be the beam of largest joint draft probability (see `renormalize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cllm.decoding.common import (
    DecodeResult,
    DraftVerifyRun,
    SeqCache,
    cached_forward,
    check_lengths,
    single_prompt,
)
from cllm.decoding.options import BEAM_WEIGHTS, MtadOptions
from cllm.decoding.sampling import warp_logits
from cllm.errors import CllmError


def mtad_accept(target_logprobs, draft_logprobs, tau: float) -> int:
    """Accepted prefix length from per-position log-probs of the drafted tokens (g,) under the target (p_j(x_j))
    and the draft (q_j(x_j)): the largest i with sum_{j<=i} (log p_j - log q_j) > log tau, else 0."""
    log_p = torch.as_tensor(target_logprobs, dtype=torch.float64)
    log_q = torch.as_tensor(draft_logprobs, dtype=torch.float64)
    ratio = log_p.cumsum(0) - log_q.cumsum(0)  # (g,) log P_i - log Q_i; -inf once a token has P = 0
    passing = (ratio > math.log(tau)).nonzero()
    return int(passing.max()) + 1 if passing.numel() else 0


def renormalize(log_s: torch.Tensor, rule: str = "joint") -> torch.Tensor:
    """Log-weights of the drawn beams (B,) from their log scores log s = log w_parent + log q (B,).

    joint (the paper): w = s / sum(s), so w is proportional to the beams' joint draft probabilities Q.
    released (the authors' code): log w = log_softmax(s), the softmax of the scores themselves (probabilities),
    i.e. w proportional to exp(s): near uniform whatever Q is."""
    if rule == "joint":
        return log_s - log_s.logsumexp(0)
    if rule == "released":
        return log_s.exp().log_softmax(0)
    raise CllmError(f"beam_weights must be one of {BEAM_WEIGHTS}, got {rule!r}")


@dataclass
class BeamDraft:
    tokens: list[int]  # the chosen beam, gamma tokens
    logq: list[float]  # log q_j(x_j) of each of them under the warped draft
    weight: float  # the chosen beam's normalised weight


def _draw(probs: torch.Tensor, k: int, replacement: bool, gen) -> torch.Tensor:
    """k indices from a (flat) probability vector; without replacement never more than its support."""
    support = probs.nonzero().flatten()  # after top-k/top-p a few hundred entries at most, not B x V
    if not replacement:
        k = min(k, support.numel())
    return support[torch.multinomial(probs[support], k, replacement=replacement, generator=gen)]


def beam_draft(d_cache: SeqCache, pending: list[int], gamma: int, beam_width: int, warp, gen,
               replacement: bool = False, weights: str = "joint") -> BeamDraft:
    """Beam sampling of gamma tokens after `pending` (the sequence tokens the draft cache lacks). On return the
    cache holds one row: the sequence plus the chosen beam's first gamma - 1 tokens."""
    logq = warp(d_cache.forward(pending)[-1:]).log_softmax(-1)  # (1, V)
    tokens = _draw(logq[0].exp(), beam_width, replacement, gen).unsqueeze(1)  # (B, 1)
    pos_logq = logq[0, tokens[:, 0]].unsqueeze(1)  # (B, 1): log q_1(x_1) per beam
    log_w = renormalize(pos_logq[:, 0], weights)  # (B,) normalised beam weights, in log
    cache = d_cache.cache
    n_beams = tokens.shape[0]
    if gamma > 1 and n_beams > 1:
        cache.batch_repeat_interleave(n_beams)  # every beam continues from the same context
    for _ in range(1, gamma):
        position_ids = torch.full((n_beams, 1), d_cache.n, dtype=torch.long, device=d_cache.device)
        logits, cache = cached_forward(d_cache.model, tokens[:, -1:], position_ids, cache)
        d_cache.n += 1
        logq = warp(logits[:, -1].float()).log_softmax(-1)  # (B, V)
        vocab = logq.shape[-1]
        log_s = (log_w.unsqueeze(1) + logq).reshape(-1)  # (B * V,): log w_b + log q_b(v)
        flat = _draw((log_s - log_s.logsumexp(0)).exp(), beam_width, replacement, gen)  # (B',)
        parent, tok = flat // vocab, flat % vocab
        if parent.shape[0] != n_beams or not torch.equal(parent, torch.arange(n_beams, device=parent.device)):
            cache.batch_select_indices(parent)  # each survivor continues its parent's cache
        n_beams = parent.shape[0]
        tokens = torch.cat([tokens[parent], tok.unsqueeze(1)], dim=1)  # (B, t)
        pos_logq = torch.cat([pos_logq[parent], logq[parent, tok].unsqueeze(1)], dim=1)  # (B, t)
        log_w = renormalize(log_s[flat], weights)  # over the drawn pairs
    best = int(log_w.argmax())
    if n_beams > 1 and gamma > 1:
        cache.batch_select_indices(torch.tensor([best], device=tokens.device))
    d_cache.cache = cache
    return BeamDraft(tokens[best].tolist(), pos_logq[best].tolist(), float(log_w[best].exp()))


@torch.inference_mode()
def mtad_decode(
    target,
    draft,
    tokenizer,
    prompt_ids,
    options: MtadOptions | None = None,
    max_new_tokens: int = 256,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
) -> DecodeResult | list[DecodeResult]:
    """Decode one prompt with MTAD. Statistics in `extra`: iterations, drafted, accepted, draft_forwards."""
    opts = options or MtadOptions()
    opts.check()
    prompt, single = single_prompt(prompt_ids, "mtad")
    check_lengths(max_new_tokens)
    gamma, beam_width, tau, replacement, beam_weights = (opts.gamma, opts.beam_width, opts.tau,
                                                         opts.beam_replacement, opts.beam_weights)
    temperature, top_k, top_p = opts.temperature, opts.top_k, opts.top_p

    def warp(logits):  # both models warped identically
        return warp_logits(logits, temperature, top_k, top_p)

    run = DraftVerifyRun(target, draft, tokenizer, prompt, max_new_tokens, seed, eos_token_id)
    while run.reason is None:
        g = run.draft_length(gamma)
        if g > 0:
            beam = beam_draft(run.d_cache, run.seq[run.d_cache.n :], g, beam_width, warp, run.gen, replacement,
                              beam_weights)
        else:
            beam = BeamDraft([], [], 1.0)
        t_logp = warp(run.t_cache.forward(run.seq[run.t_cache.n :] + beam.tokens)[-(g + 1) :]).log_softmax(-1)
        drafted_logp = t_logp[torch.arange(g), torch.tensor(beam.tokens, dtype=torch.long)] if g else t_logp[:0, 0]
        n = mtad_accept(drafted_logp, beam.logq, tau)  # (g + 1, V) above; n in 0..g
        run.commit(beam.tokens, n, int(torch.multinomial(t_logp[n].exp(), 1, generator=run.gen)))
    result = run.result()
    return result if single else [result]
