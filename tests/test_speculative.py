"""SpS and MTAD: exactness in greedy mode, distribution tests in sampling mode, the pure acceptance rules on literal
tables, and beam-cache re-indexing against recomputation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cllm.decoding import ar_decode, mtad_decode, speculative_decode
from cllm.decoding.common import SeqCache
from cllm.decoding.mtad import beam_draft, mtad_accept
from cllm.decoding.sampling import warp_logits
from cllm.decoding.speculative import greedy_verify, next_gamma, sps_verify
from cllm.errors import CllmError
from cllm.decoding.options import MtadOptions, SpeculativeOptions
from conftest import random_prompt, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny forwards: one intra-op thread is several times faster than two fighting over 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ pure rules


def _reference_warp(logits, temperature, top_k, top_p):
    """Textbook warping by a full sort of the vocabulary (Hugging Face's order: temperature, top-k, top-p)."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        s, order = torch.sort(logits, dim=-1, descending=True)
        p = s.softmax(-1)
        drop = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, (p.cumsum(-1) - p) >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (10, 0.9), (3, 0.5), (50, 0.99), (10, None), (None, 0.3)])
def test_warp_matches_full_sort_reference(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 200, generator=gen) * 3
    logits[1, 50:] = float("-inf")  # rows with different numbers of live tokens
    got = warp_logits(logits, 0.7, top_k, top_p)
    assert torch.equal(got.isfinite(), _reference_warp(logits, 0.7, top_k, top_p).isfinite())
    assert torch.allclose(got.softmax(-1), _reference_warp(logits, 0.7, top_k, top_p).softmax(-1))


def test_greedy_verify_literal():
    assert greedy_verify([5, 6, 7], [5, 6, 7, 8]) == (3, 8)  # all accepted, bonus = argmax after the last
    assert greedy_verify([5, 9, 7], [5, 6, 7, 8]) == (1, 6)  # stop at the first mismatch, emit the target's token
    assert greedy_verify([4], [5, 6]) == (0, 5)
    assert greedy_verify([], [5]) == (0, 5)


def test_sps_verify_literal():
    q = torch.tensor([[0.5, 0.5, 0.0]])
    p = torch.tensor([[0.25, 0.75, 0.0], [0.1, 0.2, 0.7]])
    # p/q = 0.5 for token 0: u = 0.4 accepts, u = 0.6 rejects.
    n, dist = sps_verify([0], q, p, torch.tensor([0.4]))
    assert n == 1 and torch.equal(dist, p[1])  # bonus token from p_{g+1}
    n, dist = sps_verify([0], q, p, torch.tensor([0.6]))
    assert n == 0 and torch.allclose(dist, torch.tensor([0.0, 1.0, 0.0]))  # norm(max(p - q, 0))
    # p >= q on the drafted token: always accepted, whatever u.
    n, _ = sps_verify([1], q, p, torch.tensor([0.999]))
    assert n == 1


def test_next_gamma_heuristic():
    assert next_gamma(4, 4, 4) == 6
    assert next_gamma(4, 2, 4) == 3
    assert next_gamma(1, 0, 1) == 1


def test_mtad_accept_literal_tables():
    lp = [-1.0, -1.0, -1.0]
    assert mtad_accept(lp, lp, 0.5) == 3  # P == Q: ratio 1 > 0.5 at every prefix
    assert mtad_accept(lp, lp, 1.0) == 0  # strict: ratio 1 is not > 1
    # Longest passing prefix, not the first failure: log ratios per position -1, +2, -0.5 -> cumulative -1, 1, 0.5.
    assert mtad_accept([-2.0, -1.0, -1.5], [-1.0, -3.0, -1.0], 1.0) == 3
    # Cumulative -1, 0.5, -1.5: only the 2-token prefix passes.
    assert mtad_accept([-2.0, -1.0, -3.0], [-1.0, -2.5, -1.0], 1.0) == 2
    # A token the target filtered out (log p = -inf) fails its prefix and every longer one.
    assert mtad_accept([-0.1, float("-inf"), -0.1], [-1.0, -1.0, -1.0], 0.5) == 1
    assert mtad_accept([-1.0, -1.0], [-2.0, -2.0], float("inf")) == 0  # tau -> infinity accepts nothing
    assert mtad_accept([-50.0, -50.0], [-0.1, -0.1], 1e-300) == 2  # tiny tau accepts everything finite
    assert mtad_accept([], [], 0.5) == 0
    # Threshold edge: log P - log Q = log(0.5) exactly does not pass tau = 0.5.
    assert mtad_accept([math.log(0.25)], [math.log(0.5)], 0.5) == 0
    assert mtad_accept([math.log(0.25)], [math.log(0.5)], 0.49) == 1


