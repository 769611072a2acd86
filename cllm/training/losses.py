"""CLLM training losses as pure tensor functions, and the packed-batch losses the trainer computes from them.

Shapes: logits (B, n, V) over the n block positions (or (B, T, V) for the AR loss), masks (B, n) or (B, T) with
True/1 where a position counts. Two reductions (`NORMALIZATIONS`):
- "token": a SUM over counted positions divided by `normalizer` (default: the number of counted positions, at
  least 1), so that callers can pass the token count of a whole gradient-accumulation window and get a loss that
  is correct under accumulation;
- "original": the released CLLM / Jacobi Forcing trainers' scale. They train one example per micro-batch and take
  the mean over that example's counted positions (Jacobi Forcing then divides its consistency mean by T, the number
  of blocks packed in the example: `example_scale`); the optimizer step averages the micro-batches. Here each
  example's mean is taken, scaled, and the batch's examples are averaged, which is the same for any batch size.
A fully masked input gives 0, never NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
NORMALIZATIONS = ("original", "token")


def divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str = "forward_kl",
               beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence D(p_teacher || p_student), shape (...). The teacher is detached here.

    forward_kl: KL(p_t || p_s) (the paper); reverse_kl: KL(p_s || p_t); jsd: generalized Jensen-Shannon with weight
    beta as in GKD, beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s
    (beta -> 0 approaches forward KL scaled by beta, beta = 0.5 is the symmetric JSD). Both are softened by the
    temperature; the result is multiplied by temperature**2 so gradients keep their scale (Hinton et al.).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    t_logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    elif kind == "reverse_kl":
        d = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        log_m = torch.logsumexp(
            torch.stack([t_logp + torch.log(torch.tensor(beta)), s_logp + torch.log(torch.tensor(1 - beta))]), dim=0
        )
        d = beta * (t_logp.exp() * (t_logp - log_m)).sum(-1) + (1 - beta) * (s_logp.exp() * (s_logp - log_m)).sum(-1)
    return d * temperature**2


@dataclass(frozen=True)
class Reduction:
    """How per-position values (B, K) become one loss (the module docstring's two normalizations): `normalizer` is
    the "token" one's divisor (default: the counted positions), `example_scale` (B,) the "original" one's factor
    per example."""

    normalization: str = "token"
    normalizer: object = None
    example_scale: torch.Tensor | None = None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, reduction: Reduction = Reduction()) -> torch.Tensor:
    """Reduce per-position `values` (B, K) over `mask` (B, K) as `reduction` says."""
    normalization, normalizer, example_scale = reduction.normalization, reduction.normalizer, reduction.example_scale
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    mask = mask.to(values.dtype)
    if normalization == "original":
        per_example = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        if example_scale is not None:
            per_example = per_example * example_scale.to(values.dtype)
        return per_example.mean()
    total = (values * mask).sum()
    if normalizer is None:
        normalizer = mask.sum()
    normalizer = torch.as_tensor(normalizer, dtype=values.dtype, device=values.device).clamp(min=1)
    return total / normalizer


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                     reduction: Reduction = Reduction()) -> torch.Tensor:
    """Consistency loss over block positions: sum_i D(q(.|ctx, teacher state)_i || q(.|ctx, y(j))_i) / normalizer.

    Global consistency: the teacher logits come from the fixed point y*; local consistency: from the successor
    state y(j+1). Either way they come from the same model with gradient stopped (detached here).

    The released trainers use the soft cross-entropy -sum p_t log p_s; forward KL differs from it by the teacher's
    entropy, a constant for the student: the same gradient, a value lower by that entropy.
    """
    return _masked_mean(divergence(teacher_logits, student_logits, kind, beta, temperature), mask, reduction)


def ar_loss(logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0,
            reduction: Reduction = Reduction()) -> torch.Tensor:
    """Cross-entropy of `target_ids` (B, T) under `logits` (B, T, V) (already aligned: logits[:, t] predicts
    target_ids[:, t]), over positions where `mask` is set (prompt and padding masked)."""
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        target_ids.reshape(-1).clamp(min=0),
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(target_ids.shape)
    return _masked_mean(ce, mask, reduction)


def converged_prefix(student_logits: torch.Tensor, fixed_point: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Tokens one Jacobi step from the state would commit: the leading run where argmax == y* (B,) (a metric)."""
    hit = (student_logits.argmax(-1) == fixed_point) & mask.bool()
    return hit.long().cumprod(dim=-1).sum(-1)


@dataclass
class LossSettings:
    """The objective's weights and options, as `CllmTrainer` applies them: ar_weight * AR + consistency_weight *
    consistency (+ base_kl_weight * KL(base || model)). The fields are `TrainConfig`'s, under the same names
    (`from_config`)."""

    ar_weight: float = 10.0
    consistency_weight: float = 1.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    label_smoothing: float = 0.0
    base_kl_weight: float = 0.0
    sampler_weight: float = 1.0  # a gated draft's sampler head, when the model has one
    loss_normalization: str = "original"  # NORMALIZATIONS

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        """The settings from a config with these fields (TrainConfig), by name."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def packed_losses(logits: torch.Tensor, inputs: dict, s: LossSettings, block_norm=None, ar_norm=None):
    """(AR loss, consistency loss, student logits) from the logits (B, T, V) of one packed forward and the
    collator's index tensors: `cons_student_idx`/`cons_teacher_idx` (B, M) with `block_mask` for the consistency
    term, `ar_idx` (B, A) with `ar_target`/`ar_mask` for the AR term, `student_idx` (B, M) (slot i predicts token
    i of its block) for the returned student logits, and `n_blocks` (B,) (the original normalization divides an
    example's consistency mean by it, as the released Jacobi Forcing trainer does)."""
    vocab = logits.shape[-1]

    def pick(idx):  # (B, k) positions -> (B, k, V) logits
        return logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, vocab))

    scale = 1.0 / inputs["n_blocks"].clamp(min=1)
    cons = consistency_loss(pick(inputs["cons_student_idx"]), pick(inputs["cons_teacher_idx"]), inputs["block_mask"],
                            s.divergence, s.jsd_beta, s.temperature, Reduction(s.loss_normalization, block_norm, scale))
    ar = ar_loss(pick(inputs["ar_idx"]), inputs["ar_target"], inputs["ar_mask"], s.label_smoothing,
                 Reduction(s.loss_normalization, ar_norm))
    return ar, cons, pick(inputs["student_idx"])


