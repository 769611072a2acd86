"""The gated draft's sampler head (`cllm.decoding.sampler_head`): an untrained head is the draft itself (same
guesses, same forwards), any head keeps the output the base's greedy output, the decoder hands it the draft row
where the committed token stands, and the gated objective trains, saves, resumes, exports and loads it."""

from __future__ import annotations

import copy

import pytest
import torch

from cllm.decoding.gated import GatedOptions, GatedRun, branch_mask, gated_decode
from cllm.decoding.sampler_head import (Reads, SamplerHead, head_logits, load_sampler, new_sampler, redraft,
                                       sampler_of, save_sampler)
from cllm.errors import CllmError
from conftest import random_prompt, tiny_model, with_random_gated_adapter
from test_gated import tiny_trajectories
from test_jacobi import greedy_reference


def _gated(seed: int):
    base = tiny_model(seed, torch.float64)
    return base, with_random_gated_adapter(copy.deepcopy(base), seed, 4, None)


def test_an_untrained_head_predicts_what_the_draft_row_does():
    _, model = _gated(0)
    head = new_sampler(model)
    h = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    got = head_logits(model, head, h, torch.tensor([4, 9, 1]))
    assert torch.equal(got, model.get_output_embeddings()(h))
    torch.nn.init.normal_(head.down.weight)
    assert not torch.allclose(head_logits(model, head, h, torch.tensor([4, 9, 1])), got)


@pytest.mark.parametrize("seed", range(3))
def test_untrained_head_decodes_as_the_draft_and_any_head_as_the_base(seed):
    """Zero head: the same guesses as the draft's own, so the same forwards (this fails if the head reads the
    wrong draft rows); a random head: other guesses, the base's greedy output still, over block sizes, pools and
    how many tokens the head redrafts."""
    base, model = _gated(seed)
    prompt = random_prompt(torch.Generator().manual_seed(seed), 6)
    want = greedy_reference(base, prompt, 40)
    opts = [GatedOptions(block_size=n, pool_candidates=G, lookup_tokens=K, sampler_tokens=s, draft_topk=k,
                         sampler_candidates=c, topk_tokens=m)
            for n, G, K, s, k, c, m in [(5, 0, 0, -1, 1, 0, 0), (3, 2, 0, 1, 1, 0, 0), (9, 0, 4, 2, 3, 0, 0),
                                        (5, 0, 0, -1, 2, 0, 0), (5, 0, 0, -1, 1, 4, 0), (9, 0, 4, -1, 3, 3, 0),
                                        (9, 0, 0, -1, 4, 0, 3), (5, 2, 0, -1, 3, 4, 1)]]
    own = [gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1]) for o in opts]
    head = new_sampler(model)
    for o, ref in zip(opts, own):
        got = gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1])
        assert got.token_ids == want and got.accept_lengths == ref.accept_lengths, o
    torch.nn.init.normal_(head.down.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    for o in opts:
        got = gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1])
        assert got.token_ids == want, o
    off = gated_decode(model, None, prompt, GatedOptions(block_size=5, pool_candidates=0, lookup_tokens=0,
                                                         sampler_tokens=0), max_new_tokens=40, eos_token_id=[-1])
    assert off.accept_lengths == own[0].accept_lengths  # sampler_tokens=0: the draft's own guesses
    with pytest.raises(CllmError, match="sampler_tokens"):
        GatedOptions(sampler_tokens=-2).check()
    with pytest.raises(CllmError, match="sampler_candidates"):
        GatedOptions(sampler_candidates=-1).check()