# ------------------------------------------------------------------------------------------------ greedy SpS


@pytest.mark.parametrize("seed", range(6))
def test_sps_greedy_equals_target_greedy(seed):
    target, draft, tok = tiny_model(seed), tiny_model(seed + 100), tiny_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    prompt = random_prompt(gen, 3 + seed)
    expected = ar_decode(target, None, prompt, max_new_tokens=37).token_ids
    for gamma, adaptive in [(1, False), (3, False), (5, False), (2, True)]:
        res = speculative_decode(target, draft, None, prompt, SpeculativeOptions(gamma=gamma,
                                 adaptive_gamma=adaptive), max_new_tokens=37)
        assert res.token_ids == expected, (gamma, adaptive)
        assert sum(res.accept_lengths) == len(expected) and res.n_forwards == len(res.accept_lengths)
    # A draft equal to the target is always right: every round accepts gamma tokens and adds one.
    res = speculative_decode(target, target, None, prompt, SpeculativeOptions(gamma=4), max_new_tokens=37)
    assert res.token_ids == expected and res.extra["accepted"] == res.extra["drafted"]
    assert res.accept_lengths[:7] == [5] * 7
    del tok


def test_sps_stops_at_eos():
    target, draft, tok = tiny_model(3), tiny_model(4), tiny_tokenizer()
    prompt = [5, 6, 7]
    ar = ar_decode(target, tok, prompt, max_new_tokens=30).token_ids
    stop = ar[5]  # make the 6th generated token the EOS
    ar_eos = ar_decode(target, tok, prompt, max_new_tokens=30, eos_token_id=stop).token_ids
    res = speculative_decode(target, draft, tok, prompt, SpeculativeOptions(gamma=4), max_new_tokens=30,
                             eos_token_id=stop)
    assert res.token_ids == ar_eos and res.finish_reason == "eos" and res.token_ids[-1] == stop


# ------------------------------------------------------------------------------------------ distribution tests

VOCAB_SMALL = 8
SAMPLING = dict(temperature=1.0, top_k=5, top_p=0.95)
N_TOKENS = 3


