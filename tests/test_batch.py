"""The packed-batch contract both objectives' collators honour, and its padding helpers, by hand."""

from __future__ import annotations

import pytest
import torch

from cllm.training.batch import check_packed_batch, pad_rows, pad_stream
from cllm.training.objectives.jacobi_forcing import JacobiForcingCollator
from cllm.training.objectives.cllm import PackedCollator


def test_pad_rows_and_pad_stream_by_hand():
    assert pad_rows([[1, 2, 3], [4]], 4).tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert pad_rows([[True], []], 2, torch.bool).tolist() == [[True, False], [False, False]]
    packed = [{"ids": [7, 8, 9], "seg": [0, 1, 1], "pos": [0, 1, 1]}, {"ids": [5], "seg": [0], "pos": [3]}]
    ids, seg, pos = pad_stream(packed, "seg", pad_token_id=99, pad_segment=-1)
    assert ids.tolist() == [[7, 8, 9], [5, 99, 99]]
    assert seg.tolist() == [[0, 1, 1], [0, -1, -1]]
    assert pos.tolist() == [[0, 1, 1], [3, 4, 5]]  # padding continues after the row's largest position


def _cllm_examples():
    return [{"prompt_ids": [5, 6, 7, 8], "prompt_len": 3, "fixed_point": [11, 12, 13], "state": [11, 20, 21]},
            {"prompt_ids": [5, 6], "prompt_len": 2, "fixed_point": [14, 15], "state": [22, 15]}]


def _jf_examples():
    return [{"prompt_ids": [5, 6, 7], "fixed_points": [[10, 11, 12], [13, 14]], "states": [[20, 11, 22], [13, 23]]},
            {"prompt_ids": [8, 9], "fixed_points": [[30, 31, 32]], "states": [[33, 31, 32]]}]


@pytest.mark.parametrize("objective", ["cllm", "jacobi_forcing_noisy", "jacobi_forcing_clean"])
def test_both_collators_honour_the_contract(objective):
    if objective == "cllm":
        collator, examples, K = PackedCollator(0, 3), _cllm_examples(), 3
    else:
        context = objective.rsplit("_", 1)[1]
        collator, examples, K = JacobiForcingCollator(0, 3, noisy_context=context), _jf_examples(), 2 * 3
    batch = collator(examples)
    check_packed_batch(batch)
    assert batch["student_idx"].shape == (2, K)
    # every real slot and AR pair picks a logit inside its row's unpadded sequence, never the padding
    for b, ex in enumerate(examples):
        length = len(collator.pack(ex)["ids"])
        assert int(batch["student_idx"][b][batch["real_mask"][b]].max()) < length
        assert int(batch["ar_idx"][b][batch["ar_mask"][b]].max()) < length
        assert batch["input_ids"][b, length:].eq(0).all()


def test_check_packed_batch_names_the_broken_key():
    batch = PackedCollator(0, 3)(_cllm_examples())
    with pytest.raises(ValueError, match="lacks \\['ar_mask'\\]"):
        check_packed_batch({k: v for k, v in batch.items() if k != "ar_mask"})
    with pytest.raises(ValueError, match="block_mask has shape"):
        check_packed_batch({**batch, "block_mask": batch["block_mask"][:, :2]})
