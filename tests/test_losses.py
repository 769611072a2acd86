"""Losses against hand-computed values and identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cllm.training.losses import Reduction, ar_loss, consistency_loss, converged_prefix, divergence


def test_forward_kl_hand_computed():
    # p_t = (0.5, 0.5), p_s = (0.25, 0.75): KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3)
    t = torch.tensor([[[0.0, 0.0]]])
    s = torch.tensor([[[math.log(0.25), math.log(0.75)]]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert divergence(t, s, "forward_kl").item() == pytest.approx(expected, rel=1e-6)
    # reverse: 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5)
    assert divergence(t, s, "reverse_kl").item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    # JSD(0.5): 0.5 KL(p_t||m) + 0.5 KL(p_s||m), m = (0.375, 0.625)
    m = (0.375, 0.625)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert divergence(t, s, "jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-6)


def test_forward_kl_matches_kl_div_and_is_zero_for_equal_inputs():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / 10
    assert consistency_loss(s, t, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert consistency_loss(t, t.clone(), mask, kind).abs().item() < 1e-6
        assert consistency_loss(s, t, mask, kind).item() > 0


def test_fully_masked_gives_zero_without_nan():
    s = torch.randn(2, 3, 7, requires_grad=True)
    t = torch.randn(2, 3, 7)
    none = torch.zeros(2, 3, dtype=torch.bool)
    c = consistency_loss(s, t, none)
    a = ar_loss(s, torch.zeros(2, 3, dtype=torch.long), none)
    assert c.item() == 0.0 and a.item() == 0.0
    (c + a).backward()
    assert torch.isfinite(s.grad).all()


def test_gradient_flows_to_the_student_only():
    s = torch.randn(1, 4, 9, requires_grad=True)
    t = torch.randn(1, 4, 9, requires_grad=True)
    consistency_loss(s, t, torch.ones(1, 4, dtype=torch.bool)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_ar_loss_masking_smoothing_and_normalizer():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    target = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[True, True, False]])  # the third position is prompt/padding
    ce = F.cross_entropy(logits[0, :2], target[0, :2])
    assert ar_loss(logits, target, mask).item() == pytest.approx(ce.item(), rel=1e-6)
    # A normalizer (tokens of a whole accumulation window) replaces the local count.
    windowed = ar_loss(logits, target, mask, reduction=Reduction(normalizer=4))
    assert windowed.item() == pytest.approx(ce.item() * 2 / 4, rel=1e-6)
    sm = F.cross_entropy(logits[0, :2], target[0, :2], label_smoothing=0.1)
    assert ar_loss(logits, target, mask, label_smoothing=0.1).item() == pytest.approx(sm.item(), rel=1e-6)


def test_accumulation_normalisation_is_token_weighted():
    # Two micro-batches with 1 and 3 valid tokens: the window loss is the mean over 4 tokens, not a mean of means.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g)
    target = torch.randint(5, (2, 3), generator=g)
    masks = [torch.tensor([[True, False, False]]), torch.tensor([[True, True, True]])]
    half = Reduction(normalizer=4 / 2)
    window = sum(ar_loss(logits[i : i + 1], target[i : i + 1], masks[i], reduction=half) for i in range(2)) / 2
    full = ar_loss(logits, target, torch.cat(masks))
    assert window.item() == pytest.approx(full.item(), rel=1e-6)


def test_converged_prefix_counts_leading_hits():
    logits = torch.zeros(1, 4, 3)
    logits[0, torch.arange(4), torch.tensor([1, 2, 0, 1])] = 1.0  # argmax 1, 2, 0, 1
    assert converged_prefix(logits, torch.tensor([[1, 2, 1, 1]]), torch.ones(1, 4)).tolist() == [2]
    assert converged_prefix(logits, torch.tensor([[0, 2, 0, 1]]), torch.ones(1, 4)).tolist() == [0]


def test_training_log_plot_is_a_png(tmp_path):
    from cllm.eval.plots import plot_training_log

    log = [{"step": s, "loss": 5.0 / s, "loss/ar": 0.4 / s, "loss/consistency": 1.0 / s, "tokens_converged": s / 10}
           for s in range(1, 6)] + [{"step": 5, "jacobi/tokens_per_forward": 1.2}]
    (tmp_path / "log_history.json").write_text(__import__("json").dumps(log))
    png = plot_training_log(tmp_path, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_sampler_pairs_and_loss_by_hand():
    """The sampler head's pairs: the hidden state at each noisy (student) position, the token at its clean
    (teacher) position and the hidden state of the last clean (gate 0) row before it, the one that predicted the
    token; its loss: forward KL(base at the teacher position || head), averaged over the mask per example,
    divided by the example's block count ("original") or over all counted positions ("token")."""
    from cllm.training.losses import LossSettings, sampler_loss, sampler_pairs

    hidden = torch.arange(2 * 6 * 3, dtype=torch.float64).view(2, 6, 3)  # (B, T, d)
    inputs = {"input_ids": torch.tensor([[9, 8, 7, 6, 5, 4], [3, 2, 1, 0, 11, 12]]),
              "gate": torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]]),  # (B, T): 1 on noisy rows
              "cons_student_idx": torch.tensor([[1, 2], [0, 3]]), "cons_teacher_idx": torch.tensor([[4, 5], [2, 5]]),
              "block_mask": torch.tensor([[True, True], [False, True]]), "n_blocks": torch.tensor([1.0, 2.0])}
    h, tokens, base = sampler_pairs(hidden, inputs)
    assert torch.equal(h[0, 1], hidden[0, 2]) and torch.equal(h[1, 0], hidden[1, 0])
    assert tokens.tolist() == [[5, 4], [1, 12]]
    assert torch.equal(base[0, 0], hidden[0, 3]) and torch.equal(base[0, 1], hidden[0, 4])
    # example 1: row 4 before teacher 5 is noisy (gate 1), so the clean row that predicted its token is row 3
    assert torch.equal(base[1, 0], hidden[1, 1]) and torch.equal(base[1, 1], hidden[1, 3])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)  # (B, T, V)
    head = torch.randn(2, 2, 5, generator=gen, dtype=torch.float64)  # (B, M, V)

    def kl(t, s):
        p = t.softmax(-1)
        return float((p * (t.log_softmax(-1) - s.log_softmax(-1))).sum())

    k = [[kl(logits[0, 4], head[0, 0]), kl(logits[0, 5], head[0, 1])], [None, kl(logits[1, 5], head[1, 1])]]
    original = ((k[0][0] + k[0][1]) / 2 / 1 + k[1][1] / 1 / 2) / 2
    token = (k[0][0] + k[0][1] + k[1][1]) / 3
    got = sampler_loss(head, logits, inputs, LossSettings(loss_normalization="original"))
    assert abs(float(got) - original) < 1e-6  # the divergence is computed in float32
    got = sampler_loss(head, logits, inputs, LossSettings(loss_normalization="token"))
    assert abs(float(got) - token) < 1e-6
