"""The default objectives (`loss_normalization: original`, `consistency_positions: original`, `ar_scope:
prompt_and_answer`, the released label smoothing) against literal re-computations of the released trainers'
formulas on hand-made batches, float64, on a tiny model:

- hao-ai-lab/Consistency_LLM `cllm/cllm_trainer_global.py` (CLLM global consistency + AR);
- hao-ai-lab/JacobiForcing `soft_flexattn_cllm_trainer_multiblock.py` (noisy context) and
  `soft_flexattn_cllm_trainer.py` (clean context, run by `train_clean_context_conditioned_cllm_*.sh`).

The losses compute in float32 (as in training), hence the tolerances. The references below follow those files' steps (their own sequence layout, FlexAttention mask rule, pair lists,
soft cross-entropy and scales), one example per micro-batch as they train; a batch of examples is their mean.
The released consistency term is a soft cross-entropy; the project's forward KL is that minus the teacher's
entropy (same gradient), so values are compared after adding the entropy back and gradients directly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cllm.training.objectives.jacobi_forcing import JacobiForcingCollator
from cllm.training.objectives.cllm import PackedCollator
from cllm.training.losses import LossSettings, packed_losses
from conftest import tiny_model

N = 3  # block size of the hand-made examples


def _soft_ce(student, teacher, keep):  # the released `soft_cross_entropy`, with keep = ~padding_mask
    if keep.sum() == 0:
        return 0 * student[0][0]
    ent = -F.softmax(teacher, -1) * F.log_softmax(student, -1)
    return ent[keep].sum() / keep.sum()


def _teacher_entropy(teacher, keep):
    p = F.softmax(teacher, -1)
    return (-(p * F.log_softmax(teacher, -1)).sum(-1))[keep].sum() / keep.sum().clamp(min=1)


def _jf_allowed(P: int, T: int, clean: bool) -> torch.Tensor:
    """The released mask_mod, evaluated for every (q, k): [prompt][k_0][last_0][k_1][last_1] ..."""
    L = P + 2 * T * N
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            bq, bk = (q - P) // N, (k - P) // N
            pq, pk = q < P, k < P
            kj_q, last_q = not pq and bq % 2 == 0, not pq and bq % 2 == 1
            kj_k, last_k = not pk and bk % 2 == 0, not pk and bk % 2 == 1
            jq = min(max(bq // 2, 0), T - 1)
            prev_last = last_k and bk < 2 * jq
            prev_k = kj_k and bk < 2 * jq
            ks, ls = P + 2 * jq * N, P + (2 * jq + 1) * N
            m_prompt = pq and k <= q
            m_kj = kj_q and (pk or (prev_last if clean else prev_k) or (kj_k and bq == bk and ks <= k <= q))
            m_last = last_q and (pk or prev_last or (last_k and bq == bk and ls <= k <= q))
            allowed[q, k] = m_prompt or m_kj or m_last
    return allowed


def _jf_reference(model, ex: dict, clean: bool, temperature: float):
    """(loss_ar, loss_consistency, teacher entropy term) of one example, as the released trainer computes them."""
    prompt, states, fps = ex["prompt_ids"], ex["states"], ex["fixed_points"]
    P, T = len(prompt), len(fps)
    ids = list(prompt)
    for st, fp in zip(states, fps):
        ids += st + fp
    k_starts = [P + 2 * j * N for j in range(T)]
    l_starts = [P + (2 * j + 1) * N for j in range(T)]
    pos = list(range(P))
    for j in range(T):
        pos += [P + j * N + r for r in range(N)] * 2
    mask = torch.zeros(1, 1, len(ids), len(ids), dtype=torch.float64)
    mask.masked_fill_(~_jf_allowed(P, T, clean), torch.finfo(torch.float64).min)
    logits = model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=torch.tensor([pos])).logits[0]
    # AR: the prompt's pairs, then per block the bridge from the previous clean block (or the prompt) and its pairs
    lp, tp = list(range(P - 1)), list(range(1, P))
    for j, ls in enumerate(l_starts):
        lp.append(P - 1 if j == 0 else l_starts[j - 1] + N - 1)
        tp.append(ls)
        lp += list(range(ls, ls + N - 1))
        tp += list(range(ls + 1, ls + N))
    loss_ar = F.cross_entropy(logits[lp], torch.tensor(ids)[tp], label_smoothing=0.0) * 10
    # consistency: offsets t from the first difference on (the clean-context trainer drops offset N-1)
    size = N - 1 if clean else N
    sp, tpos = [], []
    for ks, ls in zip(k_starts, l_starts):
        diff = [ids[ks + t] != ids[ls + t] for t in range(size)]
        if any(diff):
            first = diff.index(True)
            sp += [ks + t for t in range(first, size)]
            tpos += [ls + t for t in range(first, size)]
    if not sp:
        zero = torch.zeros((), dtype=torch.float64)
        return loss_ar, zero, zero
    student, teacher = logits[sp] / temperature, logits[tpos].detach() / temperature
    keep = torch.ones(len(sp), dtype=torch.bool)  # no padding in these examples
    scale = temperature * temperature / T
    return loss_ar, _soft_ce(student, teacher, keep) * scale, _teacher_entropy(teacher, keep) * scale


def _jf_examples():  # full blocks (the released layout has no short block); one already converged block
    return [
        {"prompt_ids": [5, 6, 7], "fixed_points": [[10, 11, 12], [13, 14, 15], [16, 17, 18]],
         "states": [[20, 21, 22], [13, 23, 24], [16, 17, 25]]},
        {"prompt_ids": [8, 9, 26, 27], "fixed_points": [[30, 31, 32], [33, 34, 35]],
         "states": [[30, 31, 32], [36, 34, 37]]},
    ]


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _assert_same_grads(ours, theirs):
    """Equal up to the float32 loss arithmetic: within 1e-6 of each gradient tensor's largest entry."""
    for g_ours, g_theirs in zip(ours, theirs):
        assert (g_ours - g_theirs).abs().max() <= 1e-6 * g_theirs.abs().max()


