"""`CllmTrainer`: a `transformers.Trainer` whose loss is ar_weight * AR + consistency_weight * consistency
(+ base_kl_weight * KL(base || model) at the AR positions, with a LoRA adapter).

Only public hooks are overridden: `compute_loss` (the objective), `log` (per-term metrics and the optional Jacobi
tokens-per-forward probe) and `get_batch_samples` (token counts of the whole gradient-accumulation window, so
that with `loss_normalization="token"` each loss is a sum over the window's tokens divided by their number, whatever
the micro-batch split). The objective itself (CLLM or Jacobi Forcing) lives in the collator: both pack an example
so that one forward gives the student, teacher and AR logits, and name their positions with the same index
tensors; the losses over them are `cllm.training.losses.packed_losses`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from cllm.errors import CllmError
from cllm.decoding.sampler_head import final_hidden, head_logits, packed_attention, sampler_of, save_sampler
from cllm.training.losses import (LossSettings, base_kl_loss, converged_prefix, packed_losses, sampler_context,
                                  sampler_loss, sampler_pairs)


def flush_metrics(metrics: dict[str, list[float]], logs: dict) -> None:
    """At a logging step (the one carrying `loss`), add the mean of each metric gathered since the last one."""
    if metrics and "loss" in logs:
        for k, v in metrics.items():
            logs[k] = round(sum(v) / len(v), 5)
        metrics.clear()


def adapter_off_logits(peft_model, model, inputs: dict) -> torch.Tensor:
    """Logits (B, T, V) of the same packed forward through `model` (the possibly wrapped `peft_model`) with the
    LoRA adapter switched off, i.e. the base model's, without gradient. At the AR positions the packed masks make
    them the base's plain causal logits of the clean text."""
    with torch.no_grad(), peft_model.disable_adapter():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], use_cache=False).logits


def _gate(model, gate):
    """The gated objective's batches carry a gate (B, T) for the gated LoRA adapter; the others run as they are."""
    import contextlib

    if gate is None:
        return contextlib.nullcontext()
    from cllm.decoding.gate import gated

    return gated(model, gate)


class CllmTrainer(Trainer):
    def __init__(self, *args, loss_settings: LossSettings | None = None, jacobi_probe=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_settings = loss_settings or LossSettings()
        self.jacobi_probe = jacobi_probe  # optional (model, step) -> dict of metrics, run at logging steps
        self._window = None
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self._window = {
                "block": sum(int(b["block_mask"].sum()) for b in batch_samples),
                "ar": sum(int(b["ar_mask"].sum()) for b in batch_samples),
                "steps": len(batch_samples),
            }
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.loss_settings
        inner = self.accelerator.unwrap_model(model)
        head = sampler_of(inner)
        with _gate(model, inputs.get("gate")), final_hidden(inner, head is not None) as hidden:
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        position_ids=inputs["position_ids"], use_cache=False)
        logits = out.logits  # (B, T, V)
        vocab = logits.shape[-1]
        block_norm = ar_norm = None
        if model.training and self._window and s.loss_normalization == "token":
            # Trainer divides the returned loss by the number of micro-batches; these normalizers undo that so the
            # window's loss is sum(tokens) / count(tokens).
            block_norm = self._window["block"] / self._window["steps"]
            ar_norm = self._window["ar"] / self._window["steps"]
        ar, cons, student = packed_losses(logits, inputs, s, block_norm, ar_norm)
        loss = s.ar_weight * ar + s.consistency_weight * cons
        base_kl = None
        if s.base_kl_weight > 0:
            base_logits = adapter_off_logits(self.accelerator.unwrap_model(model), model, inputs)
            base_kl = base_kl_loss(logits, base_logits, inputs, ar_norm, s.loss_normalization)
            del base_logits
            loss = loss + s.base_kl_weight * base_kl
        if head is not None:
            h, tokens, base = sampler_pairs(hidden[-1], inputs)
            attn = None
            if head.attn_heads:
                f_prev, allowed, dist = sampler_context(hidden[-1], inputs)
                attn = packed_attention(inner, head, inputs["input_ids"], f_prev, inputs["cons_teacher_idx"], dist,
                                        allowed)  # (B, M, d)
            sampled = head_logits(inner, head, h, tokens, base=base, attn=attn)  # (B, M, V)
            samp = sampler_loss(sampled, logits, inputs, s, block_norm)
            loss = loss + s.sampler_weight * samp
            if model.training:
                self._log_sampler(samp, sampled, logits, inputs)
        if not torch.isfinite(loss):
            raise CllmError(f"non-finite loss at step {self.state.global_step + 1}: ar={ar.item()}, "
                            f"consistency={cons.item()} (lower the learning rate or check the data)")
        if model.training:
            with torch.no_grad():
                self._metrics["loss/ar"].append(ar.item())
                self._metrics["loss/consistency"].append(cons.item())
                if base_kl is not None:
                    self._metrics["loss/base_kl"].append(base_kl.item())
                # Per block: (B, n) for the CLLM packing, (B, J, n) for Jacobi Forcing; `real_mask` marks the
                # real slots (`block_mask` is the consistency mask, which may skip a block's first slots).
                fixed = inputs["fixed_point"]
                real = inputs["real_mask"].view(fixed.shape)
                conv = converged_prefix(student.view(*fixed.shape, vocab), fixed, real).float()
                blocks = real.any(-1)
                self._metrics["tokens_converged"].append(conv[blocks].mean().item())
                if bool(inputs["clean_context"]):
                    # What the state already had right at its start (a committed prefix is not progress). Not
                    # logged for the paper's Jacobi Forcing: there a noisy block's context is the earlier *noisy*
                    # blocks, so even its right prefix need not be reproduced and the difference would read as
                    # a loss; with noisy_context=clean it means what it means for the CLLM packing.
                    had = ((inputs["state"] == fixed) & real).long().cumprod(-1).sum(-1)
                    self._metrics["tokens_gained"].append((conv - had.float())[blocks].mean().item())
        return (loss, out) if return_outputs else loss

    @torch.no_grad()
    def _log_sampler(self, samp, sampled, logits, inputs) -> None:
        """The head's loss, and how often its argmax and the draft's equal the base's where the draft is trained
        (the first guess token the decoder keeps comes from the one or the other)."""
        teacher = logits.gather(1, inputs["cons_teacher_idx"].unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        want, mask = teacher.argmax(-1), inputs["block_mask"]
        draft = logits.gather(1, inputs["cons_student_idx"].unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        n = mask.sum().clamp(min=1)
        self._metrics["loss/sampler"].append(samp.item())
        self._metrics["sampler/agree"].append(((sampled.argmax(-1) == want) & mask).sum().item() / n.item())
        self._metrics["draft/agree"].append(((draft.argmax(-1) == want) & mask).sum().item() / n.item())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model as Trainer saves it (a PEFT adapter: the adapter alone), and a gated draft's sampler head
        beside it (checkpoints included)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_sampler(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        flush_metrics(self._metrics, logs)
        if self.jacobi_probe is not None and "loss" in logs:
            logs.update(self.jacobi_probe(self.model, self.state.global_step))
        super().log(logs, start_time)
