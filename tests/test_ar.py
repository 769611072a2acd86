"""The AR baseline: greedy equals `generate()`, sampling is seeded per row, logit warping is right."""

from __future__ import annotations

import pytest
import torch

from cllm.decoding import ar_decode
from cllm.decoding.sampling import check_sampling_args, warp_logits
from cllm.errors import CllmError
from cllm.decoding.options import SamplingOptions
from conftest import random_prompt, tiny_model


@pytest.mark.parametrize("seed", range(4))
def test_greedy_equals_generate(seed):
    model = tiny_model(seed)
    prompt = random_prompt(torch.Generator().manual_seed(seed), 5 + seed)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=33, do_sample=False, eos_token_id=None, pad_token_id=0)
    res = ar_decode(model, None, prompt, max_new_tokens=33)
    assert res.token_ids == out[0, len(prompt):].tolist()
    assert res.n_forwards == 33 and res.tokens_per_forward == 1.0


def test_greedy_with_eos_equals_generate():
    model = tiny_model(5)
    prompt = random_prompt(torch.Generator().manual_seed(5), 4)
    free = ar_decode(model, None, prompt, max_new_tokens=30).token_ids
    eos = free[12]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    res = ar_decode(model, None, prompt, max_new_tokens=30, eos_token_id=eos)
    assert res.token_ids == out[0, len(prompt):].tolist()
    assert res.token_ids[-1] == eos and res.finish_reason == "eos"


def test_batch_equals_single_rows_greedy_and_sampled():
    model = tiny_model(2)
    gen = torch.Generator().manual_seed(2)
    prompts = [random_prompt(gen, n) for n in (1, 8, 3)]
    for temp in (0.0, 1.0):
        batch = ar_decode(model, None, prompts, SamplingOptions(temperature=temp, top_k=20), max_new_tokens=20,
                          seed=[7, 8, 9])
        singles = [ar_decode(model, None, p, SamplingOptions(temperature=temp, top_k=20), max_new_tokens=20, seed=s)
                   for p, s in zip(prompts, [7, 8, 9])]
        assert [r.token_ids for r in batch] == [r.token_ids for r in singles]


def test_sampling_is_seeded():
    model = tiny_model(4)
    prompt = [5, 6, 7]
    a = ar_decode(model, None, prompt, SamplingOptions(temperature=1.0), max_new_tokens=25, seed=1).token_ids
    b = ar_decode(model, None, prompt, SamplingOptions(temperature=1.0), max_new_tokens=25, seed=1).token_ids
    c = ar_decode(model, None, prompt, SamplingOptions(temperature=1.0), max_new_tokens=25, seed=2).token_ids
    assert a == b and a != c


def test_warp_top_k_and_top_p_on_literal_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = warp_logits(logits, 1.0, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # top_p 0.8: 0.5 + 0.3 reaches 0.8, so the third token is dropped; top_p 0.81 keeps it.
    assert warp_logits(logits, 1.0, top_p=0.8).isfinite().tolist() == [[True, True, False, False]]
    assert warp_logits(logits, 1.0, top_p=0.81).isfinite().tolist() == [[True, True, True, False]]
    # The most likely token survives any top_p.
    assert warp_logits(logits, 1.0, top_p=0.01).isfinite().tolist() == [[True, False, False, False]]
    # Temperature divides the logits.
    assert torch.allclose(warp_logits(logits, 2.0), logits / 2)


def test_sampling_argument_checks():
    for bad in [dict(temperature=-1, top_k=None, top_p=None), dict(temperature=1, top_k=-2, top_p=None),
                dict(temperature=1, top_k=None, top_p=0.0), dict(temperature=1, top_k=None, top_p=1.5)]:
        with pytest.raises(CllmError):
            check_sampling_args(**bad)