def test_a_head_reading_the_base_decodes_as_the_base():
    """A `base_input` head: untrained, the draft's own forwards; random, other guesses and the base's greedy output
    (over block sizes, pools, the first token only, runners-up continued by the head)."""
    base, model = _gated(4)
    prompt = random_prompt(torch.Generator().manual_seed(4), 6)
    want = greedy_reference(base, prompt, 40)
    opts = [GatedOptions(block_size=n, pool_candidates=G, lookup_tokens=K, sampler_tokens=s, draft_topk=k,
                         topk_tokens=m)
            for n, G, K, s, k, m in [(5, 0, 0, -1, 1, 0), (4, 2, 3, 1, 1, 0), (6, 1, 0, -1, 3, 2), (4, 0, 2, -1, 3, 1)]]
    own = [gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1]) for o in opts]
    head = new_sampler(model, base_input=True)
    for o, ref in zip(opts, own):
        assert gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1]).accept_lengths == \
            ref.accept_lengths, o
    torch.nn.init.normal_(head.down.weight, std=0.5, generator=torch.Generator().manual_seed(4))
    got = [gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1]) for o in opts]
    assert all(g.token_ids == want for g in got)
    assert any(g.accept_lengths != r.accept_lengths for g, r in zip(got, own))


def test_the_head_redrafts_from_the_committed_token_by_hand():
    """After a forward that accepts 1 guess token, the head is asked for draft row 1 (where the base's next token
    now stands) with that token, for the 2 guess tokens the draft had left; its tokens replace theirs."""
    run = GatedRun([5, 6, 7], GatedOptions(block_size=4, pool_candidates=0, lookup_tokens=0))
    run.guess = [10, 11, 12]
    ids, _, _, n_draft = run.inputs()
    assert ids == [5, 6, 7, 10, 11, 12, 10, 11, 12] and n_draft == 3
    pred = [0, 0, 10, 30, 0, 0, 40, 41, 42]  # base: 10 then 30 (not 11); draft: 40 41 42
    calls = []

    def drafter(row, token, count, base_row):
        calls.append((row, token, count, base_row))
        return [70, 71][:count], [80]

    # the base's hidden state that predicted 30 is that of input row 3 (the accepted guess token 10)
    taken, reason, keep = run.apply(pred, set(), 100, None, drafter)
    assert taken == [10, 30] and keep == [0, 1, 2, 3] and calls == [(1, 30, 2, 3)]
    assert run.guess == [70, 71, 71] and run._alts == [80]  # filled on with the last token (empty pool)
    # a drafter that redrafts fewer tokens leaves the draft's own after them
    calls[:] = []
    run.guess, run._alts = [10, 11, 12], []
    assert run.inputs()[0] == [30, 10, 11, 12, 10, 11, 12]
    run.apply([99, 0, 0, 0, 40, 41, 42], set(), 100, None,
              lambda r, t, c, b: calls.append((r, t, c, b)) or ([77], []))
    assert run.guess[:3] == [77, 41, 42] and calls == [(0, 99, 3, 0)]  # nothing accepted: the head's last row
    # a pooled branch wins: its last accepted row predicted the committed token
    run = GatedRun([5, 6, 7, 8, 5, 6, 7], GatedOptions(block_size=4, pool_candidates=1, pool_ngram=3,
                                                       lookup_tokens=0))
    run.guess = [10, 11, 12]
    ids, _, _, _ = run.inputs()
    assert ids == [5, 6, 7, 8, 5, 6, 7, 10, 11, 12, 8, 5, 10, 11, 12]  # rows 10-11: the n-gram after 7
    pred = [0] * 6 + [8, 0, 0, 0, 5, 55, 40, 41, 42]  # the base: 8, 5, then 55
    calls[:] = []
    taken, _, _ = run.apply(pred, set(), 100, None, lambda r, t, c, b: calls.append((r, t, c, b)) or ([], []))
    assert taken == [8, 5, 55] and calls == [(2, 55, 1, 11)]


