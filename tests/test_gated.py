"""Gated LoRA and gated decoding: gate 0 is the base bit for bit, gradients flow only through gate-1 positions, a
packed mixed-gate forward equals separate forwards, and the decoder's output is the base's greedy output over
seeds, block sizes, draft inputs and pools (the adapter's weights random, so its drafts are mostly wrong)."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from cllm.decoding.gate import attach_gate, gated, is_gated
from cllm.decoding.gated import GatedOptions, accept_length, branch_mask, gated_decode, lookup_continuation
from cllm.errors import CllmError
from conftest import VOCAB, random_prompt, tiny_model, with_random_gated_adapter
from test_jacobi import greedy_reference


def gated_tiny(seed: int = 0, dtype=torch.float64, r: int = 4, layers: list[int] | None = None):
    """(base copy, gated PEFT model) of a tiny random Llama whose LoRA B weights are random (on the decoder layers
    `layers`, default all)."""
    base = tiny_model(seed, dtype)
    return base, with_random_gated_adapter(copy.deepcopy(base), seed, r, layers)


def test_gate_zero_is_the_base_bit_for_bit_fp32():
    base, model = gated_tiny(0, torch.float32)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(1), 12)])
    want = base(ids).logits
    assert torch.equal(model(ids).logits, want)  # outside `gated`: the adapter is off
    with gated(model, torch.zeros(1, 12)):
        assert torch.equal(model(ids).logits, want)
    with gated(model, torch.ones(1, 12)):
        assert not torch.allclose(model(ids).logits, want, atol=1e-3)  # the adapter does change the model


def test_gate_one_is_base_plus_adapter():
    _, model = gated_tiny(1)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(2), 9)])
    with gated(model, torch.ones(1, 9)):
        got = model(ids).logits
    merged = copy.deepcopy(model).merge_and_unload()  # the LoRA update folded into the weights, no gate
    assert torch.allclose(got, merged(ids).logits, atol=1e-10)


def _packed(seed: int):
    """[prompt][k0][c0][k1] with the clean-context mask of Jacobi Forcing: prompt and clean at gate 0, noisy at 1."""
    gen = torch.Generator().manual_seed(seed)
    prompt, k0, c0, k1 = (random_prompt(gen, n) for n in (5, 3, 3, 3))
    ids = prompt + k0 + c0 + k1
    pos = list(range(5)) + [5, 6, 7] * 2 + [8, 9, 10]
    L = len(ids)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(q + 1):
            prompt_k = k < 5
            if q < 5 or 8 <= q < 11:  # prompt and clean: the prompt and the clean stream
                allowed[q, k] = prompt_k or 8 <= k <= q
            elif q < 8:  # k0: prompt and itself
                allowed[q, k] = prompt_k or 5 <= k <= q
            else:  # k1: prompt, c0 and itself
                allowed[q, k] = prompt_k or 8 <= k < 11 or 11 <= k <= q
    gate = torch.tensor([[0.0] * 5 + [1.0] * 3 + [0.0] * 3 + [1.0] * 3])
    return prompt, k0, c0, k1, ids, pos, allowed, gate


def _mixed_forward(model, ids, pos, allowed, gate):
    with gated(model, gate):
        return model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]),
                     attention_mask=allowed[None, None]).logits[0]


@pytest.mark.parametrize("seed", range(3))
def test_packed_mixed_gate_equals_separate_forwards(seed):
    base, model = gated_tiny(seed)
    prompt, k0, c0, k1, ids, pos, allowed, gate = _packed(seed)
    got = _mixed_forward(model, ids, pos, allowed, gate)
    clean = base(torch.tensor([prompt + c0])).logits[0]  # the base on the clean text
    assert torch.allclose(got[:5], clean[:5], atol=1e-10) and torch.allclose(got[8:11], clean[5:], atol=1e-10)
    n = len(prompt)
    with gated(model, torch.tensor([[0.0] * n + [1.0] * 3])):  # k0 after the prompt, adapter on k0 only
        noisy0 = model(torch.tensor([prompt + k0])).logits[0]
    with gated(model, torch.tensor([[0.0] * (n + 3) + [1.0] * 3])):  # k1 after prompt + c0
        noisy1 = model(torch.tensor([prompt + c0 + k1])).logits[0]
    assert torch.allclose(got[5:8], noisy0[n:], atol=1e-10)
    assert torch.allclose(got[11:], noisy1[n + 3 :], atol=1e-10)


def test_gradients_reach_only_the_adapter_through_gate_one_positions():
    _, model = gated_tiny(3)
    model.train()
    attach_gate(model, enabled=True)
    prompt, k0, c0, k1, ids, pos, allowed, gate = _packed(3)
    logits = _mixed_forward(model, ids, pos, allowed, gate)
    logits[8:11].sum().backward(retain_graph=True)  # clean positions see only gate-0 positions
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None or not p.grad.any() for p in trainable.values())
    logits[5:8].sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in trainable.values())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_a_gated_adapter_needs_a_gate():
    _, model = gated_tiny(0)
    attach_gate(model, enabled=True)
    with pytest.raises(CllmError, match="without a gate"):
        model(torch.tensor([[3, 4, 5]]))
    with pytest.raises(CllmError, match="no gated adapter"):
        gated_decode(tiny_model(0), None, [3, 4, 5], max_new_tokens=4)
    assert is_gated(model) and not is_gated(tiny_model(0))


def test_accept_length_and_mask_by_hand():
    assert accept_length([5, 6, 7], [5, 6, 9]) == 2
    assert accept_length([5, 6], [4, 6]) == 0
    assert accept_length([5, 6], [5, 6]) == 2
    # head of 2, two branches of 2: [h0 h1 | a0 a1 | b0 b1]
    want = [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]]
    assert branch_mask(2, [2, 2]).int().tolist() == want
    # prompt lookup: the continuation of the most recent earlier match of the last bigram, else of the last token
    assert lookup_continuation([1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2], 3) == [4, 5, 7]
    assert lookup_continuation([5, 6, 7, 8, 6], 2) == [7, 8]
    assert lookup_continuation([5, 6, 7], 2) == []


@pytest.mark.parametrize("seed", range(4))
def test_equals_base_greedy_over_block_sizes_inputs_and_pools(seed):
    base, model = gated_tiny(seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = random_prompt(gen, 5 + seed)
    want = greedy_reference(base, prompt, 40)
    for n, draft_input, (G, N, K), k in itertools.product([2, 4, 9], ["guess", "mask"],
                                                           [(0, 4, 0), (3, 3, 0), (5, 2, 3), (0, 2, 6)], [1, 3]):
        opts = GatedOptions(block_size=n, draft_input=draft_input, pool_candidates=G, pool_ngram=N, lookup_tokens=K,
                            mask_token_id=2, draft_topk=k)
        got = gated_decode(model, None, prompt, opts, max_new_tokens=40, seed=seed, eos_token_id=[-1])
        assert got.token_ids == want, (n, draft_input, G, N, K, k)
        assert sum(got.accept_lengths) == 40 and got.n_forwards == len(got.accept_lengths)
        assert all(1 <= a <= max(n, K + 1, N) for a in got.accept_lengths)


def test_topk_branches_by_hand():
    """The draft's runners-up at the first guess position become branches [runner-up][rest of the guess] (one equal
    to the guess's first token is not repeated); a winning one commits its confirmed tokens, keeps their K/V and is
    counted apart; the next runners-up are those at the first position of the next guess."""
    from cllm.decoding.gated import GatedRun

    run = GatedRun([5, 6, 7], GatedOptions(block_size=4, pool_candidates=0, lookup_tokens=0, draft_topk=3))
    run.guess, run._alts = [10, 11, 12], [20, 10]
    ids, rel_pos, visible, n_draft = run.inputs()
    assert ids == [5, 6, 7, 10, 11, 12, 20, 11, 12, 10, 11, 12] and n_draft == 3
    assert rel_pos == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5]
    assert torch.equal(visible, branch_mask(3, [3, 3, 3]))
    # the base's next token is 20, then 11 after [20], then 30 after [20 11]; the draft's outputs 40 41 42
    pred = [0, 0, 20, 0, 0, 0, 11, 30, 0, 40, 41, 42]
    taken, reason, keep = run.apply(pred, set(), 100, [[50, 51], [52, 53], [54, 55]])
    assert taken == [20, 11, 30] and reason is None and keep == [0, 1, 2, 6, 7]
    assert run.guess[0] == 42 and run._alts == [54, 55]
    assert run.stats["tokens_from_topk"] == 2 and run.stats["pool_verified"] == 0
    assert run.stats["forward_rows"] == 12  # the forward's head, 3 branches of 3 and the draft copy
    # topk_tokens 1: each runner-up alone, one row; a right one commits itself and the base's token after it
    run = GatedRun([5, 6, 7], GatedOptions(block_size=4, pool_candidates=0, lookup_tokens=0, draft_topk=3,
                                           topk_tokens=1))
    run.guess, run._alts = [10, 11, 12], [20, 10]
    ids, rel_pos, visible, _ = run.inputs()
    assert ids == [5, 6, 7, 10, 11, 12, 20, 10, 11, 12] and rel_pos == [0, 1, 2, 3, 4, 5, 3, 3, 4, 5]
    assert torch.equal(visible, branch_mask(3, [3, 1, 3]))
    taken, _, keep = run.apply([0, 0, 20, 0, 0, 0, 11, 40, 41, 42], set(), 100, None)
    assert taken == [20, 11] and keep == [0, 1, 2, 6]
    with pytest.raises(CllmError, match="draft_topk"):
        GatedOptions(draft_topk=0).check()


@pytest.mark.parametrize("seed", range(2))
def test_topk_over_the_whole_vocabulary_commits_two_tokens_per_forward(seed):
    """With every token a runner-up, the base's next token after the last committed one is always on a branch:
    after a forward that did not take the whole guess, the next commits >= 2 tokens; the text is the base's."""
    base, model = gated_tiny(seed)
    prompt = random_prompt(torch.Generator().manual_seed(seed), 6)
    want = greedy_reference(base, prompt, 40)
    for n, k, m in [(3, 64, 0), (5, 64, 0), (5, 3, 0), (5, 64, 1)]:
        opts = GatedOptions(block_size=n, pool_candidates=0, lookup_tokens=0, draft_topk=k, topk_tokens=m)
        got = gated_decode(model, None, prompt, opts, max_new_tokens=40, seed=seed, eos_token_id=[-1])
        assert got.token_ids == want, (n, k)
        if k == 64:
            acc = got.accept_lengths
            assert all(b >= 2 for a, b in zip(acc[:-1], acc[1:-1]) if a < n), acc


