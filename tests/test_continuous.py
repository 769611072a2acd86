"""Continuous batching (`cllm.decoding.continuous`): rows that join a running batch mid-decode and leave it early
give exactly the output each gets decoded alone, greedy (AR and Jacobi, fp32 and fp64) and sampled (AR, its own
seed and settings); a cancelled row leaves at once; a stop requested by the callback ends only its row."""

from __future__ import annotations

import pytest
import torch

from cllm.decoding import ar_decode, jacobi_decode
from cllm.decoding.continuous import ContinuousBatch, Row, prefill_groups
from cllm.decoding.options import JacobiOptions, SamplingOptions
from conftest import random_prompt, tiny_model

EOS = 1


def _solo(model, row: Row, eos=EOS) -> list[int]:
    if row.method == "ar":
        res = ar_decode(model, None, row.prompt, SamplingOptions(temperature=row.temperature, top_k=row.top_k,
                        top_p=row.top_p), max_new_tokens=row.max_new_tokens, seed=row.seed, eos_token_id=eos)
    else:
        res = jacobi_decode(model, None, row.prompt, JacobiOptions(block_size=row.block_size, init=row.init),
                            max_new_tokens=row.max_new_tokens, seed=row.seed, eos_token_id=eos)
    return res.token_ids


def _run(model, schedule: dict[int, list[Row]], max_steps: int = 500) -> int:
    """Step the batch, letting schedule[step] rows join before that step; returns the largest batch seen."""
    batch, widest = ContinuousBatch(model, {EOS}, pad_id=0), 0
    for step in range(max_steps):
        batch.step(schedule.get(step, []))
        widest = max(widest, len(batch.rows))
        if not batch.rows and step > max(schedule):
            return widest
    raise AssertionError("the batch never drained")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_rows_joining_and_leaving_mid_decode_equal_solo_decodes(dtype, seed):
    model = tiny_model(seed, dtype=dtype)
    gen = torch.Generator().manual_seed(100 + seed)
    rows = []
    for i in range(7):
        method = "jacobi" if i % 2 else "ar"
        rows.append(Row(method=method, prompt=random_prompt(gen, 2 + 3 * i % 11), max_new_tokens=6 + 5 * (i % 3),
                        seed=seed * 10 + i, block_size=(3, 4, 8)[i % 3]))
    rows[2].temperature, rows[2].top_k, rows[2].top_p = 0.9, 8, 0.9  # a sampled AR row beside greedy ones
    rows[4].temperature = 1.3
    # two at the start, then joins while others run (several in one step), the last after most have left
    schedule = {0: rows[:2], 3: [rows[2]], 4: rows[3:5], 9: [rows[5]], 25: [rows[6]]}
    widest = _run(model, schedule)
    assert widest >= 3
    for i, row in enumerate(rows):
        assert row.generated == _solo(model, row), (i, row.method)
        assert row.finish_reason in ("eos", "length")


def test_cancel_and_stop_end_only_their_row():
    model = tiny_model(1)
    gen = torch.Generator().manual_seed(5)
    seen = []
    stopper = Row(method="ar", prompt=random_prompt(gen, 4), max_new_tokens=20, seed=1,
                  on_commit=lambda toks: seen.extend(toks) or len(seen) >= 3)  # "a stop string matched" at 3 tokens
    cancelled = Row(method="jacobi", prompt=random_prompt(gen, 5), max_new_tokens=20, seed=2, block_size=4)
    keeps = Row(method="jacobi", prompt=random_prompt(gen, 6), max_new_tokens=20, seed=3, block_size=4)
    batch = ContinuousBatch(model, set(), pad_id=0)  # no EOS: only the stop, the cancel and the cap end rows
    batch.step([stopper, cancelled, keeps])
    cancelled.cancelled = True
    finished = []
    while batch.rows:
        finished += batch.step()
    assert stopper.finish_reason == "stop" and len(stopper.generated) == 3 and stopper.generated == seen
    assert cancelled.finish_reason == "cancelled" and cancelled in finished
    assert keeps.generated == _solo(model, keeps, eos=[]) and keeps.finish_reason == "length"


def test_a_row_done_in_its_prefill_never_joins():
    model = tiny_model(2)
    row = Row(method="ar", prompt=[5, 6, 7], max_new_tokens=1)
    batch = ContinuousBatch(model, {EOS}, pad_id=0)
    assert batch.step([row]) == [row] and batch.rows == [] and row.finish_reason == "length"
    assert row.generated == _solo(model, row)