def test_runner_up_branches_continue_with_the_head_by_hand():
    """With draft_topk, the head's runners-up for the next guess's first token become branches continued by the
    head's own tokens after each (draft row 2 stands where the runner-up would be), cut to topk_tokens rows; a
    runner-up equal to the guess's first token is not repeated."""
    calls = []

    def drafter(row, token, count, base_row):
        calls.append((row, token, count))
        assert (base_row is None) == (row == 2)  # a runner-up's tail chains on the head's first z
        if row == 1:
            return [70, 71, 72][:count], [80, 70, 81]
        return [token + 100, token + 200][:count], [99]

    for m, tails in [(0, {80: [180, 280], 81: [181, 281]}), (2, {80: [180], 81: [181]}), (1, {})]:
        run = GatedRun([5, 6, 7], GatedOptions(block_size=5, pool_candidates=0, lookup_tokens=0, draft_topk=4,
                                               topk_tokens=m))
        run.guess, calls[:] = [10, 11, 12, 13], []
        run.inputs()
        pred = [0, 0, 10, 30, 0, 0, 0, 40, 41, 42, 43]  # base: 10 then 30 (not 11): one guess token accepted
        taken, _, _ = run.apply(pred, set(), 100, None, drafter)
        assert taken == [10, 30] and run.guess == [70, 71, 72, 72] and run._tails == {a: t for a, t in tails.items()}
        assert calls[0] == (1, 30, 3) and sorted(calls[1:]) == sorted((2, a, len(t)) for a, t in tails.items())
        ids, rel_pos, visible, _ = run.inputs()
        width = m or 4
        want = [[a, *tails.get(a, []), *run.guess[1 + len(tails.get(a, [])) :]][:width] for a in (80, 81)]
        assert ids == [30, 70, 71, 72, 72, *want[0], *want[1], 70, 71, 72, 72], m
        assert rel_pos == [0, 1, 2, 3, 4, *range(1, 1 + width), *range(1, 1 + width), 1, 2, 3, 4]
        assert torch.equal(visible, branch_mask(1, [4, width, width, 4]))
    with pytest.raises(CllmError, match="topk_tokens"):
        GatedOptions(topk_tokens=-1).check()


