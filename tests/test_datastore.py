"""The datastore of the base's own responses (REST-style retrieval branches for gated decoding): the lookup by
hand, the file, the command, the branches it adds to a gated forward, and that the decode stays the base's greedy
output whatever the store proposes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cllm.decoding.datastore import Datastore, load_datastore
from cllm.decoding.gated import GatedOptions, GatedRun, branch_mask, gated_decode
from cllm.errors import CllmError
from conftest import random_prompt
from test_gated import gated_tiny, tiny_trajectories
from test_jacobi import greedy_reference

RESPONSES = [[1, 2, 3, 4, 5], [9, 2, 3, 7], [2, 3, 4, 8]]


def test_longest_suffix_and_most_frequent_continuations_by_hand():
    store = Datastore(RESPONSES, max_ngram=3)
    # [0 2 3]: not stored; [2 3] is, three times: (4 5) once, (7) once, (4 8) once -> ties in the order first seen
    assert store.continuations([0, 2, 3], 2, 2) == [[4, 5], [7]]
    assert store.continuations([0, 2, 3], 5, 1) == [[4], [7]]  # cut to one token: (4) twice, then (7)
    assert store.continuations([1, 2, 3], 3, 5) == [[4, 5]]  # the longest suffix [1 2 3] wins over [2 3]
    assert store.continuations([0, 2, 3], 3, 5, max_ngram=1) == [[4, 5], [7], [4, 8]]  # [3] alone
    # never across two responses: nothing follows 5 (the end of one), and [5 9] spans two, so [9] alone is read
    assert store.continuations([5], 1, 3) == []
    assert store.continuations([5, 9], 1, 3) == [[2, 3, 7]]
    assert store.continuations([6], 1, 3) == [] and store.continuations([], 1, 3) == []


def test_tree_rule_follows_the_agreeing_occurrences_by_hand():
    store = Datastore(RESPONSES, max_ngram=3)
    # [2 3] is followed by 4 5, 7 and 4 8: branch 1 starts with 4 (2 of 3), then 5 and 8 once each (ties: first seen)
    assert store.continuations([0, 2, 3], 3, 3, min_share=0) == [[4, 5], [7]]
    # share 0.5: 2 of the 3 occurrences must agree: 4 (2 of 3) stays, 5 (1) is cut, 7 (1) is left out
    assert store.continuations([0, 2, 3], 3, 3, min_share=0.5) == [[4]]
    assert store.continuations([0, 2, 3], 3, 3, min_share=1.0) == []  # nothing all three agree on
    # [3 4] twice (5, 8): at share 0.5 one of two is enough, so both branches, each cut at the response's end
    assert store.continuations([3, 4], 2, 4, min_share=0.5) == [[5], [8]]
    assert store.continuations([9], 1, 5, min_share=0.3) == [[2, 3, 7]]  # one occurrence: followed to its end
    with pytest.raises(CllmError, match="datastore_share"):
        GatedOptions(datastore_share=1.5).check()


def test_file_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "d.npz"
    Datastore(RESPONSES, max_ngram=2, meta={"model": "m"}).save(path)
    back = load_datastore(str(path))
    assert back.max_ngram == 2 and back.meta["model"] == "m"
    assert back.continuations([9, 2, 3], 1, 4) == [[4, 5]]  # max_ngram 2 kept: [2 3] is the suffix read
    (tmp_path / "bad.npz").write_bytes(b"not a datastore")
    with pytest.raises(CllmError, match="not a cllm datastore"):
        load_datastore(str(tmp_path / "bad.npz"))
    with pytest.raises(CllmError, match="datastore file not found"):
        GatedOptions(datastore=str(tmp_path / "missing.npz")).check()
    with pytest.raises(CllmError, match="datastore_tokens"):
        GatedOptions(datastore_tokens=0).check()


def test_retrieved_branch_is_verified_and_counted_by_hand(tmp_path):
    """The store's continuation of the committed text joins the verify side after the pooled n-grams (one that is a
    prefix of a branch already there is not repeated); when it wins, its confirmed tokens are committed and
    counted as the datastore's."""
    path = tmp_path / "d.npz"
    Datastore([[6, 7, 20, 21, 22], [7, 30]], max_ngram=2).save(path)
    run = GatedRun([5, 6, 7], GatedOptions(block_size=4, pool_candidates=0, lookup_tokens=0, datastore=str(path),
                                           datastore_tokens=2))
    run.guess = [10, 11, 12]
    ids, rel_pos, visible, n_draft = run.inputs()  # suffix [6 7] -> (20 21)
    assert ids == [5, 6, 7, 10, 11, 12, 20, 21, 10, 11, 12] and n_draft == 3
    assert rel_pos == [0, 1, 2, 3, 4, 5, 3, 4, 3, 4, 5] and torch.equal(visible, branch_mask(3, [3, 2, 3]))
    # the base's next token is 20, then 21 after it, then 40 after [20 21]
    taken, reason, keep = run.apply([0, 0, 20, 0, 0, 0, 21, 40, 50, 51, 52], set(), 100, None)
    assert taken == [20, 21, 40] and reason is None and keep == [0, 1, 2, 6, 7]
    assert run.stats["tokens_from_datastore"] == 2 and run.stats["tokens_from_draft"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_decoding_with_a_datastore_is_the_base_greedy_output(seed, tmp_path):
    """A store holding this prompt's greedy text (with its last tokens changed) and random responses: the output is
    the base's greedy output and the store's right branches save forwards; a store of noise changes nothing."""
    base, model = gated_tiny(seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = random_prompt(gen, 6)
    want = greedy_reference(base, prompt, 40)
    noise = [random_prompt(gen, 30) for _ in range(4)]
    right, wrong = tmp_path / "right.npz", tmp_path / "noise.npz"
    Datastore([prompt + want[:30] + [(t + 1) % 50 for t in want[30:]], *noise]).save(right)
    Datastore(noise).save(wrong)
    opts = GatedOptions(block_size=4, pool_candidates=1, lookup_tokens=0)
    plain = gated_decode(model, None, prompt, opts, max_new_tokens=40, seed=seed, eos_token_id=[-1])
    for path, k, share in ((right, 1, None), (right, 3, None), (wrong, 2, None), (right, 2, 0.2), (wrong, 3, 0.0)):
        o = dataclasses.replace(opts, datastore=str(path), datastore_tokens=6, datastore_candidates=k,
                                datastore_share=share)
        got = gated_decode(model, None, prompt, o, max_new_tokens=40, seed=seed, eos_token_id=[-1])
        assert got.token_ids == want == plain.token_ids
        if path == right:
            assert got.n_forwards < plain.n_forwards and got.extra["tokens_from_datastore"] >= 20


def test_continuous_batching_with_a_datastore_equals_the_solo_decode(tmp_path):
    from cllm.decoding.continuous import Row
    from test_continuous import EOS, _run

    base, model = gated_tiny(2)
    gen = torch.Generator().manual_seed(2)
    prompts = [random_prompt(gen, 5 + i) for i in range(3)]
    path = tmp_path / "d.npz"
    Datastore([p + greedy_reference(base, p, 20) for p in prompts[:2]]).save(path)
    opts = GatedOptions(block_size=4, pool_candidates=1, lookup_tokens=2, datastore=str(path), datastore_tokens=5)
    rows = [Row(method="gated", prompt=p, max_new_tokens=20, seed=0, options=opts) for p in prompts]
    _run(model, {0: rows[:2], 1: rows[2:]})
    for row, p in zip(rows, prompts):
        solo = gated_decode(model, None, p, opts, max_new_tokens=20, seed=0, eos_token_id=EOS)
        assert row.generated == solo.token_ids


def test_datastore_command_joins_each_prompts_fixed_points(tiny_model_dir, tmp_path):
    from cllm.cli import main
    from cllm.data.trajectories import load_trajectories

    folder = tiny_trajectories(tiny_model_dir, tmp_path, 7, 3)
    out = tmp_path / "store" / "d.npz"
    assert main(["datastore", str(out), str(folder), "--max-ngram", "4"]) == 0
    records = load_trajectories(folder)
    want = {}
    for r in records:  # sorted by (data_id, block_index)
        want.setdefault(r["data_id"], []).extend(r["fixed_point"])
    with np.load(out) as z:
        tokens = z["tokens"].tolist()
    assert tokens == [t for _, resp in sorted(want.items()) for t in [*resp, -1]]
    assert main(["datastore", str(tmp_path / "x.npz"), str(tmp_path)]) == 2  # not a trajectory folder
    assert not (tmp_path / "x.npz").exists()


def test_decode_command_writes_a_method_holding_a_path_beside_the_answers(tiny_model_dir, tmp_path):
    """`--compare gated:datastore=DIR/FILE --out answers.jsonl`: the compared method's answers file is a sibling whose
    name keeps the option's '/' encoded (a folder there made the write fail), and its text is the base's."""
    import json

    from cllm.cli import main
    from test_gated import _save_gated_adapter

    adapter = _save_gated_adapter(tiny_model_dir, tmp_path / "gated")
    (tmp_path / "store").mkdir()
    store = tmp_path / "store" / "d.npz"
    Datastore([[5, 6, 7, 8]]).save(store)
    method = f"gated:datastore={store}"
    out = tmp_path / "answers.jsonl"
    assert main(["decode", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "w3 w4 w5",
                 "--method", "ar", "--compare", method, "--block-size", "4", "--max-new-tokens", "12",
                 "--dtype", "fp32", "--out", str(out)]) == 0
    sibling = tmp_path / f"answers.{method.replace('/', '%2F')}.jsonl"
    assert sibling.is_file()
    ar, gated_ = (json.loads(p.read_text().splitlines()[0]) for p in (out, sibling))
    assert gated_["choices"][0]["turns"] == ar["choices"][0]["turns"]