def test_shared_below_forward_equals_the_full_one():
    """An adapter on the top layer only: the layer below runs the verify rows alone and the draft rows enter the
    top layer with their guess twins' states; every logit (verify and draft rows) as in the full forward, the
    layer below caches the verify rows only, and `SeqCache.keep` keeps one length per layer."""
    from cllm.decoding.common import SeqCache
    from cllm.decoding.gate import gate_state, shared_below
    from cllm.decoding.gated import GatedRun
    from cllm.decoding.lookahead import _forward

    _, model = gated_tiny(3, layers=[1])
    assert len(gate_state(model).below) == 1  # tiny_model has 2 decoder layers
    run = GatedRun(random_prompt(torch.Generator().manual_seed(3), 7), GatedOptions(block_size=5, lookup_tokens=3))
    ids, rel_pos, visible, n_draft = run.inputs()
    L = len(ids)
    gate = torch.zeros(1, L)
    gate[0, L - n_draft :] = 1.0
    seen = []
    hook = gate_state(model).below[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    out = {}
    for share in (False, True):
        cache = SeqCache(model)
        with gated(model, gate), shared_below(model, L - n_draft, run.draft_sources() if share else None) as on:
            out[share] = _forward(cache, ids, rel_pos, visible)  # (L, V)
        assert on == share
        assert [layer.keys.shape[-2] for layer in cache.cache.layers] == ([L - n_draft, L] if share else [L, L])
        cache.keep(list(range(4)))
        assert [layer.keys.shape[-2] for layer in cache.cache.layers] == [4, 4]
    hook.remove()
    assert seen == [L, L - n_draft]
    assert torch.allclose(out[True], out[False], atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_shared_below_decodes_as_the_full_forward(seed):
    """With the adapter on the top layer, gated decoding with and without the shared layers below commits the
    same tokens in the same forwards (float64), the base's greedy text."""
    base, model = gated_tiny(seed, layers=[1])
    prompt = random_prompt(torch.Generator().manual_seed(seed), 6)
    want = greedy_reference(base, prompt, 40)
    for n, K in [(2, 0), (4, 5), (8, 0)]:
        got = {share: gated_decode(model, None, prompt, GatedOptions(block_size=n, lookup_tokens=K, pool_candidates=1,
                                   share_below=share), max_new_tokens=40, seed=seed, eos_token_id=[-1])
               for share in (False, True)}
        assert got[True].token_ids == got[False].token_ids == want, (n, K)
        assert got[True].accept_lengths == got[False].accept_lengths, (n, K)


def test_forward_counts_where_determined_and_eos():
    base, model = gated_tiny(5)
    prompt = random_prompt(torch.Generator().manual_seed(5), 6)
    one = gated_decode(model, None, prompt, GatedOptions(block_size=8), max_new_tokens=1)
    assert one.n_forwards == 1 and one.token_ids == greedy_reference(base, prompt, 1)
    # A repeating base: greedy text that loops is found in the pool, which commits N-1 + 1 tokens per forward.
    want = greedy_reference(base, prompt, 30)
    eos = want[7]
    got = gated_decode(model, None, prompt, GatedOptions(block_size=4), max_new_tokens=30, eos_token_id=eos)
    assert got.token_ids == want[: want.index(eos) + 1] and got.finish_reason == "eos"


@pytest.mark.parametrize("draft_input", ["guess", "mask"])
def test_a_right_draft_commits_n_tokens_per_forward(draft_input):
    """An exact count: with the final norm's weight at zero every logit is 0, so the base's greedy text is all
    token 0 and so is every draft. The prefill commits 1 token (its random guess is wrong), then each forward
    accepts the n - 1 drafted zeros plus the base's next one."""
    base, model = gated_tiny(6)
    for m in (base, model):
        with torch.no_grad():
            m.get_decoder().norm.weight.zero_()
    prompt = random_prompt(torch.Generator().manual_seed(6), 6)
    n, T = 5, 21
    assert greedy_reference(base, prompt, T) == [0] * T
    got = gated_decode(model, None, prompt, GatedOptions(block_size=n, draft_input=draft_input, pool_candidates=0,
                       lookup_tokens=0), max_new_tokens=T)
    assert got.token_ids == [0] * T and got.accept_lengths == [1, 5, 5, 5, 5]


def tiny_trajectories(model_dir, tmp_path, a: int, b: int):
    """`cllm gen` trajectories (n = 4, 12 tokens) of 6 word prompts for the saved tiny model, in tmp_path / "t"."""
    import json

    from cllm.config import resolve
    from cllm.data.collect import generate
    from cllm.data.trajectories import GenConfig

    lines = [json.dumps({"prompt": " ".join(f"w{3 + (i * a + j * b) % 60}" for j in range(3 + i % 3))})
             for i in range(6)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    generate(resolve(GenConfig, {"model": str(model_dir), "prompts": str(tmp_path / "p.jsonl"),
                                 "out": str(tmp_path / "t"), "block_size": 4, "max_new_tokens": 12, "batch_size": 6,
                                 "repeat_threshold": 0}))
    return tmp_path / "t"


def test_gated_training_changes_only_the_draft_and_decodes_losslessly(tiny_model_dir, tmp_path):
    """A short gated run from `cllm gen` data: the adapter is saved unmerged with its gate file, `--adapter` loads
    it gated (every other method runs the base exactly), the probe logs gated tokens per forward, and gated
    decoding with it equals the base's greedy output; a resumed run continues from its checkpoint."""
    import json

    from cllm.config import resolve
    from cllm.decoding import registry
    from cllm.models import load_model
    from cllm.training.config import TrainConfig
    from cllm.training.run import train

    tiny_trajectories(tiny_model_dir, tmp_path, 13, 7)
    out = tmp_path / "g"
    cfg = dict(model=str(tiny_model_dir), data=[str(tmp_path / "t")], output_dir=str(out), block_size=4,
               objective="gated", use_peft=True, ar_weight=0.0, lora_r=4, max_steps=4, logging_steps=2,
               save_steps=2, learning_rate=1e-2, per_device_train_batch_size=2, jacobi_eval_steps=2)
    metrics = train(resolve(TrainConfig, cfg))
    assert metrics["train_loss"] > 0
    history = json.loads((out / "log_history.json").read_text())
    assert any("jacobi/tokens_per_forward" in h for h in history)
    meta = json.loads((out / "adapter" / "cllm_gate.json").read_text())
    assert meta["draft_input"] == "guess" and meta["block_size"] == 4
    assert not (out / "model.safetensors").exists()  # never merged

    base, tok = load_model(str(tiny_model_dir), dtype="fp32")
    model, _ = load_model(str(tiny_model_dir), dtype="fp32", adapter=str(out / "adapter"))
    assert is_gated(model)
    ids = torch.tensor([[5, 9, 14, 20, 7]])
    assert torch.equal(model(ids).logits, base(ids).logits)  # other methods: the base exactly
    cfg_d = registry.DecodeConfig(block_size=4, max_new_tokens=20)
    [want] = registry.decode("ar", base, tok, [[5, 9, 14, 20, 7]], [0], cfg_d)
    [got] = registry.decode("gated", model, tok, [[5, 9, 14, 20, 7]], [0], cfg_d)
    assert got.token_ids == want.token_ids
    # resume: two more steps from the last checkpoint
    train(resolve(TrainConfig, {**cfg, "max_steps": 6, "resume": True}))
    assert json.loads((out / "log_history.json").read_text())[-1]["step"] == 6


def test_on_policy_states_from_gated_decoding_train_the_draft(tiny_model_dir, tmp_path):
    """`cllm gen --decoder gated`: each response's blocks are consecutive, their fixed points are the base's greedy
    output, a kept block's state is the guess the gated decoder read at that offset, and the folder trains (block
    size = the guess width, noise window 1: each block's one state); bad --decoder settings are refused."""
    from cllm.config import resolve
    from cllm.data.collect import generate
    from cllm.data.trajectories import GenConfig, load_trajectories
    from cllm.decoding import registry
    from cllm.models import load_model
    from cllm.training.config import TrainConfig
    from cllm.training.objectives.jacobi_forcing import group_responses
    from cllm.training.run import train

    tiny_trajectories(tiny_model_dir, tmp_path, 13, 7)
    common = dict(model=str(tiny_model_dir), block_size=4, objective="gated", use_peft=True, ar_weight=0.0, lora_r=4,
                  max_steps=2, logging_steps=1, save_steps=2, learning_rate=1e-2, per_device_train_batch_size=2)
    train(resolve(TrainConfig, {**common, "data": [str(tmp_path / "t")], "output_dir": str(tmp_path / "g")}))
    adapter = str(tmp_path / "g" / "adapter")
    gen_cfg = {"model": str(tiny_model_dir), "adapter": adapter, "prompts": str(tmp_path / "p.jsonl"),
               "out": str(tmp_path / "on"), "block_size": 4, "max_new_tokens": 12, "batch_size": 4,
               "decoder": "gated:lookup_tokens=0:pool_candidates=1", "dtype": "fp64"}
    summary = generate(resolve(GenConfig, gen_cfg))
    assert summary["prompts_done"] == 6
    records = load_trajectories(tmp_path / "on")
    assert max(len(r["fixed_point"]) for r in records) == 3 and all(len(r["states"]) == 1 for r in records)
    base, tok = load_model(str(tiny_model_dir), dtype="fp64")
    model, _ = load_model(str(tiny_model_dir), dtype="fp64", adapter=adapter)
    cfg_d = registry.DecodeConfig(block_size=4, max_new_tokens=12, lookup_tokens=0, pool_candidates=1)
    for resp in group_responses(records):
        prompt = resp["prompt_ids"]
        [want] = registry.decode("ar", base, tok, [prompt], [0], cfg_d)
        assert [t for b in resp["blocks"] for t in b["fixed_point"]] == want.token_ids
        # the collector's seed: --seed (0) * 1_000_003 + the prompt's index
        [got] = registry.decode("gated", model, tok, [prompt], [resp["data_id"]], cfg_d)
        read = {g.start: g.states[0] for g in got.trajectory}
        offset = 0
        for b in resp["blocks"]:
            m = len(b["fixed_point"])
            assert b["states"][0] in (read.get(offset, [])[:m], b["fixed_point"])
            offset += m
    assert any(r["states"][0] != r["fixed_point"] for r in records)  # some guesses were wrong: something to train
    train(resolve(TrainConfig, {**common, "data": [str(tmp_path / "on")], "output_dir": str(tmp_path / "g2"),
                                "block_size": 3, "noise_window": 1, "init_adapter": adapter}))
    assert (tmp_path / "g2" / "adapter" / "cllm_gate.json").is_file()
    with pytest.raises(CllmError, match="--adapter"):
        resolve(GenConfig, {**gen_cfg, "adapter": None})
    with pytest.raises(CllmError, match="--decoder"):
        resolve(GenConfig, {**gen_cfg, "decoder": "lookahead"})


def test_gated_objective_refuses_what_cannot_train():
    from cllm.config import resolve
    from cllm.training.config import TrainConfig

    base = dict(data=["x"], output_dir="o", objective="gated")
    with pytest.raises(CllmError, match="--use-peft"):
        resolve(TrainConfig, base).validate()
    with pytest.raises(CllmError, match="--ar-weight 0"):
        resolve(TrainConfig, {**base, "use_peft": True}).validate()


def test_gated_under_deepspeed_two_processes_equals_one(tiny_model_dir, tmp_path):
    """The gated objective under DeepSpeed ZeRO-2 on 2 ranks (the gate reaches the LoRA layers through the engine)
    ends with the adapter of one process with the same global batch."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from cllm.config import resolve
    from cllm.data.collect import generate
    from cllm.data.trajectories import GenConfig
    from cllm.training.config import TrainConfig
    from cllm.training.run import train

    repo = Path(__file__).resolve().parents[1]
    lines = [json.dumps({"prompt": f"w{3 + i} w{9 + 2 * i} w{20 + i}"}) for i in range(4)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    generate(resolve(GenConfig, {"model": str(tiny_model_dir), "prompts": str(tmp_path / "p.jsonl"),
                                 "out": str(tmp_path / "t"), "block_size": 4, "max_new_tokens": 8, "batch_size": 4,
                                 "repeat_threshold": 0}))
    flags = ["--model", str(tiny_model_dir), "--data", str(tmp_path / "t"), "--block-size", "4", "--max-steps", "2",
             "--save-steps", "2", "--learning-rate", "1e-2", "--objective", "gated", "--use-peft", "--ar-weight", "0",
             "--lora-r", "4", "--lora-dropout", "0", "--optim", "sgd", "--noise-window", "2"]
    # SGD (Trainer's optimizer handed to DeepSpeed): unlike Adam it shows a wrong gradient scale
    ds_cfg = json.loads((repo / "configs" / "deepspeed" / "zero2.json").read_text())
    del ds_cfg["optimizer"]
    ds_cfg["zero_allow_untested_optimizer"] = True
    (tmp_path / "zero2_sgd.json").write_text(json.dumps(ds_cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           "29563", str(repo / "train" / "train_cllm.py"), *flags, "--output-dir",
                           str(tmp_path / "ds"), "--deepspeed", str(tmp_path / "zero2_sgd.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    cfg = dict(model=str(tiny_model_dir), data=[str(tmp_path / "t")], output_dir=str(tmp_path / "one"),
               block_size=4, max_steps=2, save_steps=2, learning_rate=1e-2, objective="gated", use_peft=True,
               ar_weight=0.0, lora_r=4, lora_dropout=0.0, optim="sgd", per_device_train_batch_size=2, noise_window=2)
    train(resolve(TrainConfig, cfg))
    ds = load_file(str(tmp_path / "ds" / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert ds.keys() == one.keys() and any(v.abs().sum() > 0 for k, v in ds.items() if "lora_B" in k)
    for k in ds:
        assert torch.allclose(ds[k], one[k], rtol=0, atol=2e-6), (k, (ds[k] - one[k]).abs().max())


def _save_gated_adapter(model_dir, out, seed: int = 7, draft_input: str = "guess"):
    """A gated adapter for the saved tiny model, its LoRA B weights random (as a trained one's would be)."""
    import json

    from peft import LoraConfig, get_peft_model

    from cllm.models import load_model

    model, _ = load_model(str(model_dir), "fp32")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(out))
    (out / "cllm_gate.json").write_text(json.dumps({"draft_input": draft_input, "mask_token_id": 2,
                                                    "block_size": 4}))
    return out


def test_decode_command_compares_gated_with_the_base(tiny_model_dir, tmp_path, capsys):
    """The issue's command on the tiny model: --adapter of a gated adapter, --method gated, --compare ar,lookahead:
    every method's output is the base's greedy output, the report says so."""
    import json

    from cllm.cli import main

    adapter = _save_gated_adapter(tiny_model_dir, tmp_path / "gated")
    code = main(["decode", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "w3 w4 w5",
                 "--prompt", "w9 w30", "--method", "gated", "--compare", "ar,lookahead,gated:draft_input=mask",
                 "--block-size", "4", "--max-new-tokens", "24", "--dtype", "fp32", "--report",
                 str(tmp_path / "r.json")])
    assert code == 0
    methods = json.loads((tmp_path / "r.json").read_text())["methods"]
    assert set(methods) == {"gated", "ar", "lookahead", "gated:draft_input=mask"}
    assert all(methods[m]["exact_match_ar"] == 1.0 for m in methods if m != "ar")
    assert 0 < methods["gated"]["forwards"] <= methods["gated"]["new_tokens"] == methods["ar"]["new_tokens"]
    from cllm.decoding import registry
    from cllm.models import load_model

    base, tok = load_model(str(tiny_model_dir), "fp32")
    gated_model, _ = load_model(str(tiny_model_dir), "fp32", adapter=str(adapter))
    cfg = registry.DecodeConfig(block_size=4, max_new_tokens=24)
    from cllm.data.prompts import format_prompt

    for p in ("w3 w4 w5", "w9 w30"):
        ids = format_prompt(tok, p)
        want = registry.decode("ar", base, tok, [ids], [0], cfg)[0].token_ids
        for method in ("gated", "gated:draft_input=mask", "lookahead", "ar"):
            assert registry.decode(method, gated_model, tok, [ids], [0], cfg)[0].token_ids == want, method


def test_serve_streams_gated_decoding(tiny_model_dir, tmp_path):
    """`cllm serve --adapter GATED --method gated`: streamed per commit, text equal to the base's AR decode."""
    import threading
    import time

    import openai
    import uvicorn

    from cllm.data.prompts import format_prompt
    from cllm.decoding import registry
    from cllm.serve import build_app, load_engine
    from test_serve import _free_port

    adapter = _save_gated_adapter(tiny_model_dir, tmp_path / "gated")
    cfg = registry.DecodeConfig(block_size=4, max_new_tokens=16)
    engine = load_engine(model=str(tiny_model_dir), adapter=str(adapter), draft=None, method="gated", dtype="fp32",
                         device="cpu", cfg=cfg)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        base = engine.model
        want = registry.decode("ar", base, engine.tok, [format_prompt(engine.tok, "w3 w4 w5")], [0],
                               cfg)[0].text
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "w3 w4 w5"}], max_tokens=16, stream=True)
            if ch.choices and ch.choices[0].delta.content]
        assert "".join(pieces) == want and len(pieces) > 1
    finally:
        srv.should_exit = True