def _chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Pearson chi-square goodness of fit; outcomes expected fewer than 5 times are pooled into one cell."""
    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for outcome in set(probs) | set(counts):
        exp, obs = probs.get(outcome, 0.0) * n, counts.get(outcome, 0)
        if exp < 5:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
        else:
            cells.append((obs, exp))
    if pooled_exp > 0 or pooled_obs > 0:
        cells.append((pooled_obs, max(pooled_exp, 1e-12)))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2,
                 dtype=torch.float64)))


@torch.inference_mode()
def _exact_block_distribution(model, prompt: list[int]) -> dict:
    """P(x_1..x_N) under warped ancestral sampling of the model, by enumeration."""
    out = {(): 1.0}
    for _ in range(N_TOKENS):
        nxt = {}
        for prefix, pr in out.items():
            logits = model(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1]
            probs = warp_logits(logits, **SAMPLING).softmax(-1)
            for v in probs.nonzero().flatten().tolist():
                nxt[prefix + (v,)] = pr * float(probs[v])
        out = nxt
    return out


@pytest.fixture(scope="module")
def small_pair():
    target = tiny_model(7, vocab_size=VOCAB_SMALL)
    draft = tiny_model(8, vocab_size=VOCAB_SMALL)
    prompt = [3, 5, 2, 6]
    return target, draft, prompt, _exact_block_distribution(target, prompt), _exact_block_distribution(draft, prompt)


def _empirical(decode, n_runs: int) -> dict:
    counts: dict = {}
    for s in range(n_runs):
        key = tuple(decode(s).token_ids)
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_sps_sampling_preserves_target_distribution(small_pair):
    target, draft, prompt, p_target, p_draft = small_pair
    assert _chi2_pvalue({k: round(v * 1000) for k, v in p_draft.items()}, p_target, 1000) < 1e-6  # they differ
    n = 2500
    counts = _empirical(lambda s: speculative_decode(target, draft, None, prompt, SpeculativeOptions(gamma=2,
                        **SAMPLING), max_new_tokens=N_TOKENS, seed=s), n)
    assert _chi2_pvalue(counts, p_target, n) > 1e-3
    assert _chi2_pvalue(counts, p_draft, n) < 1e-6  # the test has the power to see the draft's distribution


def test_mtad_with_huge_tau_is_target_sampling(small_pair):
    target, draft, prompt, p_target, p_draft = small_pair
    n = 1500
    results = []

    def run(s):
        res = mtad_decode(target, draft, None, prompt, MtadOptions(gamma=2, beam_width=3, tau=1e+30, **SAMPLING),
                          max_new_tokens=N_TOKENS, seed=s)
        results.append(res)
        return res

    counts = _empirical(run, n)
    assert all(r.extra["accepted"] == 0 and r.accept_lengths == [1] * N_TOKENS for r in results)
    assert _chi2_pvalue(counts, p_target, n) > 1e-3
    assert _chi2_pvalue(counts, p_draft, n) < 1e-6


@torch.inference_mode()
def _mtad_ancestral_distribution(target, draft, prompt: list[int], gamma: int, tau: float) -> dict:
    """P(x_1..x_N) of MTAD with one beam (ancestral drafting), by enumeration: every draft block with its
    probability Q, the accepted prefix n by the tau rule, every bonus token from the target's p_{n+1}, recursively
    until N tokens (the draft shrinks near the cap, as `draft_length` does)."""
    def probs(model, ctx):
        return warp_logits(model(input_ids=torch.tensor([ctx])).logits[0, -1], **SAMPLING).softmax(-1)

    out: dict = {}

    def walk(prefix: list[int], pr: float) -> None:
        left = N_TOKENS - len(prefix)
        if left == 0:
            out[tuple(prefix)] = out.get(tuple(prefix), 0.0) + pr
            return
        blocks = [((), 1.0, ())]  # (tokens, Q, log q per token)
        for _ in range(min(gamma, left - 1)):
            grown = []
            for x, q, lq in blocks:
                d = probs(draft, prompt + prefix + list(x))
                grown += [(x + (v,), q * float(d[v]),
                           lq + (float(d[v].log()),)) for v in d.nonzero().flatten().tolist()]
            blocks = grown
        for x, q, lq in blocks:
            lp = [float(probs(target, prompt + prefix + list(x[:j]))[x[j]].log()) for j in range(len(x))]
            n = mtad_accept(lp, list(lq), tau) if x else 0
            bonus = probs(target, prompt + prefix + list(x[:n]))
            for y in bonus.nonzero().flatten().tolist():
                walk(prefix + list(x[:n]) + [y], pr * q * float(bonus[y]))

    walk([], 1.0)
    return out


def test_mtad_partial_acceptance_with_a_sampled_bonus_matches_enumeration(small_pair):
    """Between the extremes: tau 0.6 accepts 0, 1 or 2 of 2 drafted tokens, then samples the bonus from the
    target at the first rejected position. The committed tokens follow the enumerated distribution, which is
    neither the target's nor the draft's (MTAD is lossy by design)."""
    target, draft, prompt, p_target, p_draft = small_pair
    tau, n = 0.6, 2000
    expected = _mtad_ancestral_distribution(target, draft, prompt, 2, tau)
    assert abs(sum(expected.values()) - 1) < 1e-5
    results = []

    def run(s):
        res = mtad_decode(target, draft, None, prompt, MtadOptions(gamma=2, beam_width=1, tau=tau, **SAMPLING),
                          max_new_tokens=N_TOKENS, seed=s)
        results.append(res)
        return res

    counts = _empirical(run, n)
    assert {a for r in results for a in r.accept_lengths} >= {1, 2}  # partial acceptances happened
    assert _chi2_pvalue(counts, expected, n) > 1e-3
    assert _chi2_pvalue(counts, p_target, n) < 1e-6 and _chi2_pvalue(counts, p_draft, n) < 1e-6


def test_mtad_with_target_as_draft_accepts_every_block():
    target = tiny_model(2)
    res = mtad_decode(target, target, None, [4, 5, 6], MtadOptions(gamma=4, beam_width=3, tau=0.5, temperature=1.0),
                      max_new_tokens=21, seed=1)
    assert res.extra["accepted"] == res.extra["drafted"]  # P == Q: ratio 1 > 0.5 for every prefix
    assert res.accept_lengths[:4] == [5] * 4 and len(res.token_ids) == 21


# -------------------------------------------------------------------------------------------- beam re-indexing


@pytest.mark.parametrize("beam_width,replacement", [(4, False), (3, True), (1, False)])
@torch.inference_mode()
def test_beam_draft_cache_equals_recomputation(beam_width, replacement):
    draft = tiny_model(5)
    seq = [7, 8, 9, 10, 11]

    def warp(logits):
        return warp_logits(logits, 1.3, 20, 0.95)

    for seed in range(4):
        cache = SeqCache(draft)
        cache.forward(seq[:3])  # part of the sequence cached already, the rest pending
        gen = torch.Generator().manual_seed(seed)
        beam = beam_draft(cache, seq[3:], 5, beam_width, warp, gen, replacement)
        assert len(beam.tokens) == 5 and 0 < beam.weight <= 1
        # The chosen beam's log q at every position equals a from-scratch forward over seq + its prefix.
        full = draft(input_ids=torch.tensor([seq + beam.tokens])).logits[0].float()
        logq = warp(full[len(seq) - 1 : -1]).log_softmax(-1)
        expect = logq[torch.arange(5), torch.tensor(beam.tokens)]
        assert torch.allclose(torch.tensor(beam.logq, dtype=torch.float32), expect, atol=1e-5)
        # The cache holds one row: seq + the first 4 beam tokens, equal to recomputing it.
        assert cache.n == len(seq) + 4
        ref = draft(input_ids=torch.tensor([seq + beam.tokens[:4]]), use_cache=True).past_key_values
        for layer, ref_layer in zip(cache.cache.layers, ref.layers):
            assert layer.keys.shape == ref_layer.keys.shape
            assert torch.allclose(layer.keys, ref_layer.keys, atol=1e-9)
            assert torch.allclose(layer.values, ref_layer.values, atol=1e-9)


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_arguments_raise_clear_errors():
    target, draft = tiny_model(0), tiny_model(1)
    with pytest.raises(CllmError, match="gamma"):
        speculative_decode(target, draft, None, [3, 4], SpeculativeOptions(gamma=0), max_new_tokens=5)
    with pytest.raises(CllmError, match="tau must be > 0"):
        mtad_decode(target, draft, None, [3, 4], MtadOptions(tau=0.0), max_new_tokens=5)
    with pytest.raises(CllmError, match="tau must be > 0"):
        mtad_decode(target, draft, None, [3, 4], MtadOptions(tau=-1.0), max_new_tokens=5)
    with pytest.raises(CllmError, match="temperature > 0"):
        mtad_decode(target, draft, None, [3, 4], MtadOptions(temperature=0.0), max_new_tokens=5)
    with pytest.raises(CllmError, match="top_p"):
        mtad_decode(target, draft, None, [3, 4], MtadOptions(top_p=1.5), max_new_tokens=5)
    with pytest.raises(CllmError, match="batch size 1"):
        speculative_decode(target, draft, None, [[3, 4], [5, 6]], max_new_tokens=5)
    with pytest.raises(CllmError, match="batch size 1"):
        mtad_decode(target, draft, None, [[3, 4], [5, 6]], max_new_tokens=5)


def test_single_prompt_batch_of_one_returns_list():
    target, draft = tiny_model(0), tiny_model(1)
    out = speculative_decode(target, draft, None, [[3, 4]], max_new_tokens=6)
    assert isinstance(out, list) and len(out) == 1 and len(out[0].token_ids) == 6


def test_all_small_block_outcomes_enumerated(small_pair):
    """The exact distributions used above are proper: they sum to 1 over all outcomes."""
    _, _, _, p_target, p_draft = small_pair
    assert abs(sum(p_target.values()) - 1) < 1e-6 and abs(sum(p_draft.values()) - 1) < 1e-6
    assert all(len(k) == N_TOKENS for k in itertools.chain(p_target, p_draft))


def test_beam_weight_rules_by_hand():
    from cllm.decoding.mtad import renormalize

    log_s = torch.tensor([0.5, 0.1, 0.02], dtype=torch.float64).log()
    # joint (the paper): w = s / sum(s)
    assert renormalize(log_s, "joint").exp().tolist() == pytest.approx([0.5 / 0.62, 0.1 / 0.62, 0.02 / 0.62])
    # released (the authors' code): softmax of the scores themselves, e^0.5 : e^0.1 : e^0.02
    z = math.exp(0.5) + math.exp(0.1) + math.exp(0.02)
    assert renormalize(log_s, "released").exp().tolist() == pytest.approx(
        [math.exp(0.5) / z, math.exp(0.1) / z, math.exp(0.02) / z])
    with pytest.raises(CllmError, match="beam_weights"):
        renormalize(log_s, "other")


def test_released_rule_can_pick_a_beam_of_lower_joint_probability():
    """Two beams over two steps: A = (q 0.9, then 0.3), joint 0.27; B = (0.1, then 0.8), joint 0.08. The joint rule
    keeps w proportional to Q and picks A; the released rule's near-uniform first weights (softmax of 0.9 and 0.1)
    let B's larger last-step score win: 0.31 x 0.8 = 0.25 against 0.69 x 0.3 = 0.21."""
    from cllm.decoding.mtad import renormalize

    q1 = torch.tensor([0.9, 0.1], dtype=torch.float64)
    q2 = torch.tensor([0.3, 0.8], dtype=torch.float64)
    picks = {}
    for rule in ("joint", "released"):
        log_w = renormalize(q1.log(), rule)
        log_w = renormalize(log_w + q2.log(), rule)
        picks[rule] = int(log_w.argmax())
    assert picks == {"joint": 0, "released": 1}
    w1 = renormalize(q1.log(), "released").exp()
    assert w1.tolist() == pytest.approx([math.exp(0.9) / (math.exp(0.9) + math.exp(0.1)),
                                         math.exp(0.1) / (math.exp(0.9) + math.exp(0.1))])


