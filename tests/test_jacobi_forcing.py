"""Jacobi Forcing packing: schedule, mask against a brute-force reference, losses against separate forwards."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cllm.errors import CllmError
from cllm.training.objectives.jacobi_forcing import (
    CLEAN,
    NOISY,
    JacobiForcingCollator,
    JacobiForcingDataset,
    group_responses,
    noise_aware_mask,
    noise_ratio,
    noise_targets,
    pick_state,
)
from cllm.training.losses import LossSettings, base_kl_loss, packed_losses
from cllm.training.trainer import adapter_off_logits
from conftest import tiny_model


def test_noise_ratio_targets_and_pick():
    fp = [1, 2, 3, 4]
    assert noise_ratio(fp, fp) == 0.0
    assert noise_ratio([9, 2, 3, 4], fp) == 1.0
    assert noise_ratio([1, 2, 9, 9], fp) == 0.5
    assert noise_ratio([1, 2, 3, 9], fp) == 0.25
    assert noise_targets(6, 3) == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert noise_targets(2, 1) == [1.0, 1.0]
    with pytest.raises(CllmError):
        noise_targets(2, 0)
    states = [[9, 9, 9, 9], [1, 9, 9, 9], [1, 2, 3, 9]]  # ratios 1, 0.75, 0.25; the fixed point adds 0
    assert pick_state(states, fp, 1.0) == [9, 9, 9, 9]
    assert pick_state(states, fp, 0.7) == [1, 9, 9, 9]
    assert pick_state(states, fp, 0.5) == [1, 9, 9, 9]  # tie 0.75 / 0.25: the earlier (noisier) state
    assert pick_state(states, fp, 0.3) == [1, 2, 3, 9]
    assert pick_state(states, fp, 0.0) == fp


def _rec(data_id, j, prompt, fps, states, p_len=None):
    ctx = prompt + [t for fp in fps[:j] for t in fp]
    return {"data_id": data_id, "block_index": j, "prompt_ids": ctx, "prompt_len": len(prompt),
            "states": states, "fixed_point": fps[j]}


def test_group_responses_orders_blocks_and_stops_at_a_gap():
    p, fps = [5, 6, 7], [[10, 11], [12, 13], [14, 15]]
    st = [[20, 21]]
    recs = [_rec("a", 2, p, fps, st), _rec("a", 0, p, fps, st), _rec("a", 1, p, fps, st),
            _rec("b", 0, p, fps, st), _rec("b", 2, p, fps, st),  # block 1 of b was dropped
            _rec("c", 1, p, fps, st)]  # no block 0
    got = {r["data_id"]: r for r in group_responses(recs)}
    assert sorted(got) == ["a", "b"]
    assert [b["fixed_point"] for b in got["a"]["blocks"]] == fps
    assert [b["fixed_point"] for b in got["b"]["blocks"]] == fps[:1]
    assert got["a"]["prompt_ids"] == p
    with pytest.raises(CllmError, match="block 0"):
        group_responses([_rec("c", 1, p, fps, st)])


def _examples():
    return [
        {"prompt_ids": [5, 6, 7], "fixed_points": [[10, 11, 12], [13, 14, 15], [16, 17]],
         "states": [[20, 21, 22], [13, 23, 24], [16, 25]]},
        {"prompt_ids": [8, 9], "fixed_points": [[30, 31, 32]], "states": [[30, 31, 32]]},  # already converged
    ]


def _brute_force_allowed(p: dict, noisy_context: str = "noisy") -> list[list[bool]]:
    """Spec rule, token by token: prompt causal; a noisy (clean) token of block j at offset o sees the prompt,
    every noisy (clean) token of blocks < j and its own block up to o; padding only itself. With a clean
    context a noisy token sees the CLEAN tokens of blocks < j instead of the noisy ones."""
    kinds = []  # (kind, block, offset) in packed order
    kinds += [("prompt", -1, i) for i in range(len(p["ids"]) - 2 * sum(len(f) for f in p["fixed_points"]))]
    for j, fp in enumerate(p["fixed_points"]):
        kinds += [("noisy", j, o) for o in range(len(fp))] + [("clean", j, o) for o in range(len(fp))]
    T = len(kinds)
    allowed = [[False] * T for _ in range(T)]
    for q, (kq, jq, oq) in enumerate(kinds):
        for k, (kk, jk, ok) in enumerate(kinds):
            if kq == "prompt":
                allowed[q][k] = kk == "prompt" and ok <= oq
            elif kq == "noisy" and noisy_context == "clean":
                allowed[q][k] = kk == "prompt" or (kk == "clean" and jk < jq) or (kk == "noisy" and jk == jq
                                                                                 and ok <= oq)
            else:
                allowed[q][k] = kk == "prompt" or (kk == kq and (jk < jq or (jk == jq and ok <= oq)))
    return allowed


@pytest.mark.parametrize("noisy_context", ["noisy", "clean"])
def test_noise_aware_mask_equals_brute_force(noisy_context):
    col = JacobiForcingCollator(0, 3, noisy_context=noisy_context)
    batch = col(_examples())
    T = batch["input_ids"].shape[1]
    for b, ex in enumerate(_examples()):
        p = col.pack(ex)
        want = _brute_force_allowed(p, noisy_context)
        L = len(want)
        got = batch["attention_mask"][b, 0] == 0  # additive mask: 0 where allowed
        assert got[:L, :L].tolist() == want
        assert not got[:L, L:].any() and not got[L:, :L].any()
        assert torch.equal(got[L:, L:], torch.eye(T - L, dtype=torch.bool))  # padding sees itself only
    # the pure mask function on a literal stream
    stream = torch.tensor([[0, NOISY, CLEAN, NOISY, CLEAN]])
    block = torch.tensor([[0, 0, 0, 1, 1]])
    if noisy_context == "noisy":
        want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]])
    else:  # the second noisy block sees the first clean block, not the first noisy one
        want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 1, 0, 1]])
    assert torch.equal(noise_aware_mask(stream, block, noisy_context)[0], want.bool())
    with pytest.raises(CllmError, match="noisy_context"):
        noise_aware_mask(stream, block, "dirty")


LEGACY = {"consistency_positions": "block", "ar_scope": "answer"}  # this project's rule before the faithful defaults


def test_collator_positions_indices_and_masks():
    batch = JacobiForcingCollator(0, 3, **LEGACY)(_examples())
    # example 0: prompt 3, blocks of 3, 3, 2 -> packed [p p p k0 k0 k0 c0 c0 c0 k1 k1 k1 c1 c1 c1 k2 k2 c2 c2]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 9, 10]
    assert batch["student_idx"][0].tolist() == [2, 3, 4, 5, 9, 10, 11, 15, 0]
    assert batch["teacher_idx"][0].tolist() == [2, 6, 7, 8, 12, 13, 14, 17, 0]
    assert batch["block_mask"][0].tolist() == [1, 1, 1, 0, 1, 1, 0, 1, 0]  # from the first mismatch on
    assert batch["real_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert batch["ar_target"][0].tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 0]
    assert batch["fixed_point"].shape == (2, 3, 3)
    assert batch["block_mask"][1].tolist() == [0] * 9  # a converged state adds no consistency term
    assert batch["real_mask"][1].tolist() == [1, 1, 1] + [0] * 6
    with pytest.raises(CllmError, match="block_size"):
        JacobiForcingCollator(0, 2)(_examples())
    # clean context: a noisy block's first token is predicted from the last CLEAN token before it
    clean = JacobiForcingCollator(0, 3, noisy_context="clean", **LEGACY)(_examples())
    assert clean["student_idx"][0].tolist() == [2, 3, 4, 8, 9, 10, 14, 15, 0]
    assert torch.equal(clean["teacher_idx"], batch["teacher_idx"])
    assert bool(clean["clean_context"]) and not bool(batch["clean_context"])
    with pytest.raises(CllmError, match="noisy_context"):
        JacobiForcingCollator(0, 3, noisy_context="dirty")


@torch.no_grad()
@pytest.mark.parametrize("noisy_context", ["noisy", "clean"])
def test_packed_losses_equal_block_by_block_separate_forwards(noisy_context):
    model = tiny_model(3)
    examples = _examples()
    batch = JacobiForcingCollator(0, 3, torch.float64, noisy_context, **LEGACY)(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    for kind in ("forward_kl", "jsd"):
        s = LossSettings(divergence=kind, loss_normalization="token")
        ar, cons, _ = packed_losses(logits, batch, s)

        def sep(seq, k):  # logits predicting the last k tokens of seq, from a plain causal forward
            return model(torch.tensor([seq])).logits[0, len(seq) - 1 - k : len(seq) - 1]

        from cllm.training.losses import divergence

        ce_sum = cons_sum = 0.0
        n_ar = n_cons = 0
        picked = []
        for ex in examples:
            clean, noisy = list(ex["prompt_ids"]), list(ex["prompt_ids"])
            for fp, st in zip(ex["fixed_points"], ex["states"]):
                # the student's context: the earlier noisy blocks (paper) or the earlier clean ones
                noisy = (clean if noisy_context == "clean" else noisy) + st
                clean = clean + fp
                t_logits, s_logits = sep(clean, len(fp)), sep(noisy, len(fp))
                picked.append((t_logits, s_logits))
                ce_sum += F.cross_entropy(t_logits, torch.tensor(fp), reduction="sum").item()
                n_ar += len(fp)
                first = next((i for i in range(len(fp)) if st[i] != fp[i]), len(fp))
                d = divergence(t_logits, s_logits, kind)
                cons_sum += d[first:].sum().item()
                n_cons += len(fp) - first
        # the losses compute in float32 (as in training), the logits above are float64
        assert ar.item() == pytest.approx(ce_sum / n_ar, rel=1e-6)
        assert cons.item() == pytest.approx(cons_sum / n_cons, rel=1e-6)
        assert cons.item() > 0
        # and position by position, the packed logits are the separate forwards' (float64)
        for b, ex in enumerate(examples):
            blocks = [pair for pair in picked[:len(ex["fixed_points"])]]
            picked = picked[len(ex["fixed_points"]):]
            for j, (t_logits, s_logits) in enumerate(blocks):
                m = t_logits.shape[0]
                idx = slice(3 * j, 3 * j + m)
                assert torch.allclose(logits[b, batch["teacher_idx"][b, idx]], t_logits, atol=1e-10)
                assert torch.allclose(logits[b, batch["student_idx"][b, idx]], s_logits, atol=1e-10)


@torch.no_grad()
def test_base_kl_equals_kl_to_the_base_model_on_the_clean_text():
    from peft import LoraConfig, get_peft_model

    from cllm.training.losses import divergence

    base = tiny_model(3)
    peft_model = get_peft_model(tiny_model(3), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          lora_dropout=0.0))
    examples = _examples()
    batch = JacobiForcingCollator(0, 3, torch.float64, "clean", ar_scope="answer")(examples)

    def packed(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits

    # LoRA starts as the identity (B = 0): the model is its base, the term is 0
    fresh = base_kl_loss(packed(peft_model), adapter_off_logits(peft_model, peft_model, batch), batch)
    assert fresh.item() == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.copy_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    base_logits = adapter_off_logits(peft_model, peft_model, batch)
    assert torch.allclose(base_logits, packed(base), atol=1e-10)  # adapter off = the base model
    got = base_kl_loss(packed(peft_model), base_logits, batch)

    def sep(model, seq, k):  # logits predicting the last k tokens of seq, from a plain causal forward
        return model(torch.tensor([seq])).logits[0, len(seq) - 1 - k : len(seq) - 1]

    total, count = 0.0, 0
    for ex in examples:
        clean = list(ex["prompt_ids"])
        for fp in ex["fixed_points"]:
            clean = clean + fp
            total += divergence(sep(base, clean, len(fp)), sep(peft_model, clean, len(fp))).sum().item()
            count += len(fp)
    assert got.item() > 1e-3 and got.item() == pytest.approx(total / count, rel=1e-6)


def test_dataset_picks_states_by_schedule(tmp_path):
    p, fps = [5, 6], [[10, 11, 12, 13]] * 3
    st = [[20, 21, 22, 23], [10, 21, 22, 23], [10, 11, 12, 23]]  # ratios 1, 0.75, 0.25
    recs = [_rec("a", j, p, fps, st) for j in range(3)]
    ds = JacobiForcingDataset(recs, noise_window=3)  # targets 0, 0.5, 1
    ex = ds[0]
    assert ex["states"] == [fps[0], st[1], st[0]]
    assert JacobiForcingDataset(recs, noise_window=3, max_blocks=2)[0]["fixed_points"] == fps[:2]
    assert JacobiForcingDataset(recs, max_prompt_tokens=1)[0]["prompt_ids"] == [6]
    json.dumps(ex)  # plain lists: picklable for data loader workers
    shifted = JacobiForcingDataset(recs, noise_window=3, noise_shifts=3)  # each response 3 times, shifted
    assert len(shifted) == 3 and shifted[0] == ex
    assert shifted[1]["states"] == [st[1], st[0], fps[0]]  # targets 0.5, 1, 0
    assert shifted[2]["states"] == [st[0], fps[0], st[1]]  # targets 1, 0, 0.5
    assert noise_targets(4, 3, shift=2) == [1.0, 0.0, 0.5, 1.0]
    with pytest.raises(CllmError, match="noise_shifts"):
        JacobiForcingDataset(recs, noise_window=3, noise_shifts=4)


from test_train import traj_dir, train_cfg  # noqa: E402,F401  (shared fixture and config helper)


def test_full_finetune_run_and_bad_options(tiny_model_dir, traj_dir, tmp_path):  # noqa: F811
    from cllm.training.run import train

    out = tmp_path / "jf"
    train(train_cfg(tiny_model_dir, traj_dir, out, objective="jacobi_forcing", noise_window=3, max_steps=3,
                    gradient_accumulation_steps=2))
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert all(h["loss/consistency"] > 0 and 0 <= h["tokens_converged"] <= 4 for h in steps)
    assert not any("tokens_gained" in h for h in steps)  # meaningless under noisy contexts (trainer.py)
    for kw, msg in [({"ar_target": "labels"}, "clean stream"), ({"consistency": "local"}, "clean stream"),
                    ({"noise_window": 0}, "--noise-window"), ({"noise_window": 3, "noise_shifts": 4}, "--noise-shifts")]:
        with pytest.raises(CllmError, match=msg):
            train_cfg(tiny_model_dir, traj_dir, out, objective="jacobi_forcing", **kw)


def test_clean_context_shifted_lora_run_logs_tokens_gained(tiny_model_dir, traj_dir, tmp_path):  # noqa: F811
    from cllm.training.run import train

    out = tmp_path / "jf_clean"
    train(train_cfg(tiny_model_dir, traj_dir, out, objective="jacobi_forcing", noise_window=3, noise_shifts=3,
                    noisy_context="clean", use_peft=True, learning_rate=1e-3, max_steps=3))
    steps = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    # meaningful with a clean context: the state's right prefix is the committed text's
    assert all("tokens_gained" in h and -4 <= h["tokens_gained"] <= 4 for h in steps)


def test_base_kl_run_logs_the_term_and_needs_lora(tiny_model_dir, traj_dir, tmp_path):  # noqa: F811
    from cllm.training.run import train

    out = tmp_path / "jf_base_kl"
    train(train_cfg(tiny_model_dir, traj_dir, out, objective="jacobi_forcing", noise_window=3, noisy_context="clean",
                    use_peft=True, lora_dropout=0.0, learning_rate=1e-2, max_steps=3, base_kl_weight=1.0))
    steps = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    # step 1 runs before any update (LoRA B = 0: model = base); then the adapter moves the model off its base
    assert [h["loss/base_kl"] == pytest.approx(0.0, abs=1e-6) for h in steps] == [True, False, False]
    assert all(h["loss/base_kl"] >= 0 for h in steps)
    for kw, msg in [({"base_kl_weight": 1.0}, "needs --use-peft"), ({"base_kl_weight": -1.0}, ">= 0")]:
        with pytest.raises(CllmError, match=msg):
            train_cfg(tiny_model_dir, traj_dir, out, objective="jacobi_forcing", **kw)


def test_first_prompts_keeps_the_first_ids_in_numeric_order():
    from cllm.training.records import first_prompts

    recs = [{"data_id": i, "block_index": b} for i in (10, 2, 33, 2, 9) for b in (0,)]
    assert sorted({r["data_id"] for r in first_prompts(recs, 2)}) == [2, 9]
    assert len(first_prompts(recs, 2)) == 3  # both blocks of prompt 2
    assert first_prompts(recs, 0) == []