def test_lora_layers_puts_the_adapter_on_the_chosen_layers_only(tiny_model_dir):
    from cllm.config import resolve
    from cllm.training.config import TrainConfig
    from cllm.training.run import build_model

    base = dict(model=str(tiny_model_dir), data=["x"], output_dir="o", objective="gated", use_peft=True,
                ar_weight=0.0, lora_r=2)
    model, _ = build_model(resolve(TrainConfig, {**base, "lora_layers": "top:1"}))
    n = model.config.num_hidden_layers
    assert n >= 2
    wrapped = {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert wrapped == {str(n - 1)}
    model, _ = build_model(resolve(TrainConfig, {**base, "lora_layers": "0"}))
    assert {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_A" in name} == {"0"}
    for bad, msg in (("top:0", "top:K"), ("first", "top:K"), (f"top:{n + 1}", f"has {n} layers")):
        with pytest.raises(CllmError, match=msg):
            build_model(resolve(TrainConfig, {**base, "lora_layers": bad}))


def test_sample_accept_draws_every_token_from_the_base_distribution():
    """Speculative sampling over a token tree of deterministic branches: the first token is distributed as the
    base's p at the root whatever the branches propose, and each next one as p given the tokens before it."""
    from cllm.decoding.gated import sample_accept

    branches = [[0, 1], [0, 2], [3]]  # two share their first token; the tree is {0: {1, 2}, 3}
    table = {(): [0.4, 0.1, 0.2, 0.3], (0,): [0.1, 0.5, 0.2, 0.2], (3,): [0.25, 0.25, 0.25, 0.25],
             (0, 1): [0.7, 0.1, 0.1, 0.1], (0, 2): [0.1, 0.1, 0.1, 0.7]}
    seen = []

    def dist(k, i):
        prefix = tuple(branches[k][:i])
        seen.append(prefix)
        return torch.tensor(table[prefix], dtype=torch.float64)

    gen, N = torch.Generator().manual_seed(0), 20000
    counts = {}
    for _ in range(N):
        k, n, nxt = sample_accept(branches, dist, gen)
        text = tuple(branches[k][:n]) + (nxt,)
        for j in range(1, len(text) + 1):
            counts[text[:j]] = counts.get(text[:j], 0) + 1
    assert set(seen) == set(table)  # every node of the tree was reached
    for prefix, p in table.items():
        # after each of these prefixes the draw always goes on (a token reached as a branch's is accepted, never
        # drawn last), so the next token's frequency estimates p given the prefix
        total = counts.get(prefix, 0) if prefix else N
        for tok, want in enumerate(p):
            got = counts.get(prefix + (tok,), 0) / total
            assert abs(got - want) < 0.03, (prefix, tok, got, want)
    assert counts[(1,)] / N == pytest.approx(0.1, abs=0.015) and (1, 0) not in counts  # drawn last: nothing after


def test_sampling_at_top_k_1_is_the_greedy_decode():
    """top_k = 1 leaves one token with probability 1: sampling must then commit exactly what greedy commits, in
    the same forwards (solo and under continuous batching)."""
    from cllm.decoding.continuous import Row
    from test_continuous import EOS, _run

    base, model = gated_tiny(1)
    gen = torch.Generator().manual_seed(1)
    prompt = random_prompt(gen, 6)
    greedy = GatedOptions(block_size=4, pool_candidates=2, lookup_tokens=3, draft_topk=2)
    sampled = dataclasses.replace(greedy, temperature=0.7, top_k=1)
    want = gated_decode(model, None, prompt, greedy, max_new_tokens=30, seed=3, eos_token_id=[-1])
    got = gated_decode(model, None, prompt, sampled, max_new_tokens=30, seed=3, eos_token_id=[-1])
    assert got.token_ids == want.token_ids == greedy_reference(base, prompt, 30)
    assert got.accept_lengths == want.accept_lengths
    row = Row(method="gated", prompt=prompt, max_new_tokens=20, seed=3, options=sampled)
    _run(model, {0: [row]})
    solo = gated_decode(model, None, prompt, sampled, max_new_tokens=20, seed=3, eos_token_id=EOS)
    assert row.generated == solo.token_ids


def test_sampled_gated_decoding_draws_the_base_distribution():
    """Temperature 1 on a tiny model whose LM head favours tokens 3 and 4 (a bias, so the branches drawn from
    the prompt and the draft are often right): the third token's frequency over many seeds matches the base's
    exact marginal (every continuation of two tokens in one batched forward), with forwards that accept branch
    tokens often enough for the speculative rule to matter."""
    base, model = gated_tiny(0)
    for m in (base, model):  # the same head for the base and the gated copy (gate 0 = the base)
        lm = m.get_output_embeddings()
        with torch.no_grad():
            lm.weight.mul_(0.3)
        lm.bias = torch.nn.Parameter(torch.zeros(VOCAB, dtype=lm.weight.dtype).index_fill_(0, torch.tensor([3]), 3.0)
                                     .index_fill_(0, torch.tensor([4]), 2.5))
    prompt = [3, 4, 3, 3, 4, 3, 9]
    with torch.no_grad():
        p1 = base(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # (V,)
        two = torch.tensor([prompt + [a] for a in range(VOCAB)])  # (V, P + 1)
        p2 = base(two).logits[:, -1].softmax(-1)  # (V, V): p(t2 | t1)
        three = torch.tensor([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)])  # (V * V, P + 2)
        p3 = base(three).logits[:, -1].softmax(-1).view(VOCAB, VOCAB, VOCAB)  # p(t3 | t1, t2)
    exact = torch.einsum("a,ab,abc->c", p1, p2, p3)  # (V,): the third token's marginal
    opts = GatedOptions(block_size=4, pool_candidates=2, pool_ngram=3, lookup_tokens=3, temperature=1.0)
    N, counts, multi = 2000, torch.zeros(VOCAB, dtype=torch.float64), 0
    for seed in range(N):
        got = gated_decode(model, None, prompt, opts, max_new_tokens=3, seed=seed, eos_token_id=[-1])
        counts[got.token_ids[2]] += 1
        multi += any(a > 1 for a in got.accept_lengths)
    # the favoured tokens and the rest as three buckets (64 single tokens would need far more draws): each
    # frequency within 3.5 standard deviations of its exact probability
    rest = 1 - exact[3] - exact[4]
    for got, want in [(counts[3], exact[3]), (counts[4], exact[4]), (N - counts[3] - counts[4], rest)]:
        got, want = float(got) / N, float(want)
        assert abs(got - want) < 3.5 * (want * (1 - want) / N) ** 0.5, (got, want)
    assert multi > N // 5, multi  # the rule was exercised, not only the residual draw
