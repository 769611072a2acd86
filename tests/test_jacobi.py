"""Jacobi decoding is exactly greedy decoding; its statistics and trajectories are what the CLLM paper defines."""

from __future__ import annotations

import math

import pytest
import torch

from cllm.decoding import jacobi_decode
from cllm.decoding.jacobi import _commit, _Row, n_to_commit
from cllm.errors import CllmError
from cllm.decoding.options import JacobiOptions
from conftest import VOCAB, random_prompt, tiny_model


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy continuation by full recomputation, no cache: the definition Jacobi must reproduce."""
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return out


@torch.no_grad()
def jacobi_step(model, context: list[int], state: list[int]) -> list[int]:
    """One textbook Jacobi update y_i <- argmax p(. | context, y_<i) for all i, by full recomputation."""
    logits = model(torch.tensor([context + state[:-1]])).logits[0]
    return logits[len(context) - 1 :].argmax(-1).tolist()


@pytest.mark.parametrize("seed", range(12))
def test_jacobi_equals_greedy_over_seeds_blocks_and_lengths(seed):
    model = tiny_model(seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = random_prompt(gen, [1, 4, 11, 30][seed % 4])
    max_new = [37, 50, 23][seed % 3]  # never a multiple of most block sizes
    ref = greedy_reference(model, prompt, max_new)
    for n in range(1, 33):
        res = jacobi_decode(model, None, prompt, JacobiOptions(block_size=n), max_new_tokens=max_new, seed=seed)
        assert res.token_ids == ref, f"block size {n}"
        assert res.n_new_tokens == max_new and res.finish_reason == "length"
        assert sum(res.accept_lengths) == max_new and len(res.accept_lengths) == res.n_forwards
        assert res.n_fast_forward == max_new - res.n_forwards
        assert all(a >= 1 for a in res.accept_lengths)


@pytest.mark.parametrize("seed", range(6))
def test_eos_inside_a_block_stops_and_trims(seed):
    model = tiny_model(100 + seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = random_prompt(gen, 6)
    free = greedy_reference(model, prompt, 40)
    # Make a token of the free-running output the EOS, at a position inside a block of 16.
    pos = 5 + seed
    eos = free[pos]
    ref = greedy_reference(model, prompt, 40, eos=eos)
    assert ref[-1] == eos and len(ref) <= pos + 1
    for n in (3, 8, 16):
        res = jacobi_decode(model, None, prompt, JacobiOptions(block_size=n), max_new_tokens=40, eos_token_id=eos)
        assert res.token_ids == ref
        assert res.finish_reason == "eos"


@pytest.mark.parametrize("init", ["prompt", "repeat", "pad"])
def test_init_strategy_changes_speed_not_output(init):
    model = tiny_model(7)
    prompt = random_prompt(torch.Generator().manual_seed(7), 9)
    ref = greedy_reference(model, prompt, 45)
    for seed in range(3):
        res = jacobi_decode(model, None, prompt, JacobiOptions(block_size=16, init=init), max_new_tokens=45, seed=seed)
        assert res.token_ids == ref


def test_batch_rows_commit_at_their_own_pace_and_match_single_runs():
    model = tiny_model(3)
    gen = torch.Generator().manual_seed(3)
    prompts = [random_prompt(gen, length) for length in (2, 13, 7, 1, 25)]
    eos = greedy_reference(model, prompts[2], 30)[9]  # row 2 (at least) stops early on EOS
    refs = [greedy_reference(model, p, 30, eos=eos) for p in prompts]
    for n in (4, 16):
        batch = jacobi_decode(model, None, prompts, JacobiOptions(block_size=n), max_new_tokens=30, eos_token_id=eos)
        assert [r.token_ids for r in batch] == refs
        singles = [jacobi_decode(model, None, p, JacobiOptions(block_size=n), max_new_tokens=30, eos_token_id=eos,
                                 seed=i)
                   for i, p in enumerate(prompts)]
        # Same seeds per row, so even the iteration counts agree with single-prompt runs.
        assert [r.n_forwards for r in batch] == [r.n_forwards for r in singles]
    assert any(len(r) < 30 for r in refs) and any(len(r) == 30 for r in refs)


def constant_model(token: int):
    """A crafted model whose greedy chain is fully predictable: every position predicts `token`.

    Attention and MLP outputs are zeroed, every token embeds to the same vector, so the logits are the same
    everywhere; the LM head makes `token` the argmax.
    """
    model = tiny_model(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.ones_like(model.model.embed_tokens.weight))
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 1.0
    return model


def test_predictable_model_converges_in_minimum_forwards():
    token = 9
    model = constant_model(token)
    prompt = [3, 4, 5, token]
    for n, max_new in [(16, 64), (16, 70), (5, 23), (1, 7)]:
        # Guessing the last token is exactly right here: every block converges in its first forward.
        res = jacobi_decode(model, None, prompt, JacobiOptions(block_size=n, init='repeat'), max_new_tokens=max_new)
        assert res.token_ids == [token] * max_new
        assert res.n_forwards == math.ceil(max_new / n)
        # Random guesses from the prompt: the first forward fixes the whole block, the second confirms it.
        res = jacobi_decode(model, None, [3, 4, 5, 6], JacobiOptions(block_size=n, init='pad'), max_new_tokens=max_new)
        full, rest = divmod(max_new, n)
        expected = full * min(n, 2) + (min(rest, 2) if rest else 0)
        assert res.n_forwards == expected


def test_trajectories_follow_the_textbook_iteration_and_end_in_the_fixed_point():
    model = tiny_model(11)
    prompt = random_prompt(torch.Generator().manual_seed(11), 8)
    n, max_new = 8, 44
    res = jacobi_decode(model, None, prompt, JacobiOptions(block_size=n, record_trajectory=True),
                        max_new_tokens=max_new)
    ref = greedy_reference(model, prompt, max_new)
    assert res.token_ids == ref
    traj = res.trajectory
    assert [b.block_index for b in traj] == list(range(math.ceil(max_new / n)))
    assert sum((b.fixed_point for b in traj), []) == ref
    total_states = 0
    for b in traj:
        width = min(n, max_new - b.start)
        context = prompt + ref[: b.start]
        assert all(len(s) == width for s in b.states) and len(b.fixed_point) == width
        # Every recorded state moves to the next by one full Jacobi step; the last one reaches the fixed point.
        for s, s_next in zip(b.states, b.states[1:] + [b.fixed_point]):
            assert jacobi_step(model, context, s) == s_next
        assert jacobi_step(model, context, b.fixed_point) == b.fixed_point
        total_states += len(b.states)
    assert total_states == res.n_forwards


def test_n_to_commit_rule():
    assert n_to_commit([5], [7]) == 1  # the first prediction is always right
    assert n_to_commit([1, 2, 3, 4], [9, 2, 3, 4]) == 1  # guess[0] wrong: only pred[0]
    assert n_to_commit([1, 2, 3, 4], [1, 2, 8, 4]) == 3  # guess[0..1] right -> pred[0..2] right
    assert n_to_commit([1, 2, 3, 4], [1, 2, 3, 9]) == 4  # the last guess is never checked
    assert n_to_commit([1, 2, 3, 4], [1, 5, 3, 4]) == 2  # a later match after a miss does not count
    with pytest.raises(ValueError):
        n_to_commit([1], [1, 2])


def test_fast_forward_and_stationary_counts_on_a_scripted_block():
    # Block of 4; scripted predictions as the model would give them. Final fixed point: [10, 11, 12, 13].
    row = _Row(prompt=[1], generator=torch.Generator(), head=[1], y=[0, 0, 12, 0], c=0, held=[1, 1, 1, 1])
    # it 1: input y=[0,0,12,0]; pred [10, 7, 12, 13]: commits 10 only; position 2 already holds 12 (and keeps it).
    assert _commit(row, [10, 7, 12, 13], stop=set()) == 1
    assert row.y == [10, 7, 12, 13] and row.c == 1 and row.n_fast_forward == 0
    # it 2: input [10 | 7, 12, 13]; pred [11, 12, 13]: 7 != 11 -> commits 11 only.
    assert _commit(row, [11, 12, 13], stop=set()) == 1
    # it 3: input [10, 11 | 12, 13]; pred [12, 13]: 12 == 12 -> commits 12 and 13.
    assert _commit(row, [12, 13], stop=set()) == 2
    assert row.generated == [10, 11, 12, 13] and row.c == 4
    assert row.accept_lengths == [1, 1, 2] and row.n_fast_forward == 1
    # 12 sat right and unchanged for three iterations while earlier tokens were wrong: stationary. 13 entered
    # the state in iteration 1 and stayed: stationary too.
    assert row.n_stationary == 2


def test_bad_arguments_raise_clear_errors():
    model = tiny_model(0)
    with pytest.raises(CllmError, match="block_size"):
        jacobi_decode(model, None, [3, 4], JacobiOptions(block_size=0))
    with pytest.raises(CllmError, match="max_new_tokens"):
        jacobi_decode(model, None, [3, 4], max_new_tokens=-1)
    with pytest.raises(CllmError, match="empty"):
        jacobi_decode(model, None, [[3], []])
    with pytest.raises(CllmError, match="init"):
        jacobi_decode(model, None, [3], JacobiOptions(init='zeros'))


def test_vocab_constant_is_the_models():
    assert tiny_model(0).config.vocab_size == VOCAB


class _OldStyleModel(torch.nn.Module):
    """A causal LM whose forward takes its KV cache as `past_key_values` (remote code, transformers < 5.24)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=past_key_values, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=out.logits, past_key_values=out.cache)


