"""`cllm train-draft` / `train/train_draft.py`: cut a small draft out of the target and distil it (for SpS / MTAD).

The draft keeps the target's embeddings and LM head (frozen, so they stay shared) and a few evenly spaced decoder
layers, trained with forward KL to the target's next-token distributions on dataset text (prompt + reference
answer) and/or on `cllm gen` output (the target's own answers). Resumable; `cllm decode --draft OUTPUT_DIR` loads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cllm import config
from cllm.config import opt
from cllm.errors import CllmError


@dataclass
class DraftConfig:
    model: str = opt("smollm2-135m", "target model: alias, local folder, HF id or .gguf")
    draft_layers: int = opt(4, "decoder layers the draft keeps (evenly spaced, first and last included)")
    init: str | None = opt(None, "start from this draft folder instead of cutting one out of the target")
    datasets: list = opt(["gsm8k", "sharegpt"], "datasets whose prompts (+ reference answers) are the text")
    split: str = opt("train", "dataset split where there are several (gsm8k: train|test)")
    data_dir: str | None = opt(None, "dataset root (default: $CLLM_DATA_DIR or ../shared/data)")
    limit: int | None = opt(None, "at most this many records per dataset")
    data: list = opt([], "`cllm gen` output folders: the target's own answers, added to the dataset text")
    max_seq_len: int = opt(512, "cut sequences to this many tokens")
    output_dir: str | None = opt(None, "checkpoints and the final draft")
    kl_temperature: float = opt(1.0, "softmax temperature of the KL")
    bf16: bool = opt(False, "bf16 autocast (fp32 master weights)")
    learning_rate: float = opt(3e-4, "peak learning rate")
    lr_scheduler_type: str = opt("cosine", "transformers scheduler name")
    warmup_steps: int = opt(10, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    per_device_train_batch_size: int = opt(4, "sequences per device and micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(300, "optimizer steps")
    logging_steps: int = opt(10, "log every this many steps")
    save_steps: int = opt(50, "checkpoint every this many steps")
    save_total_limit: int = opt(2, "checkpoints kept")
    seed: int = opt(42, "training seed")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    report_to: str = opt("none", "none, tensorboard (offline), wandb, ...")

    def validate(self) -> None:
        if not self.output_dir:
            raise CllmError("--output-dir is required")
        if not self.datasets and not self.data:
            raise CllmError("give --datasets and/or --data (cllm gen output) as the distillation text")
        for name in ("draft_layers", "max_seq_len", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise CllmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len < 2:
            raise CllmError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if self.kl_temperature <= 0:
            raise CllmError(f"--kl-temperature must be > 0, got {self.kl_temperature}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, DraftConfig)


def run(args) -> None:
    cfg = config.resolve(DraftConfig, {k: v for k, v in vars(args).items() if k != "command"})
    summary = train_draft(cfg)
    print(json.dumps(summary, indent=2))


def train_draft(cfg: DraftConfig) -> dict:
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from cllm.models import check_draft_compatible, load_model
    from cllm.training.draft import (DistillTrainer, PadCollator, SequenceDataset, build_draft, dataset_sequences,
                                     freeze_shared, spread_layers, trajectory_sequences)

    target, tok = load_model(cfg.model, dtype="fp32", device="cpu")
    sequences = dataset_sequences(tok, cfg.datasets, cfg.split, cfg.data_dir, cfg.limit) if cfg.datasets else []
    if cfg.data:
        sequences += trajectory_sequences(cfg.data)
    dataset = SequenceDataset(sequences, cfg.max_seq_len)

    if cfg.init:
        draft, draft_tok = load_model(cfg.init, dtype="fp32", device="cpu")
        check_draft_compatible(target, tok, draft, draft_tok)
        layers = (getattr(draft.config, "cllm_draft", None) or {}).get("target_layers")
    else:
        layers = spread_layers(target.config.num_hidden_layers, cfg.draft_layers)
        draft = build_draft(target, layers)
    n_trainable = freeze_shared(draft)
    n_total = sum(p.numel() for p in draft.parameters())
    draft.config.use_cache = False
    draft.train()

    resume_from = None
    if cfg.resume and Path(cfg.output_dir).is_dir():
        resume_from = get_last_checkpoint(cfg.output_dir)
    if cfg.resume and resume_from is None:
        print(f"[cllm train-draft] --resume: no checkpoint in {cfg.output_dir}, starting from scratch", file=sys.stderr)

    args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=cfg.bf16,
        report_to=[] if cfg.report_to == "none" else cfg.report_to.split(","),
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = DistillTrainer(model=draft, args=args, train_dataset=dataset, data_collator=PadCollator(tok.pad_token_id),
                             processing_class=tok, teacher=target, kl_temperature=cfg.kl_temperature)
    trainer.teacher.to(args.device)
    result = trainer.train(resume_from_checkpoint=resume_from)

    out = Path(cfg.output_dir)
    draft.config.use_cache = True
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    summary = {
        "draft_layers": layers,
        "target_layers": target.config.num_hidden_layers,
        "parameters": n_total,
        "trainable_parameters": n_trainable,
        "sequences": len(dataset),
        "tokens": sum(len(s) for s in dataset.items),
        "steps": trainer.state.global_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "final_top1_agreement": next((h["top1_agreement"] for h in reversed(trainer.state.log_history)
                                      if "top1_agreement" in h), None),
    }
    (out / "cllm_draft.json").write_text(json.dumps({"config": config.to_dict(cfg), "summary": summary}, indent=2) + "\n")
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    return summary
