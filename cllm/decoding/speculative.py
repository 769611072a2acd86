"""Speculative sampling (SpS; Leviathan et al. 2023, Chen et al. 2023): lossless draft-then-verify decoding.

Each iteration the draft proposes gamma tokens autoregressively and the target scores them all in one forward:
- greedy (temperature 0): accept while the draft token is the target's argmax, then emit the target's argmax;
  the output equals greedy AR decoding of the target.
- sampling: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a sample of
  norm(max(p_i - q_i, 0)); if all are accepted emit a bonus sample of p_{gamma+1}. The output is distributed
  exactly as target sampling with the same warping (temperature, top-k, top-p applied to both models).
gamma is fixed, or adaptive (+2 after a fully accepted round, -1 otherwise, at least 1; Hugging Face's heuristic).
Both KV caches are cropped to the accepted prefix. Batch size 1.
"""

from __future__ import annotations

import torch

from cllm.decoding.common import DecodeResult, DraftVerifyRun, SeqCache, check_lengths, single_prompt
from cllm.decoding.options import SpeculativeOptions
from cllm.decoding.sampling import warp_logits


def greedy_verify(draft_ids: list[int], target_argmax: list[int]) -> tuple[int, int]:
    """Accepted count n (leading draft tokens equal to the target's argmax) and the token emitted after them.
    `target_argmax` has len(draft_ids) + 1 entries: the target's choice at every draft position and after."""
    n = 0
    while n < len(draft_ids) and draft_ids[n] == target_argmax[n]:
        n += 1
    return n, target_argmax[n]


def sps_verify(draft_ids: list[int], q_probs: torch.Tensor, p_probs: torch.Tensor, uniforms: torch.Tensor):
    """The speculative sampling rule, without randomness of its own.

    q_probs (g, V): draft distributions the tokens were drawn from; p_probs (g + 1, V): target distributions at
    the same positions and one after; uniforms (g,): U(0, 1) draws. Returns (n accepted, distribution (V,) to
    sample the emitted token from): the residual norm(max(p_n - q_n, 0)) after a rejection, else p_g.
    """
    for i, tok in enumerate(draft_ids):
        p, q = p_probs[i, tok], q_probs[i, tok]
        if uniforms[i] * q < p:  # u < p/q without dividing (q > 0: tok was drawn from q)
            continue
        residual = (p_probs[i] - q_probs[i]).clamp(min=0)
        total = residual.sum()
        # p == q everywhere would make the residual empty; a rejection is then impossible (u < 1 = p/q).
        return i, residual / total if total > 0 else p_probs[i]
    return len(draft_ids), p_probs[len(draft_ids)]


def next_gamma(gamma: int, n_accepted: int, n_drafted: int) -> int:
    """Adaptive draft length: +2 after a fully accepted round, -1 otherwise, never below 1."""
    return gamma + 2 if n_accepted == n_drafted else max(1, gamma - 1)


@torch.inference_mode()
def speculative_decode(
    target,
    draft,
    tokenizer,
    prompt_ids,
    options: SpeculativeOptions | None = None,
    max_new_tokens: int = 256,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
) -> DecodeResult | list[DecodeResult]:
    """Decode one prompt with the draft proposing and the target verifying; greedy with the default options."""
    opts = options or SpeculativeOptions()
    opts.check()
    prompt, single = single_prompt(prompt_ids, "sps")
    check_lengths(max_new_tokens)
    gamma, adaptive_gamma = opts.gamma, opts.adaptive_gamma
    temperature, top_k, top_p = opts.temperature, opts.top_k, opts.top_p
    greedy = temperature == 0

    def warp(logits):  # both models warped identically
        return warp_logits(logits, temperature, top_k, top_p)

    run = DraftVerifyRun(target, draft, tokenizer, prompt, max_new_tokens, seed, eos_token_id)
    g_cur = gamma
    while run.reason is None:
        g = run.draft_length(g_cur)
        draft_ids, q_rows = propose(run.d_cache, run.seq, g, warp, greedy, run.gen)
        t_logits = run.t_cache.forward(run.seq[run.t_cache.n :] + draft_ids)[-(g + 1) :]  # (g + 1, V)
        if greedy:
            n, nxt = greedy_verify(draft_ids, t_logits.argmax(-1).tolist())
        else:
            p_probs = warp(t_logits).softmax(-1)  # (g + 1, V)
            q_probs = torch.stack(q_rows) if q_rows else p_probs[:0]  # (g, V)
            uniforms = torch.rand(g, generator=run.gen, device=p_probs.device)
            n, dist = sps_verify(draft_ids, q_probs, p_probs, uniforms)
            nxt = int(torch.multinomial(dist, 1, generator=run.gen))
        run.commit(draft_ids, n, nxt)
        if adaptive_gamma and g > 0:
            g_cur = next_gamma(g_cur, n, g)
    result = run.result()
    return result if single else [result]


def propose(d_cache: SeqCache, seq: list[int], g: int, warp, greedy: bool, gen) -> tuple[list[int], list]:
    """Draw g tokens from the draft one by one (cache grows to hold seq + the first g - 1 of them); returns the
    tokens and the warped draft distributions (V,) they were drawn from (empty in greedy mode)."""
    draft_ids, q_rows = [], []
    pending = seq[d_cache.n :]
    for _ in range(g):
        logits = d_cache.forward(pending)[-1]  # (V,)
        if greedy:
            tok = int(logits.argmax())
        else:
            q = warp(logits).softmax(-1)
            tok = int(torch.multinomial(q, 1, generator=gen))
            q_rows.append(q)
        draft_ids.append(tok)
        pending = [tok]
    return draft_ids, q_rows
