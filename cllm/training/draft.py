"""Draft models for SpS and MTAD: the compatibility check, a draft cut out of the target, and distillation data.

A draft must speak the target's vocabulary: same tokenizer vocabulary, same special tokens and the same logit
width, or its proposals are meaningless ids. `check_draft_compatible` says exactly what differs.

No small SmolLM2 exists offline, so `build_draft` makes one from the target itself: the same embeddings, final
norm and LM head, and a few of its decoder layers (evenly spaced, first and last included). `DistillTrainer` then
trains it to match the target's next-token distributions (forward KL) on text from the datasets.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from transformers import Trainer

from cllm.errors import CllmError
from cllm.training.losses import consistency_loss
from cllm.training.trainer import flush_metrics


def _layer_list(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise CllmError(f"cannot find the decoder layers of {type(model).__name__} (expected model.get_decoder().layers)")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return layers, prefix


def spread_layers(n_total: int, n_keep: int) -> list[int]:
    """`n_keep` layer indices evenly spaced over 0..n_total-1, first and last included."""
    if not 1 <= n_keep <= n_total:
        raise CllmError(f"a draft needs between 1 and {n_total} layers, got {n_keep}")
    if n_keep == 1:
        return [n_total - 1]
    return sorted({round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)})


def build_draft(target, layers: list[int]):
    """A model of the target's class with only `layers` of its decoder layers (weights copied, in that order);
    embeddings, final norm and LM head are copies of the target's."""
    all_layers, prefix = _layer_list(target)
    if not layers or any(not 0 <= i < len(all_layers) for i in layers):
        raise CllmError(f"draft layers {layers} out of range for a target with {len(all_layers)} layers")
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):  # per-layer attention kinds (Qwen, Gemma): keep those of the kept layers
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    cfg.cllm_draft = {"target_layers": list(layers), "target_num_layers": len(all_layers)}
    draft = type(target)(cfg).to(dtype=next(target.parameters()).dtype)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in target.state_dict().items():
        if key.startswith(prefix + "."):
            old, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}.{new_index[int(old)]}.{rest}"
        state[key] = value.clone()
    draft.load_state_dict(state, strict=True)
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.eval()


def freeze_shared(draft) -> int:
    """Freeze the embeddings and LM head (they stay equal to the target's); returns the trainable parameter count."""
    for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
        for p in module.parameters():
            p.requires_grad_(False)
    return sum(p.numel() for p in draft.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------- distillation


def dataset_sequences(tokenizer, names: list[str], split: str | None, data_dir, limit: int | None) -> list[list[int]]:
    """Token ids of chat-formatted prompts followed by the dataset's reference answer and EOS, where it has one
    (GSM8K solutions, ShareGPT replies); prompts alone otherwise."""
    from cllm.data.datasets import load_dataset_prompts
    from cllm.data.prompts import format_prompt

    out = []
    for name in names:
        for rec in load_dataset_prompts(name, split, data_dir, limit):
            ids = format_prompt(tokenizer, rec.prompt)
            if rec.answer:
                ids = ids + tokenizer(rec.answer, add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
            out.append(ids)
    return out


def trajectory_sequences(paths: list[str]) -> list[list[int]]:
    """Whole prompt + answer sequences rebuilt from `cllm gen` output: the target's own greedy answers."""
    from cllm.training.train_data import read_records

    last = {}
    for r in read_records(paths):
        key = r["data_id"]
        if key not in last or r["block_index"] > last[key]["block_index"]:
            last[key] = r
    return [r["prompt_ids"] + r["fixed_point"] for _, r in sorted(last.items(), key=lambda kv: str(kv[0]))]


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, sequences: list[list[int]], max_len: int):
        self.items = [s[:max_len] for s in sequences if len(s) >= 2]
        if not self.items:
            raise CllmError("no distillation sequences (every source was empty)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T), right-padded
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
        for i, b in enumerate(batch):
            input_ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            attention_mask[i, : len(b["input_ids"])] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class DistillTrainer(Trainer):
    """Trains the draft towards the frozen target: forward KL(p_target || q_draft) at every real position."""

    def __init__(self, *args, teacher=None, kl_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is None:
            raise ValueError("DistillTrainer needs a teacher model")
        self.teacher = teacher.eval().requires_grad_(False)
        self.kl_temperature = kl_temperature
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                          use_cache=False).logits  # (B, T, V)
        mask = inputs["attention_mask"].bool()
        loss = consistency_loss(out.logits, teacher_logits, mask, "forward_kl", temperature=self.kl_temperature)
        if not torch.isfinite(loss):
            raise CllmError(f"non-finite distillation loss at step {self.state.global_step + 1}")
        if model.training:
            with torch.no_grad():
                agree = (out.logits.argmax(-1) == teacher_logits.argmax(-1)) & mask
                self._metrics["top1_agreement"].append((agree.sum() / mask.sum().clamp(min=1)).item())
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        flush_metrics(self._metrics, logs)
        super().log(logs, start_time)