@torch.no_grad()
def test_cached_forward_takes_either_cache_argument_name():
    from transformers import DynamicCache

    from cllm.decoding.common import cached_forward

    model = tiny_model(3)
    prompt = random_prompt(torch.Generator().manual_seed(3), 7)
    results = []
    for m in (model, _OldStyleModel(model)):
        cache = DynamicCache()
        ids = torch.tensor([prompt])  # (1, 7)
        first, cache = cached_forward(m, ids[:, :4], torch.arange(4).unsqueeze(0), cache)
        second, cache = cached_forward(m, ids[:, 4:], torch.arange(4, 7).unsqueeze(0), cache)
        assert cache.get_seq_length() == 7
        results.append(torch.cat([first, second], dim=1))  # (1, 7, V)
    full = model(torch.tensor([prompt])).logits
    torch.testing.assert_close(results[0], full)
    torch.testing.assert_close(results[1], full)


@pytest.mark.parametrize("lora", [False, True])
def test_jacobi_decode_uses_no_deprecated_cache_argument(lora):
    import warnings

    model = tiny_model(4)
    if lora:  # an unmerged adapter, as right after LoRA training
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompt = random_prompt(torch.Generator().manual_seed(4), 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jacobi_decode(model, None, prompt, JacobiOptions(block_size=4), max_new_tokens=12)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