@pytest.mark.parametrize("noisy_context", ["noisy", "clean"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jacobi_forcing_defaults_equal_the_released_trainers(noisy_context, temperature):
    model = tiny_model(3)
    examples = _jf_examples()
    clean = noisy_context == "clean"
    refs = [_jf_reference(model, ex, clean, temperature) for ex in examples]
    want_ar = sum(r[0] for r in refs) / len(refs)  # the released trainers' loss_ar already holds the x10
    want_cons = sum(r[1] for r in refs) / len(refs)
    want_entropy = sum(r[2] for r in refs) / len(refs)

    batch = JacobiForcingCollator(0, N, torch.float64, noisy_context)(examples)  # the defaults
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    s = LossSettings(temperature=temperature)  # defaults: normalization original, AR x10, consistency x1
    ar, cons, _ = packed_losses(logits, batch, s)
    assert (s.ar_weight * ar).item() == pytest.approx(want_ar.item(), rel=1e-6)
    assert cons.item() + want_entropy.item() == pytest.approx(want_cons.item(), rel=1e-6)
    assert cons.item() > 0
    # same gradient of the total loss, parameter by parameter
    ours = _grads(model, s.ar_weight * ar + s.consistency_weight * cons)
    logits_ref = [_jf_reference(model, ex, clean, temperature) for ex in examples]
    theirs = _grads(model, sum(a + c for a, c, _ in logits_ref) / len(examples))
    _assert_same_grads(ours, theirs)


@torch.no_grad()
def test_jacobi_forcing_today_scale_is_about_t_times_heavier():
    """The `token` normalization (this project's scale before) has no 1/T: on one example its consistency term is
    T times the original's when both count the same positions."""
    model = tiny_model(3)
    ex = _jf_examples()[:1]
    batch = JacobiForcingCollator(0, N, torch.float64, "noisy")(ex)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    _, original, _ = packed_losses(logits, batch, LossSettings())
    _, token, _ = packed_losses(logits, batch, LossSettings(loss_normalization="token"))
    assert token.item() == pytest.approx(3 * original.item(), rel=1e-6)  # T = 3 blocks


def _cllm_reference(model, ctx: list[int], fp: list[int], st: list[int]):
    """(loss_ar, loss_global, teacher entropy term) as `cllm_trainer_global.py` computes them for one example whose
    answer ends with this block (teacher_output_ids = context + fixed point)."""
    traj_i, traj_last = torch.tensor([ctx + st]), torch.tensor([ctx + fp])
    labels = traj_last
    out = model(labels, torch.ones_like(labels)).logits
    logp = F.log_softmax(out[0, :-1], -1)
    target = labels[0, 1:]
    nll = -logp.gather(-1, target[:, None]).squeeze(-1)
    smooth = -logp.mean(-1)  # LabelSmoother: log_probs.sum(-1) / vocab
    loss_ar = (0.9 * nll.mean() + 0.1 * smooth.mean()) * 10
    logits_i = model(traj_i, torch.ones_like(traj_i)).logits
    logits_last = model(traj_last, torch.ones_like(traj_last)).logits.detach()
    output_mask = torch.zeros(traj_i.shape[1] - 1, dtype=torch.bool)  # True = masked; no padding here
    mism = torch.where(traj_i[0, 1:] != traj_last[0, 1:])[0]
    if len(mism) == 0:
        output_mask[:] = True
    else:
        output_mask[: mism[0]] = True
    keep = ~output_mask
    student, teacher = logits_i[0, :-1], logits_last[0, :-1]
    return loss_ar, _soft_ce(student, teacher, keep), _teacher_entropy(teacher, keep)


def test_cllm_defaults_equal_the_released_trainer():
    model = tiny_model(5)
    # prompt_ids hold prompt + generated context (prompt_len marks the prompt); blocks are the answer's last
    examples = [
        {"prompt_ids": [5, 6, 7, 8, 9, 10], "prompt_len": 4, "fixed_point": [11, 12, 13], "state": [11, 20, 21],
         "next_state": None, "label_ids": None},
        {"prompt_ids": [40, 41, 42], "prompt_len": 3, "fixed_point": [43, 44, 45], "state": [46, 47, 48],
         "next_state": None, "label_ids": None},
    ]
    refs = [_cllm_reference(model, e["prompt_ids"], e["fixed_point"], e["state"]) for e in examples]
    batch = PackedCollator(0, N, mask_dtype=torch.float64)(examples)  # the defaults
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    s = LossSettings(label_smoothing=0.1)  # what TrainConfig resolves for objective cllm
    ar, cons, _ = packed_losses(logits, batch, s)
    assert (s.ar_weight * ar).item() == pytest.approx((sum(r[0] for r in refs) / 2).item(), rel=1e-6)
    want = sum(r[1] for r in refs) / 2
    entropy = sum(r[2] for r in refs) / 2
    assert cons.item() + entropy.item() == pytest.approx(want.item(), rel=1e-6)
    # the first example counts 2 of its 3 positions (its state is right at token 0), the second all 3
    assert batch["block_mask"].tolist() == [[False, True, True], [True, True, True]]
    ours = _grads(model, s.ar_weight * ar + cons)
    theirs = _grads(model, sum(r[0] + r[1] for r in [_cllm_reference(model, e["prompt_ids"], e["fixed_point"],
                                                                      e["state"]) for e in examples]) / 2)
    _assert_same_grads(ours, theirs)


def test_label_smoothing_defaults_follow_the_objective(tmp_path):
    from cllm.training.config import TrainConfig
    from cllm.config import resolve

    base = {"data": ["x"], "output_dir": str(tmp_path)}
    assert resolve(TrainConfig, base).label_smoothing == 0.1
    assert resolve(TrainConfig, {**base, "objective": "jacobi_forcing"}).label_smoothing == 0.0
    assert resolve(TrainConfig, {**base, "label_smoothing": 0.0}).label_smoothing == 0.0
    cfg = resolve(TrainConfig, base)
    assert (cfg.loss_normalization, cfg.consistency_positions, cfg.ar_scope) == ("original", "original",
                                                                                 "prompt_and_answer")


def test_loss_settings_come_from_the_train_config_by_name():
    """LossSettings' fields are TrainConfig's under the same names: built by keyword, nothing renamed."""
    import dataclasses

    from cllm.training.config import TrainConfig

    cfg = TrainConfig(data=["x"], output_dir="y", ar_weight=3.0, consistency_weight=2.0, divergence="jsd",
                      jsd_beta=0.3, temperature=2.0, label_smoothing=0.05, loss_normalization="token")
    s = LossSettings.from_config(cfg)
    assert {f.name for f in dataclasses.fields(LossSettings)} <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert (s.ar_weight, s.consistency_weight, s.divergence, s.jsd_beta, s.temperature, s.label_smoothing,
            s.loss_normalization) == (3.0, 2.0, "jsd", 0.3, 2.0, 0.05, "token")
