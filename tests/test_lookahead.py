"""Lookahead decoding: exactly greedy AR over seeds, window sizes, n-gram levels and pool sizes; its mask by rule
and by hand; its n-gram pool; through the registry."""

from __future__ import annotations

import itertools

import pytest
import torch

from cllm.decoding import registry
from cllm.decoding.lookahead import NgramPool, allowed_mask, lookahead_decode, positions
from cllm.errors import CllmError
from cllm.decoding.options import LookaheadOptions
from conftest import random_prompt, tiny_model
from test_jacobi import greedy_reference


def test_mask_by_hand():
    # head of 1, W = 2, two levels (N = 3), one guess of 2: [h | a0 a1 | b0 b1 | g0 g1]
    want = [
        [1, 0, 0, 0, 0, 0, 0],  # h
        [1, 1, 0, 0, 0, 0, 0],  # a0: level 0 up to its column
        [1, 1, 1, 0, 0, 0, 0],  # a1
        [1, 1, 0, 1, 0, 0, 0],  # b0: level 0 up to column 0, then itself
        [1, 1, 1, 0, 1, 0, 0],  # b1: level 0 up to column 1, then itself
        [1, 0, 0, 0, 0, 1, 0],  # g0: head, itself
        [1, 0, 0, 0, 0, 1, 1],  # g1
    ]
    assert allowed_mask(1, 2, 2, [2]).int().tolist() == want
    assert positions(9, 1, 2, 2, [2]) == [9, 10, 11, 11, 12, 10, 11]


@pytest.mark.parametrize("n_head,n_levels,width,guess_lens", [(1, 3, 4, [3, 3]), (3, 1, 5, []), (2, 4, 2, [3])])
def test_every_token_sees_one_token_per_position_before_it(n_head, n_levels, width, guess_lens):
    """The rule behind the mask: each lookahead or guess token sees the whole head and exactly one token at each
    position between the head and itself, so its logits are those of one contiguous sequence."""
    allowed = allowed_mask(n_head, n_levels, width, guess_lens)
    pos = positions(100, n_head, n_levels, width, guess_lens)
    for q in range(n_head, len(pos)):
        seen = [pos[k] for k in range(len(pos)) if allowed[q, k]]
        assert seen == list(range(100 - n_head + 1, pos[q] + 1)), (q, seen)


def test_pool_keeps_the_most_recent_per_key():
    pool = NgramPool(per_key=2)
    for key, value in [(4, (1, 2)), (4, (3, 5)), (4, (1, 2)), (4, (6, 7)), (8, (9, 9))]:
        pool.add(key, value)
    assert pool.get(4) == [(1, 2), (6, 7)]  # (1, 2) seen again moved up; (3, 5) the least recent, dropped
    assert pool.get(8) == [(9, 9)] and pool.get(5) == []
    NgramPool(per_key=0).add(4, (1, 2))


@pytest.mark.parametrize("seed", range(3))
def test_equals_greedy_over_windows_levels_and_pools(seed):
    model = tiny_model(seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = random_prompt(gen, 6 + seed)
    want = greedy_reference(model, prompt, 32)
    for window, ngram, guesses in itertools.product([1, 3, 6], [2, 3, 5], [0, 2, 7]):
        got = lookahead_decode(model, None, prompt, LookaheadOptions(window=window, ngram=ngram, guesses=guesses),
                               max_new_tokens=32, seed=seed, eos_token_id=[-1])
        assert got.token_ids == want, (window, ngram, guesses)
        assert got.n_forwards == len(got.accept_lengths) and sum(got.accept_lengths) == 32


def test_verified_ngrams_commit_several_tokens_per_forward():
    """On a repetitive prompt the pool's n-grams are right often (this tiny model: 19 of 48 tokens came from
    them), so a forward commits several tokens, and the text is still exactly greedy."""
    model = tiny_model(1)
    prompt = [5, 6, 7, 8] * 6
    want = greedy_reference(model, prompt, 48)
    got = lookahead_decode(model, None, prompt, LookaheadOptions(window=4, ngram=4, guesses=4), max_new_tokens=48,
                           eos_token_id=[-1])
    assert got.token_ids == want
    assert got.extra["tokens_from_guesses"] >= 10 and got.n_forwards <= 48 - 10
    assert max(got.accept_lengths) >= 3


def test_stops_at_eos_and_registry_entry():
    model = tiny_model(0)
    prompt = [3, 4, 5]
    want = greedy_reference(model, prompt, 20)
    eos = want[5]
    got = lookahead_decode(model, None, prompt, LookaheadOptions(window=3, ngram=3, guesses=3), max_new_tokens=20,
                           eos_token_id=eos)
    assert got.token_ids == want[: want.index(eos) + 1] and got.finish_reason == "eos"
    cfg = registry.DecodeConfig(max_new_tokens=20, lookahead_window=3, lookahead_ngram=3, lookahead_guesses=3)
    streamed = []
    via = registry.decode("lookahead", model, None, [prompt], [0], cfg,
                          on_commit=lambda row, ids: streamed.append((row, list(ids))))[0]
    assert via.token_ids == want
    # streamed as committed: one call per forward, together the whole answer
    assert len(streamed) == via.n_forwards and sum((ids for _, ids in streamed), []) == want
    assert [len(ids) for _, ids in streamed] == via.accept_lengths
    with pytest.raises(CllmError, match="n-gram size"):
        registry.DecodeConfig(lookahead_ngram=1).validate(["lookahead"])
    with pytest.raises(CllmError, match="greedy-only"):
        registry.DecodeConfig(temperature=0.5).validate(["lookahead"])
