"""Training does what the objective says: the consistency term sends no gradient through its teacher, and a few
dozen steps on a handful of blocks lower the consistency loss and raise the tokens one Jacobi step converges,
measured on the same states before and after (not the training log)."""

from __future__ import annotations

import pytest
import torch

from cllm.models import load_model
from cllm.training.objectives.jacobi_forcing import JacobiForcingCollator
from cllm.training.losses import LossSettings, converged_prefix, packed_losses
from cllm.training.run import train
from cllm.training.objectives.cllm import PackedCollator, TrajectoryDataset
from cllm.training.records import read_records
from test_train import train_cfg, traj_dir  # noqa: F401  (the module's fixture: a small `cllm gen` folder)


def _cllm_batch():
    return PackedCollator(0, 4, mask_dtype=torch.float64)([
        {"prompt_ids": [5, 6, 7], "prompt_len": 2, "fixed_point": [11, 12, 13, 14], "state": [11, 20, 21, 22]},
        {"prompt_ids": [8, 9, 10, 11], "prompt_len": 3, "fixed_point": [15, 16, 17], "state": [30, 31, 17]}])


def _jf_batch():
    return JacobiForcingCollator(0, 3, mask_dtype=torch.float64, noisy_context="clean")([
        {"prompt_ids": [5, 6, 7], "fixed_points": [[10, 11, 12], [13, 14, 15]], "states": [[20, 11, 22], [13, 23, 24]]}])


@pytest.mark.parametrize("make_batch", [_cllm_batch, _jf_batch], ids=["cllm", "jacobi_forcing"])
def test_the_teacher_gets_no_gradient_from_the_consistency_term(make_batch):
    batch = make_batch()
    B, T = batch["input_ids"].shape
    logits = torch.randn(B, T, 40, dtype=torch.float64, requires_grad=True)
    _, cons, _ = packed_losses(logits, batch, LossSettings())
    cons.backward()
    grad = logits.grad.abs().sum(-1)  # (B, T)
    counted = batch["block_mask"]
    for b in range(B):
        students = set(batch["cons_student_idx"][b][counted[b]].tolist())
        teachers = set(batch["cons_teacher_idx"][b][counted[b]].tolist()) - students
        assert teachers and all(grad[b, t] == 0 for t in teachers)  # detached: a missing detach fails here
        assert all(grad[b, s] > 0 for s in students)
        others = set(range(T)) - students - teachers
        assert all(grad[b, t] == 0 for t in others)


def _consistency_and_converged(model_dir, records) -> tuple[float, float]:
    """The consistency loss and the mean converged prefix over every state of `records`, in one batch."""
    model, _ = load_model(str(model_dir), dtype="fp64")
    examples = [TrajectoryDataset(records, "all")[i] for i in range(len(TrajectoryDataset(records, "all")))]
    batch = PackedCollator(0, 4, mask_dtype=torch.float64)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    _, cons, student = packed_losses(logits, batch, LossSettings())
    return float(cons), float(converged_prefix(student, batch["fixed_point"], batch["real_mask"]).float().mean())


def test_training_lowers_the_consistency_loss_and_converges_more_tokens(tiny_model_dir, traj_dir, tmp_path):  # noqa: F811
    records = read_records(traj_dir)
    before = _consistency_and_converged(tiny_model_dir, records)
    out = tmp_path / "run"
    train(train_cfg(tiny_model_dir, traj_dir, out, max_steps=120, learning_rate=3e-3, save_steps=100,
                    ar_weight=1.0, lr_scheduler_type="constant"))
    after = _consistency_and_converged(out, records)
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] > before[1] + 0.3, (before, after)
