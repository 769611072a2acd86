"""Multi-block Jacobi decoding with rejection recycling: exactly greedy AR, and its pure rules."""

from __future__ import annotations

import pytest
import torch

from cllm.decoding.multiblock import (
    RecyclePool,
    _Block,
    _consume,
    _fill,
    multiblock_decode,
    n_leading_matches,
    pick_row,
)
from cllm.decoding.options import MultiblockOptions
from cllm.errors import CllmError
from conftest import random_prompt, tiny_model
from test_jacobi import greedy_reference


def test_pure_rules():
    assert n_leading_matches([1, 2, 3], [1, 2, 4, 5]) == 2
    assert n_leading_matches([1, 2, 3], [1, 2, 3, 5]) == 3
    assert n_leading_matches([], [7]) == 0
    assert pick_row([[1, 9], [1, 2], [1, 2]], [[1, 2, 3], [1, 2, 3], [1, 2, 3]]) == (1, 2)  # first of the best
    assert pick_row([[5], [6]], [[1, 0], [2, 0]]) == (0, 0)  # all fail: the main row
    pool = RecyclePool(per_key=2)
    for tail in ([4, 1, 2], [4, 3], [4, 1, 2], [4, 5, 6], [7]):
        pool.add(tail)
    assert pool.candidates(4, 5) == [[5, 6], [3]]  # most recent first, a duplicate not re-added, 2 kept
    assert pool.candidates(4, 1) == [[5, 6]] and pool.candidates(7, 2) == [] and pool.candidates(9, 2) == []
    assert RecyclePool(per_key=0).candidates(4, 2) == []
    assert _fill([8, 9], [1, 2, 3, 4]) == [8, 9, 3, 4] and _fill([8, 9, 7], [1, 2]) == [8, 9]
    blocks = [_Block(4, done=1), _Block(4), _Block(4)]
    _consume(blocks, 5)  # 3 open slots of the first block, then 2 of the second
    assert [(b.size, b.done) for b in blocks] == [(4, 2), (4, 0)]
    _consume(blocks, 7)  # everything plus the one-token overflow
    assert blocks == []


def test_multiblock_equals_greedy():
    extra_rows = full_windows = recycled_wins = 0
    for seed in range(6):
        model = tiny_model(seed)
        gen = torch.Generator().manual_seed(seed)
        prompt = random_prompt(gen, [1, 5, 12][seed % 3])
        max_new = [41, 30, 57][seed % 3]
        ref = greedy_reference(model, prompt, max_new)
        for n in (1, 3, 4, 8):
            for K, r, n_recycle in [(1, 0.85, 0), (2, 0.5, 0), (3, 0.25, 2), (4, 1.0, 3), (2, 0.85, 1)]:
                res = multiblock_decode(model, None, prompt, MultiblockOptions(block_size=n, n_blocks=K,
                                        spawn_ratio=r, n_recycle=n_recycle), max_new_tokens=max_new, seed=seed)
                assert res.token_ids == ref, (seed, n, K, r, n_recycle)
                assert res.finish_reason == "length" and sum(res.accept_lengths) == max_new
                assert len(res.accept_lengths) == res.n_forwards and all(a >= 1 for a in res.accept_lengths)
                assert res.extra["max_in_flight"] <= K
                extra_rows += res.extra["rows"] - res.n_forwards
                recycled_wins += res.extra["recycled_wins"]
                full_windows += res.extra["max_in_flight"] == K > 1
    # The paths the equality above covers really ran: several blocks in flight, extra rows, recycled winners.
    assert full_windows > 0 and extra_rows > 0 and recycled_wins > 0, (full_windows, extra_rows, recycled_wins)


@pytest.mark.parametrize("seed", range(3))
def test_multiblock_stops_at_eos(seed):
    model = tiny_model(200 + seed)
    prompt = random_prompt(torch.Generator().manual_seed(seed), 6)
    free = greedy_reference(model, prompt, 40)
    eos = free[9 + seed]
    ref = greedy_reference(model, prompt, 40, eos=eos)
    res = multiblock_decode(model, None, prompt, MultiblockOptions(block_size=4, n_blocks=3, spawn_ratio=0.5),
                            max_new_tokens=40, eos_token_id=eos)
    assert res.token_ids == ref and res.finish_reason == "eos"


def test_bad_arguments():
    model = tiny_model(0)
    for kw, msg in [({"n_blocks": 0}, "n_blocks"), ({"spawn_ratio": 0.0}, "spawn_ratio"),
                    ({"spawn_ratio": 1.5}, "spawn_ratio"), ({"n_recycle": -1}, "n_recycle"),
                    ({"block_size": 0}, "block_size"), ({"init": "zeros"}, "init strategy")]:
        with pytest.raises(CllmError, match=msg):
            multiblock_decode(model, None, [3, 4], MultiblockOptions(**kw))
    with pytest.raises(CllmError, match="batch size 1"):
        multiblock_decode(model, None, [[3, 4], [5, 6]])


def test_cli_multiblock_is_identical_to_ar_and_checks_flags(tiny_model_dir, tmp_path, capsys):
    import json

    from cllm.cli import main
    from test_draft import write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    report_path = tmp_path / "report.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--method", "multiblock",
                 "--compare", "ar", "--block-size", "4", "--n-blocks", "3", "--spawn-ratio", "0.5", "--n-recycle", "1",
                 "--max-new-tokens", "15", "--dtype", "fp64", "--report", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["methods"]["multiblock"]["exact_match_ar"] == 1.0
    capsys.readouterr()
    for args, message in [(["--n-blocks", "0"], "n_blocks"), (["--spawn-ratio", "2"], "spawn_ratio"),
                          (["--batch-size", "2"], "--batch-size 1")]:
        code = main(["decode", "--model", str(tiny_model_dir), "--prompt", "w3 w4", "--method", "multiblock", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