def test_a_head_reading_the_base_chains_on_its_own_state_by_hand(tmp_path):
    """A `base_input` head: z = h + down(SiLU(up([h; e; f]))); the first redrafted token reads the base's hidden
    state given, each next one the z before it; it needs f; its kind survives save and load."""
    _, model = _gated(1)
    head = new_sampler(model, base_input=True)
    d = model.config.hidden_size
    assert head.base_input and head.up.weight.shape == (2 * d, 3 * d) and not new_sampler(model).base_input
    head = new_sampler(model, base_input=True)
    torch.nn.init.normal_(head.down.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    h, f = (torch.randn(n, d, dtype=torch.float64, generator=gen) for n in (3, 1))
    emb = model.get_input_embeddings()
    tokens, _, z0 = redraft(model, head, h, 7, 3, reads=Reads(base=f[0]))
    want, tok, prev = [], 7, f[0]
    for j in range(3):
        e = emb(torch.tensor(tok))
        z = h[j] + head.down(torch.nn.functional.silu(head.up(torch.cat([h[j], e, prev]))))
        tok, prev = int(model.get_output_embeddings()(z).argmax()), z
        want.append(tok)
        if j == 0:
            assert torch.allclose(z0, z)
    assert tokens == want
    t = torch.tensor(7)
    assert not torch.allclose(head_logits(model, head, h[0], t, base=f[0]), head_logits(model, head, h[0], t, base=-f[0]))
    with pytest.raises(ValueError, match="pass f"):
        head(h[0], emb(t))
    save_sampler(model, tmp_path)
    _, other = _gated(1)
    loaded = load_sampler(other, tmp_path)
    assert loaded.base_input and torch.equal(loaded.up.weight, head.up.weight)


def test_redraft_chains_each_token_on_the_one_before():
    _, model = _gated(1)
    head = new_sampler(model)
    torch.nn.init.normal_(head.down.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    h = torch.randn(3, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    tokens, alts, _ = redraft(model, head, h, 7, 3, topk=3)
    want, tok = [], 7
    for j in range(3):
        logits = head_logits(model, head, h[j], torch.tensor(tok))
        if j == 0:
            assert alts == logits.topk(3).indices[1:].tolist()
        tok = int(logits.argmax())
        want.append(tok)
    assert tokens == want
    # over candidates: the best of each row's own candidates (here the head's top 2 of row 0 and anything else)
    cand = torch.stack([head_logits(model, head, h[0], torch.tensor(7)).topk(2).indices, torch.tensor([5, 9]),
                        torch.tensor([want[2], 3])])  # (3, K = 2)
    tokens, alts, _ = redraft(model, head, h, 7, 3, topk=2, candidates=cand)
    assert tokens[0] == want[0] and alts == [int(cand[0, 1])] and tokens[1] in (5, 9) and tokens[2] in (want[2], 3)


@pytest.mark.parametrize("base_input", [False, True])
def test_continuous_batching_with_a_head_equals_the_solo_decode(base_input):
    """Gated rows with a sampler head (each row's head reads its own rows of the shared forward) join a batch
    beside an AR row; each gets what it gets alone."""
    from cllm.decoding.continuous import Row
    from test_continuous import EOS, _run

    _, model = _gated(2)
    head = new_sampler(model, base_input=base_input)
    torch.nn.init.normal_(head.down.weight, std=0.5, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(5)
    opts = [GatedOptions(block_size=4, pool_candidates=1, lookup_tokens=3),
            GatedOptions(block_size=6, pool_candidates=0, lookup_tokens=0, sampler_tokens=2, draft_topk=3)]
    rows = [Row(method="gated", prompt=random_prompt(gen, 4 + 3 * i), max_new_tokens=12 + 4 * i, seed=i, options=o)
            for i, o in enumerate(opts)] + [Row(method="ar", prompt=random_prompt(gen, 5), max_new_tokens=10)]
    _run(model, {0: [rows[0], rows[2]], 3: [rows[1]]})
    for row in rows[:2]:
        solo = gated_decode(model, None, row.prompt, row.options, max_new_tokens=row.max_new_tokens, seed=row.seed,
                            eos_token_id=EOS)
        assert row.generated == solo.token_ids and row.n_forwards == solo.n_forwards


def test_sampler_head_sizes_and_lookup():
    _, model = _gated(0)
    assert sampler_of(model) is None
    head = new_sampler(model)
    assert sampler_of(model) is head and isinstance(head, SamplerHead)
    d = model.config.hidden_size
    assert head.up.weight.shape == (2 * d, 2 * d) and head.down.weight.shape == (d, 2 * d)


def test_gated_training_of_the_head_alone_saves_resumes_exports_and_loads(tiny_model_dir, tmp_path):
    """A gated adapter trained 4 steps, then its sampler head alone on it (the adapter frozen): the head is saved
    beside the adapter and in every checkpoint, the adapter's weights stay those of --init-adapter, the head's
    loss and agreement are logged, a resumed run continues from the checkpoint's head, `export-adapter` keeps the
    head (bf16) and `--adapter` loads it; decoding with it is the base's greedy output."""
    import json

    from safetensors.torch import load_file

    from cllm.config import resolve
    from cllm.decoding import registry
    from cllm.decoding.sampler_head import SAMPLER_FILE
    from cllm.models import export_adapter, load_model
    from cllm.training.config import TrainConfig
    from cllm.training.run import train

    tiny_trajectories(tiny_model_dir, tmp_path, 11, 5)
    common = dict(model=str(tiny_model_dir), data=[str(tmp_path / "t")], block_size=4, objective="gated",
                  use_peft=True, ar_weight=0.0, lora_r=4, logging_steps=2, save_steps=2, learning_rate=1e-2,
                  per_device_train_batch_size=2)
    train(resolve(TrainConfig, {**common, "output_dir": str(tmp_path / "g"), "max_steps": 4}))
    adapter = tmp_path / "g" / "adapter"
    assert not (adapter / SAMPLER_FILE).exists()
    out = tmp_path / "s"
    cfg = {**common, "output_dir": str(out), "max_steps": 4, "init_adapter": str(adapter), "sampler_head": True,
           "train_adapter": False, "jacobi_eval_steps": 2}
    train(resolve(TrainConfig, cfg))
    assert (out / "adapter" / SAMPLER_FILE).is_file() and (out / "checkpoint-2" / SAMPLER_FILE).is_file()
    before, after = load_file(str(adapter / "adapter_model.safetensors")), \
        load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    head2, head4 = (load_file(str(out / d / SAMPLER_FILE)) for d in ("checkpoint-2", "adapter"))
    assert head4["down.weight"].abs().sum() > 0 and not torch.equal(head2["down.weight"], head4["down.weight"])
    history = json.loads((out / "log_history.json").read_text())
    logged = [h for h in history if "loss/sampler" in h]
    assert logged and all(0 <= h["sampler/agree"] <= 1 and 0 <= h["draft/agree"] <= 1 for h in logged)
    (out / "adapter" / SAMPLER_FILE).unlink()
    train(resolve(TrainConfig, {**cfg, "resume": True}))  # nothing left to train: the checkpoint's head is saved
    assert torch.equal(load_file(str(out / "adapter" / SAMPLER_FILE))["down.weight"], head4["down.weight"])
    train(resolve(TrainConfig, {**cfg, "max_steps": 6, "resume": True}))
    assert json.loads((out / "log_history.json").read_text())[-1]["step"] == 6

    info = export_adapter(out / "adapter", tmp_path / "pub")
    pub = load_file(str(tmp_path / "pub" / SAMPLER_FILE))
    assert pub["down.weight"].dtype == torch.bfloat16 and info["bytes"] > (tmp_path / "pub" / SAMPLER_FILE).stat().st_size
    base, tok = load_model(str(tiny_model_dir), dtype="fp32")
    model, _ = load_model(str(tiny_model_dir), dtype="fp32", adapter=str(tmp_path / "pub"))
    assert sampler_of(model) is not None and sampler_of(model).down.weight.dtype == torch.float32
    cfg_d = registry.DecodeConfig(block_size=4, max_new_tokens=20)
    [want] = registry.decode("ar", base, tok, [[5, 9, 14, 20, 7]], [0], cfg_d)
    [got] = registry.decode("gated", model, tok, [[5, 9, 14, 20, 7]], [0], cfg_d)
    assert got.token_ids == want.token_ids


def test_sampler_options_are_checked():
    from cllm.config import resolve
    from cllm.training.config import TrainConfig

    base = dict(data=["x"], output_dir="o", objective="gated", use_peft=True, ar_weight=0.0)
    with pytest.raises(CllmError, match="--init-adapter"):
        resolve(TrainConfig, {**base, "train_adapter": False, "sampler_head": True}).validate()
    with pytest.raises(CllmError, match="objective gated"):
        resolve(TrainConfig, dict(data=["x"], output_dir="o", sampler_head=True)).validate()
    with pytest.raises(CllmError, match="sampler-weight"):
        resolve(TrainConfig, {**base, "sampler_head": True, "sampler_weight": -1.0}).validate()
    with pytest.raises(CllmError, match="add --sampler-head"):
        resolve(TrainConfig, {**base, "sampler_base": True}).validate()


def test_training_a_head_that_reads_the_base(tiny_model_dir, tmp_path):
    """--sampler-base trains a head that reads the base's hidden state (the trainer hands it f: the head raises
    without); it is saved as such, loads as such, decodes as the base, and an --init-adapter head of the other kind is an
    error naming the flag."""
    from safetensors.torch import load_file

    from cllm.config import resolve
    from cllm.decoding.sampler_head import SAMPLER_FILE
    from cllm.models import load_model
    from cllm.training.config import TrainConfig
    from cllm.training.run import train

    tiny_trajectories(tiny_model_dir, tmp_path, 11, 5)
    common = dict(model=str(tiny_model_dir), data=[str(tmp_path / "t")], block_size=4, objective="gated",
                  use_peft=True, ar_weight=0.0, lora_r=4, logging_steps=2, save_steps=10, learning_rate=1e-2,
                  per_device_train_batch_size=2, max_steps=3, sampler_head=True)
    train(resolve(TrainConfig, {**common, "output_dir": str(tmp_path / "g"), "sampler_base": True}))
    state = load_file(str(tmp_path / "g" / "adapter" / SAMPLER_FILE))
    d = state["down.weight"].shape[0]
    assert state["up.weight"].shape[1] == 3 * d and state["down.weight"].abs().sum() > 0
    base, tok = load_model(str(tiny_model_dir), dtype="fp32")
    model, _ = load_model(str(tiny_model_dir), dtype="fp32", adapter=str(tmp_path / "g" / "adapter"))
    assert sampler_of(model).base_input
    prompt = [5, 9, 14, 20, 7]
    got = gated_decode(model, tok, prompt, GatedOptions(block_size=4), max_new_tokens=20, eos_token_id=[-1])
    assert got.token_ids == greedy_reference(base, prompt, 20)
    with pytest.raises(CllmError, match="--sampler-base true"):
        train(resolve(TrainConfig, {**common, "output_dir": str(tmp_path / "h"),
                                    "init_adapter": str(tmp_path / "g" / "adapter"), "train_adapter": False}))


def test_the_head_reads_the_clean_row_that_predicted_its_token_in_a_packed_batch():
    """In `[prompt][k_0][c_0][k_1][c_1]` the row before c_j[0] is k_j's last (noisy, gate 1); the base row that
    predicted c_j[0] is the prompt's last row (j = 0) or c_{j-1}'s last. A pair at t = 0 (the state's first token
    wrong: the decoder's case when a forward commits one token) must read that row, as the decoder does."""
    from cllm.training.losses import sampler_pairs
    from cllm.training.objectives.gated import GatedCollator

    ex = {"prompt_ids": [5, 6, 7], "fixed_points": [[10, 11, 12], [13, 14, 15]], "states": [[1, 2, 3], [2, 14, 3]]}
    batch = GatedCollator(pad_token_id=0, block_size=3)([ex])
    # packed: prompt 0-2, k_0 3-5, c_0 6-8, k_1 9-11, c_1 12-14
    hidden = torch.arange(15, dtype=torch.float64).view(1, 15, 1)  # (B, T, d = 1): a row's hidden state is its index
    _, tokens, base = sampler_pairs(hidden, batch)
    counted = batch["block_mask"][0]
    teacher = batch["cons_teacher_idx"][0][counted].tolist()
    got = dict(zip(teacher, base[0, counted, 0].long().tolist()))
    assert teacher[0] == 6 and got[6] == 2  # c_0[0]: the prompt's last row, not k_0's last (5)
    assert got[7] == 6 and 12 in got and got[12] == 8  # c_1[0]: c_0's last row, not k_1's last (11)
    assert tokens[0, counted].tolist()[: 2] == [10, 11]


def test_an_attending_head_reads_in_training_what_decoding_reads():
    """An attending head (`attn_heads`) in training attends, at a pair of teacher position c, over the clean
    stream's rows up to c (prompt and clean blocks, each token with the base row that predicted it); decoding builds
    the same keys one commit at a time (`HeadContext`). Both give the same attention output at every pair."""
    from cllm.decoding.sampler_head import HeadContext, _chain_attention, packed_attention
    from cllm.training.losses import sampler_context, sampler_pairs
    from cllm.training.objectives.gated import GatedCollator

    _, model = _gated(7)
    head = new_sampler(model, base_input=True, attn_heads=2)
    gen = torch.Generator().manual_seed(7)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=gen)
    ex = {"prompt_ids": [5, 6, 7, 8], "fixed_points": [[10, 11, 12], [13, 14, 15]], "states": [[1, 2, 3], [2, 14, 3]]}
    batch = GatedCollator(pad_token_id=0, block_size=3)([ex, {**ex, "fixed_points": [[20, 21, 22]],
                                                              "states": [[20, 3, 3]]}])
    B, T = batch["input_ids"].shape
    hidden = torch.randn(B, T, 32, generator=gen, dtype=torch.float64)  # (B, T, d): any final hidden states
    f_prev, allowed, dist = sampler_context(hidden, batch)
    teacher = batch["cons_teacher_idx"]
    with torch.no_grad():
        got = packed_attention(model, head, batch["input_ids"], f_prev, teacher, dist, allowed)  # (B, M, d)
        _, _, base = sampler_pairs(hidden, batch)
        clean = [i for i in range(T) if batch["gate"][0, i] == 0 and i < 4 + 12]  # example 0: prompt, c_0, c_1
        ids, pos = batch["input_ids"][0], batch["position_ids"][0]
        checked = 0
        for m in range(teacher.shape[1]):
            c = int(teacher[0, m])
            if not batch["block_mask"][0, m]:
                continue
            rows = [i for i in clean if i <= c]  # the committed text up to and including c's token
            ctx = HeadContext()
            ctx.add(model, head, ids[rows[1:]].tolist(), hidden[0, rows[:-1]], pos[rows[1:]].tolist())
            want = _chain_attention(model, head, ids[c], base[0, m], ctx, ([], [], []), int(pos[c]), False)
            assert torch.allclose(got[0, m], want, atol=1e-10), m
            checked += 1
    assert checked >= 4


def test_an_attending_head_decodes_as_the_base_alone_and_batched():
    """Any attending head keeps the base's greedy output (over block sizes, pools, runner-up tails); untrained it
    is the draft itself; under continuous batching each row gets what it gets alone (its own context)."""
    from cllm.decoding.continuous import Row
    from test_continuous import EOS, _run

    base, model = _gated(8)
    prompt = random_prompt(torch.Generator().manual_seed(8), 6)
    want = greedy_reference(base, prompt, 40)
    opts = [GatedOptions(block_size=n, pool_candidates=G, lookup_tokens=K, draft_topk=k, topk_tokens=m)
            for n, G, K, k, m in [(5, 0, 0, 1, 0), (4, 2, 3, 1, 0), (6, 1, 0, 3, 2)]]
    own = [gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1]) for o in opts]
    head = new_sampler(model, base_input=True, attn_heads=4)
    assert [gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1]).accept_lengths
            for o in opts] == [r.accept_lengths for r in own]
    gen = torch.Generator().manual_seed(8)
    for p in (head.down.weight, head.pair.weight, head.qkv.weight, head.out.weight):
        torch.nn.init.normal_(p, std=0.5, generator=gen)
    got = [gated_decode(model, None, prompt, o, max_new_tokens=40, eos_token_id=[-1]) for o in opts]
    assert all(g.token_ids == want for g in got)
    assert any(g.accept_lengths != r.accept_lengths for g, r in zip(got, own))
    rows = [Row(method="gated", prompt=random_prompt(gen, 4 + 3 * i), max_new_tokens=14, seed=i, options=o)
            for i, o in enumerate(opts[1:])]
    _run(model, {0: [rows[0]], 2: [rows[1]]})
    for row in rows:
        solo = gated_decode(model, None, row.prompt, row.options, max_new_tokens=14, seed=row.seed, eos_token_id=EOS)
        assert row.generated == solo.token_ids and row.n_forwards == solo.n_forwards


