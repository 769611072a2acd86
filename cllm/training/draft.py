"""Draft models for SpS and MTAD: a draft cut out of the target, its distillation data and the distillation run.

(A draft must speak the target's vocabulary; `cllm.models.check_draft_compatible` says exactly what differs.)
No small SmolLM2 exists offline, so `build_draft` makes one from the target itself: the same embeddings, final
norm and LM head, and a few of its decoder layers (evenly spaced, first and last included). `DistillTrainer` then
trains it to match the target's next-token distributions (forward KL) on text from the datasets.
"""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from cllm.config import to_dict
from cllm.errors import CllmError
from cllm.training.config import DraftConfig
from cllm.training.losses import consistency_loss, divergence
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
    from cllm.training.records import read_records

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


def held_out_indices(n_total: int, n: int, seed: int = 0) -> set[int]:
    """Which of `n_total` sequences are held out of training: `n` of them, a seeded draw over all the text, so
    every source is represented."""
    if n == 0:
        return set()
    if n >= n_total:
        raise CllmError(f"--held-out {n}: the distillation text has only {n_total} sequences (give fewer, "
                        "or 0 to skip the held-out report)")
    return set(random.Random(seed).sample(range(n_total), n))


@torch.no_grad()
def held_out_metrics(draft, target, sequences: list[list[int]], pad_id: int, token_ids: list[int] | None = None,
                     batch_size: int = 4) -> dict:
    """Teacher-forced comparison of the draft with the target at every position of `sequences`: the share of
    positions where their argmax agree, and the mean forward KL(p_target || q_draft) in nats. With `token_ids` (a
    pruned head), also the agreement of the draft's argmax over those ids only, which is what it then proposes."""
    device = next(draft.parameters()).device
    collate, ids = PadCollator(pad_id), None if token_ids is None else torch.tensor(token_ids, device=device)
    positions = agree = agree_pruned = 0
    kl = 0.0
    was_training = draft.training
    draft.eval()
    for i in range(0, len(sequences), batch_size):
        batch = {k: v.to(device) for k, v in collate([{"input_ids": s} for s in sequences[i : i + batch_size]]).items()}
        q = draft(**batch, use_cache=False).logits.float()  # (B, T, V)
        p = target(**batch, use_cache=False).logits.float()  # (B, T, V)
        mask = batch["attention_mask"].bool()  # (B, T)
        best = p.argmax(-1)  # (B, T)
        positions += int(mask.sum())
        agree += int(((q.argmax(-1) == best) & mask).sum())
        kl += float((divergence(p, q, "forward_kl") * mask).sum())
        if ids is not None:
            agree_pruned += int(((ids[q[..., ids].argmax(-1)] == best) & mask).sum())
    draft.train(was_training)
    out = {"sequences": len(sequences), "positions": positions, "top1_agreement": agree / max(positions, 1),
           "kl": kl / max(positions, 1)}
    if ids is not None:
        out["top1_agreement_pruned"] = agree_pruned / max(positions, 1)
    return out


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


def train_draft(cfg: DraftConfig) -> dict:
    """Cut (or load) the draft, distil it on the target, save it with cllm_draft.json; returns the summary."""
    import torch
    from transformers import TrainingArguments

    from cllm.models import load_model
    from cllm.training.checkpoints import resume_checkpoint, seal_callback

    target, tok = load_model(cfg.model, dtype="fp32", device="cpu")
    sequences = dataset_sequences(tok, cfg.datasets, cfg.split, cfg.data_dir, cfg.limit) if cfg.datasets else []
    own = trajectory_sequences(cfg.data) if cfg.data else []
    texts = sequences + own
    held = held_out_indices(len(texts), cfg.held_out)
    held_out = [texts[i][: cfg.max_seq_len] for i in sorted(held)]
    dataset = SequenceDataset([s for i, s in enumerate(texts) if i not in held], cfg.max_seq_len)
    # the pruned head counts the target's own training answers where there are some
    own_train = [s for i, s in enumerate(texts) if i >= len(sequences) and i not in held]
    subset = _vocab_subset(cfg, tok, own_train or dataset.items)
    draft, layers = _draft_model(cfg, target, tok)
    n_trainable = freeze_shared(draft)
    before = held_out_metrics(draft, target, held_out, tok.pad_token_id, subset) if held_out else None
    draft.config.use_cache = False
    draft.train()

    resume_from = resume_checkpoint(cfg.output_dir, "cllm train-draft") if cfg.resume else None
    args = TrainingArguments(**{"use_cpu": not torch.cuda.is_available(), **cfg.training_arguments()})
    trainer = DistillTrainer(model=draft, args=args, train_dataset=dataset, data_collator=PadCollator(tok.pad_token_id),
                             processing_class=tok, teacher=target, kl_temperature=cfg.kl_temperature)
    trainer.teacher.to(args.device)
    trainer.add_callback(seal_callback())
    result = trainer.train(resume_from_checkpoint=resume_from)

    out = Path(cfg.output_dir)
    draft.config.use_cache = True
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    log = trainer.state.log_history
    summary = {
        "draft_layers": layers,
        "target_layers": target.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in draft.parameters()),
        "trainable_parameters": n_trainable,
        "sequences": len(dataset),
        "tokens": sum(len(s) for s in dataset.items),
        "steps": trainer.state.global_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "final_loss": next((h["loss"] for h in reversed(log) if "loss" in h), None),
        "final_top1_agreement": next((h["top1_agreement"] for h in reversed(log) if "top1_agreement" in h), None),
        "held_out_before": before,
        "held_out": held_out_metrics(draft, target, held_out, tok.pad_token_id, subset) if held_out else None,
    }
    if subset is not None:
        summary["vocab_subset"] = subset
    (out / "cllm_draft.json").write_text(json.dumps({"config": to_dict(cfg), "summary": summary}, indent=2) + "\n")
    (out / "log_history.json").write_text(json.dumps(log, indent=1) + "\n")
    return summary


def _vocab_subset(cfg: DraftConfig, tok, text: list[list[int]]) -> list[int] | None:
    """The pruned head's ids (--vocab-subset): the most frequent of the training text (the target's own outputs
    when --data is given), plus the special tokens; None for a full-vocabulary draft."""
    if not cfg.vocab_subset:
        return None
    from cllm.decoding.pruned_draft import frequent_tokens

    specials = [i for i in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) if i is not None]
    return frequent_tokens(text, cfg.vocab_subset, always=specials)


def _draft_model(cfg: DraftConfig, target, tok):
    """(draft, the target layers it keeps): loaded from --init (checked against the target) or cut out of it."""
    from cllm.models import check_draft_compatible, load_model

    if cfg.init:
        draft, draft_tok = load_model(cfg.init, dtype="fp32", device="cpu")
        check_draft_compatible(target, tok, draft, draft_tok)
        return draft, (getattr(draft.config, "cllm_draft", None) or {}).get("target_layers")
    layers = spread_layers(target.config.num_hidden_layers, cfg.draft_layers)
    return build_draft(target, layers), layers