def test_beam_weights_reach_mtad_through_the_registry():
    from cllm.decoding import registry
    from cllm.decoding.mtad import mtad_decode

    target, draft = tiny_model(7), tiny_model(8)
    prompt = [3, 5, 2, 6, 9]
    outs = {}
    for rule in ("joint", "released"):
        cfg = registry.DecodeConfig(max_new_tokens=24, temperature=1.0, gamma=4, beam_width=4, beam_weights=rule)
        via = registry.decode("mtad", target, None, [prompt], [11], cfg, draft)[0]
        direct = mtad_decode(target, draft, None, prompt, MtadOptions(gamma=4, beam_width=4, tau=0.5, temperature=1.0,
                             top_k=None, top_p=None, beam_weights=rule), max_new_tokens=24, seed=11)
        assert via.token_ids == direct.token_ids
        outs[rule] = direct.token_ids
    assert outs["joint"] != outs["released"]  # the rule changes which beams survive and which one is drafted


def test_sps_with_a_pruned_vocabulary_draft_is_still_target_sampling(small_pair):
    """The draft proposes only 4 of the 8 tokens (its head cut to them); the rejection step's residual covers the
    rest, so SpS output stays distributed as target sampling (chi-square), while the pruned draft's own
    distribution is far from it."""
    from cllm.decoding.pruned_draft import PrunedVocabDraft

    target, draft, prompt, p_target, _ = small_pair
    pruned = PrunedVocabDraft(draft, [0, 2, 3, 5])
    p_pruned = _exact_block_distribution(pruned, prompt)
    assert all(set(k) <= {0, 2, 3, 5} for k in p_pruned)  # the draft can only say these
    n = 2500
    counts = _empirical(lambda s: speculative_decode(target, pruned, None, prompt, SpeculativeOptions(gamma=2,
                        **SAMPLING), max_new_tokens=N_TOKENS, seed=s), n)
    assert _chi2_pvalue(counts, p_target, n) > 1e-3
    assert any(set(k) - {0, 2, 3, 5} for k in counts)  # tokens the draft never proposes still come out
    assert _chi2_pvalue(counts, p_pruned, n) < 1e-6


def test_pruned_draft_logits_and_frequent_tokens():
    from cllm.decoding.common import SeqCache
    from cllm.decoding.pruned_draft import PrunedVocabDraft, frequent_tokens

    assert frequent_tokens([[5, 5, 7, 9], [5, 7, 2]], 2, always=[1]) == [1, 5, 7]
    with pytest.raises(CllmError, match="k >= 1"):
        frequent_tokens([[1]], 0)
    draft = tiny_model(8)
    keep = [1, 3, 5, 11, 20]
    full, cut = SeqCache(draft), SeqCache(PrunedVocabDraft(draft, keep))
    for ids in ([3, 4, 5, 6], [9], [10, 12]):  # prefill, then cached steps
        a, b = full.forward(ids), cut.forward(ids)
        assert torch.allclose(a[:, keep], b[:, keep], atol=1e-12)
        others = [v for v in range(a.shape[-1]) if v not in keep]
        assert torch.isinf(b[:, others]).all() and (b[:, others] < 0).all()
    with pytest.raises(CllmError, match="ids must lie"):
        PrunedVocabDraft(draft, [10_000])