def test_rows_joining_together_share_one_prefill_forward():
    """Four requests of similar length arriving at once cost one prefill forward, not four (and still decode as
    they would alone)."""
    model = tiny_model(3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(9)
    # inputs of 12, 12, 13, 13 tokens (a Jacobi row's prefill carries its 3-token guess too)
    rows = [Row(method=("ar", "jacobi")[i % 2], prompt=random_prompt(gen, (12, 9, 13, 10)[i]),
                max_new_tokens=(1, 8, 9, 10)[i], seed=i, block_size=4) for i in range(4)]
    batch = ContinuousBatch(model, {EOS}, pad_id=0)
    finished = batch.step(rows)
    assert batch.forwards == 2  # one prefill of all four, one step of those still running
    assert rows[0] in finished and rows[0].n_forwards == 1  # a 1-token request ends in the prefill
    while batch.rows:
        finished += batch.step()
    assert all(row.generated == _solo(model, row) for row in rows)


def test_prefill_groups_keep_padding_small():
    """Joiners are prefilled shortest first in groups whose padded size stays within 5/4 of their real tokens."""
    rows = [Row(method="ar", prompt=[5] * n, max_new_tokens=4) for n in (100, 10, 12, 95, 11, 300)]
    for row in rows:
        row.start(torch.device("cpu"), 0)
    got = [[len(r.prompt) for r in g] for g in prefill_groups(rows)]
    assert got == [[10, 11, 12], [95, 100], [300]]
    assert [[len(r.prompt) for r in g] for g in prefill_groups(rows, max_padding=100.0)] == [[10, 11, 12, 95, 100, 300]]


def test_prompts_of_very_different_lengths_prefill_apart_and_still_equal_solo():
    model = tiny_model(4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    rows = [Row(method="ar", prompt=random_prompt(gen, n), max_new_tokens=6, seed=i) for i, n in enumerate((3, 40, 4))]
    batch = ContinuousBatch(model, {EOS}, pad_id=0)
    batch.step(rows)
    assert batch.forwards == 3  # prefill of the two short ones, of the long one, then one step of all three
    while batch.rows:
        batch.step()
    assert all(row.generated == _solo(model, row) for row in rows)


@pytest.mark.parametrize("last", [1, 3, 20])
def test_ragged_forward_computes_only_each_rows_last_logits(last):
    """`last=K`: logits of each row's last K inputs, aligned at the row's end, equal to the full forward's (fp64)."""
    from cllm.decoding.common import RaggedCache

    model = tiny_model(5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    inputs = [random_prompt(gen, n) for n in (7, 2, 5)]
    full, lengths = RaggedCache(3, torch.device("cpu"), 0).forward(model, inputs)  # (3, 7, V)
    tail, _ = RaggedCache(3, torch.device("cpu"), 0).forward(model, inputs, last=last)  # (3, last, V)
    assert tail.shape[:2] == (3, last)
    for b, n in enumerate(lengths):
        k = min(last, n)
        torch.testing.assert_close(tail[b, last - k :], full[b, n - k : n], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_rows_joining_beside_ar_rows_equal_solo_gated_decodes(dtype):
    """Gated rows (branches, pool and a draft copy at gate 1 in each forward) join and leave a batch with AR rows;
    each row's output is the one it gets alone (gated: `gated_decode`, which is the base's greedy output)."""
    from cllm.decoding.gated import GatedOptions, gated_decode
    from test_gated import gated_tiny

    _, model = gated_tiny(3, dtype)
    gen = torch.Generator().manual_seed(21)
    opts = [GatedOptions(block_size=4, lookup_tokens=3, pool_candidates=2, pool_ngram=3),
            GatedOptions(block_size=6, draft_input="mask", mask_token_id=2, pool_candidates=0),
            GatedOptions(block_size=3, lookup_tokens=0, pool_candidates=1, pool_ngram=2, draft_topk=4)]
    rows = [Row(method="gated", prompt=random_prompt(gen, 4 + 3 * i), max_new_tokens=9 + 4 * i, seed=i, options=o)
            for i, o in enumerate(opts)]
    rows += [Row(method="ar", prompt=random_prompt(gen, 6), max_new_tokens=12, seed=7)]
    widest = _run(model, {0: [rows[0], rows[3]], 2: [rows[1]], 5: [rows[2]]})
    assert widest >= 3
    for row in rows[:3]:
        solo = gated_decode(model, None, row.prompt, row.options, max_new_tokens=row.max_new_tokens, seed=row.seed,
                            eos_token_id=EOS)
        assert row.generated == solo.token_ids and row.n_forwards == solo.n_forwards
    assert rows[3].generated == _solo(model, rows[3])