def test_training_an_attending_head_saves_and_loads_it(tiny_model_dir, tmp_path):
    """--sampler-attn-heads trains a head with attention (its output projection starts at zero and moves), saved
    with its head count, loaded as such; decoding with it is the base's greedy output; the option needs --sampler-base."""
    from cllm.config import resolve
    from cllm.models import load_model
    from cllm.training.config import TrainConfig
    from cllm.training.run import train

    tiny_trajectories(tiny_model_dir, tmp_path, 11, 5)
    common = dict(model=str(tiny_model_dir), data=[str(tmp_path / "t")], block_size=4, objective="gated",
                  use_peft=True, ar_weight=0.0, lora_r=4, logging_steps=2, save_steps=10, learning_rate=1e-2,
                  per_device_train_batch_size=2, max_steps=3, sampler_head=True, sampler_base=True)
    with pytest.raises(CllmError, match="--sampler-attn-heads"):
        resolve(TrainConfig, {**common, "sampler_base": False, "sampler_attn_heads": 2,
                              "output_dir": str(tmp_path / "x")}).validate()
    train(resolve(TrainConfig, {**common, "output_dir": str(tmp_path / "g"), "sampler_attn_heads": 2}))
    base, tok = load_model(str(tiny_model_dir), dtype="fp32")
    model, _ = load_model(str(tiny_model_dir), dtype="fp32", adapter=str(tmp_path / "g" / "adapter"))
    head = sampler_of(model)
    assert head.attn_heads == 2 and head.base_input and head.out.weight.abs().sum() > 0
    assert head.down.weight.abs().sum() > 0
    prompt = [5, 9, 14, 20, 7]
    got = gated_decode(model, tok, prompt, GatedOptions(block_size=4), max_new_tokens=20, eos_token_id=[-1])
    assert got.token_ids == greedy_reference(base, prompt, 20)