def sampler_pairs(hidden: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a gated draft's sampler head reads in one packed forward: the draft's final hidden states (B, M, d) at
    the consistency student positions (noisy k_j[t]), the tokens (B, M) at the teacher positions (clean c_j[t]:
    the fixed point's token t, the one the base commits there) and the base's final hidden states (B, M, d) at
    the clean (gate 0) row that predicted that token (what a `base_input` head reads): the last gate-0 row before
    c_j[t]. For t = 0 that is the previous clean block's last row (or the prompt's), not c_j[0] - 1, which is the
    noisy block k_j's last row: the decoder's case when a forward commits one token."""
    d = hidden.shape[-1]
    idx, teacher = inputs["cons_student_idx"], inputs["cons_teacher_idx"]
    h = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
    base = hidden.gather(1, _clean_before(inputs).gather(1, teacher).unsqueeze(-1).expand(-1, -1, d))
    return h, inputs["input_ids"].gather(1, teacher), base


def _clean_before(inputs: dict) -> torch.Tensor:
    """(B, T): for each packed row, the last gate-0 row before it (the clean row that predicted its token; 0 for
    row 0)."""
    B, T = inputs["input_ids"].shape
    at = torch.arange(T, device=inputs["input_ids"].device).expand(B, T)
    last_clean = torch.where(inputs["gate"] == 0, at, torch.zeros_like(at)).cummax(dim=1).values  # (B, T)
    return torch.cat([last_clean[:, :1], last_clean[:, :-1]], dim=1)


def sampler_context(hidden: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What an attending sampler head reads in one packed forward, as decoding reads the committed text: every row
    s is a key with its token and f_prev (B, T, d), the base's final hidden state at the clean row that predicted
    it; the pair at teacher position c (B, M) sees the clean-stream rows 1 <= s <= c (the prompt and the clean
    blocks so far: `allowed` (B, M, T)) at distances position(c) - position(s) (B, M, T). Padding rows follow the
    real ones (`cllm.training.batch.pad_stream`), so s <= c leaves them out."""
    d = hidden.shape[-1]
    f_prev = hidden.gather(1, _clean_before(inputs).unsqueeze(-1).expand(-1, -1, d))  # (B, T, d)
    teacher, pos = inputs["cons_teacher_idx"], inputs["position_ids"]
    T = pos.shape[1]
    s = torch.arange(T, device=pos.device)
    allowed = (inputs["gate"] == 0)[:, None, :] & (s >= 1) & (s[None, None, :] <= teacher[..., None])  # (B, M, T)
    allowed[..., 0] |= ~allowed.any(-1)  # a padded pair (teacher 0) sees row 0, so its softmax stays finite
    dist = pos.gather(1, teacher)[..., None] - pos[:, None, :]  # (B, M, T)
    return f_prev, allowed, dist


def sampler_loss(head_logits: torch.Tensor, logits: torch.Tensor, inputs: dict, s: LossSettings,
                 block_norm=None) -> torch.Tensor:
    """The sampler head's term: its logits (B, M, V) at the consistency pairs against the base's at the teacher
    positions (from the packed logits (B, T, V)), with the draft's divergence, mask and normalization."""
    teacher = logits.gather(1, inputs["cons_teacher_idx"].unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    scale = 1.0 / inputs["n_blocks"].clamp(min=1)
    return consistency_loss(head_logits, teacher, inputs["block_mask"], s.divergence, s.jsd_beta, s.temperature,
                            Reduction(s.loss_normalization, block_norm, scale))


def base_kl_loss(logits: torch.Tensor, base_logits: torch.Tensor, inputs: dict, ar_norm=None,
                 normalization: str = "token") -> torch.Tensor:
    """KL(p_base || p_model) at the AR positions (`ar_idx` (B, A), `ar_mask`) from the packed logits (B, T, V) of
    the model and of the base. The AR loss pins only the argmax of the model's own greedy text and pushes the
    model towards one-hot on it; this term keeps the whole next-token distribution near the base's instead."""
    vocab = logits.shape[-1]
    idx = inputs["ar_idx"].unsqueeze(-1).expand(-1, -1, vocab)
    return consistency_loss(logits.gather(1, idx), base_logits.gather(1, idx), inputs["ar_mask"], "forward_kl",
                            reduction=Reduction(normalization, ar_norm))
