"""`cllm train` / `train/train_cllm.py`: fine-tune a model on its Jacobi trajectories (CLLM or Jacobi Forcing).

Runs under plain python, `torchrun`, `accelerate launch` and `deepspeed` (pass `--deepspeed configs/deepspeed/*.json`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cllm import config
from cllm.config import opt
from cllm.errors import CllmError


@dataclass
class TrainConfig:
    model: str = opt("smollm2-135m", "model to train: alias, local folder, HF id or .gguf")
    data: list = opt([], "`cllm gen` output folders or .jsonl record files")
    output_dir: str | None = opt(None, "checkpoints and the final (merged) model")
    block_size: int = opt(16, "Jacobi block size n; must match the data")
    objective: str = opt("cllm", "cllm: one trajectory state per example (CLLM paper); jacobi_forcing: whole "
                                 "responses packed as noisy/clean block pairs (Jacobi Forcing)",
                         ("cllm", "jacobi_forcing"))
    noise_window: int = opt(16, "jacobi_forcing: window w of the progressive noise schedule "
                                "t_j = linspace(0, 1, w)[j mod w]")
    noise_shifts: int = opt(1, "jacobi_forcing: examples per response, the schedule shifted by 0 .. this-1 blocks "
                               "(1 = the paper; noise_window = every block at every noise level once per epoch)")
    noisy_context: str = opt("noisy", "jacobi_forcing: what a noisy block attends to before itself: the earlier "
                                      "noisy blocks (paper, for multi-block decoding) or the clean ones (the "
                                      "context of single-block Jacobi decoding: the CLLM global loss of every "
                                      "block in one forward)", ("noisy", "clean"))
    max_blocks: int = opt(0, "jacobi_forcing: pack at most this many blocks of a response (0 = all)")
    consistency: str = opt("global", "teacher state: global (fixed point y*) or local (successor y(j+1))",
                           ("global", "local"))
    divergence: str = opt("forward_kl", "forward_kl (paper), reverse_kl or jsd", ("forward_kl", "reverse_kl", "jsd"))
    jsd_beta: float = opt(0.5, "beta of the generalized JSD")
    temperature: float = opt(1.0, "softmax temperature of the consistency divergence")
    ar_weight: float = opt(10.0, "weight of the AR loss (paper: 10)")
    consistency_weight: float = opt(1.0, "weight of the consistency loss (paper: 1)")
    ar_target: str = opt("fixed_point", "AR loss on the block's fixed point, or on ground-truth labels when present",
                         ("fixed_point", "labels"))
    label_smoothing: float | None = opt(None, "label smoothing of the AR loss (default: the released trainers': "
                                              "0.1 for cllm, 0 for jacobi_forcing)")
    loss_normalization: str = opt("original", "original: the released trainers' scales (per example, the mean over "
                                              "its counted positions, the Jacobi Forcing consistency mean divided "
                                              "by the number of blocks packed; examples averaged); token: every "
                                              "loss a sum over the accumulation window's positions divided by "
                                              "their number", ("original", "token"))
    consistency_positions: str = opt("original", "logits the consistency loss counts: original (the released "
                                                 "trainers': from the first mismatch of the state on; Jacobi "
                                                 "Forcing: the logits at the noisy tokens from the first "
                                                 "mismatched one) or block (the block's n predictions; Jacobi "
                                                 "Forcing from the one of the first mismatched token)",
                                     ("original", "block"))
    ar_scope: str = opt("prompt_and_answer", "AR loss pairs: prompt_and_answer (the released trainers: the "
                                             "prompt's next-token pairs too) or answer (the paper's L_AR, "
                                             "conditioned on the prompt)", ("prompt_and_answer", "answer"))
    base_kl_weight: float = opt(0.0, "weight of KL(base || model) at the AR positions, the base being the model "
                                     "with its LoRA adapter switched off (one extra forward without gradient): "
                                     "keeps the next-token distributions near the base's, where the AR loss "
                                     "pins only their argmax (needs use_peft; 0 = off)")
    state_sampling: str = opt("uniform", "one uniformly drawn state per block and epoch (paper), or all states",
                              ("uniform", "all"))
    use_aug: bool = opt(False, "also train on the records' aug_states")
    max_prompts: int = opt(0, "train on the blocks of the first this many prompts of the data only (0 = all; "
                              "the number-of-prompts lever of an ablation)")
    max_context_tokens: int = opt(1024, "keep only the last this many context tokens of a record")
    use_peft: bool = opt(False, "train a LoRA adapter (merged into the saved model at the end)")
    init_adapter: str | None = opt(None, "with use_peft: continue training this LoRA adapter folder (a later "
                                         "round), so the result stays one adapter on the base model")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "comma-separated module names, or all-linear")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    bf16: bool = opt(False, "bf16 mixed precision (autocast; fp32 master weights)")
    learning_rate: float = opt(2e-5, "peak learning rate (LoRA wants ~1e-4)")
    lr_scheduler_type: str = opt("cosine", "transformers scheduler name")
    warmup_steps: int = opt(0, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    per_device_train_batch_size: int = opt(1, "examples per device and micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    num_train_epochs: float = opt(1.0, "epochs (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "optimizer steps; -1 = by epochs")
    logging_steps: int = opt(10, "log every this many steps")
    save_steps: int = opt(100, "checkpoint every this many steps")
    save_total_limit: int = opt(2, "checkpoints kept (older ones are rotated out)")
    seed: int = opt(42, "training seed")
    deepspeed: str | None = opt(None, "DeepSpeed JSON config (configs/deepspeed/)")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    report_to: str = opt("none", "none, tensorboard (offline), wandb, ...")
    jacobi_eval_steps: int = opt(0, "every this many steps, measure Jacobi tokens per forward on a few training "
                                    "prompts and log it (0 = off)")
    jacobi_eval_prompts: int = opt(4, "prompts for that probe")
    jacobi_eval_held_out: int = opt(0, "with --max-prompts: also probe this many prompts of the data that training "
                                       "leaves out (the next data_ids), logged as jacobi/held_out_tokens_per_forward: "
                                       "a generalisation curve at the cost of a few decodes")
    dataloader_num_workers: int = opt(0, "data loader worker processes")

    def validate(self) -> None:
        if not self.data:
            raise CllmError("--data is required (a `cllm gen` output folder or .jsonl files)")
        if not self.output_dir:
            raise CllmError("--output-dir is required")
        if self.max_prompts < 0:
            raise CllmError(f"--max-prompts must be >= 0, got {self.max_prompts}")
        for name in ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r",
                     "logging_steps", "save_steps", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise CllmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.ar_weight < 0 or self.consistency_weight < 0 or self.ar_weight + self.consistency_weight == 0:
            raise CllmError("--ar-weight and --consistency-weight must be >= 0 and not both 0")
        if self.base_kl_weight < 0:
            raise CllmError(f"--base-kl-weight must be >= 0, got {self.base_kl_weight}")
        if self.base_kl_weight > 0 and not self.use_peft:
            raise CllmError("--base-kl-weight needs --use-peft: the base is the model with its LoRA adapter "
                            "switched off (full fine-tuning would need a second, frozen copy of the model)")
        if not 0 < self.jsd_beta < 1:
            raise CllmError(f"--jsd-beta must be in (0, 1), got {self.jsd_beta}")
        if self.temperature <= 0:
            raise CllmError(f"--temperature must be > 0, got {self.temperature}")
        if self.label_smoothing is None:
            self.label_smoothing = 0.1 if self.objective == "cllm" else 0.0
        if not 0 <= self.label_smoothing < 1:
            raise CllmError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.objective == "jacobi_forcing":
            if self.ar_target != "fixed_point" or self.consistency != "global" or self.use_aug:
                raise CllmError("--objective jacobi_forcing trains AR on the clean stream against the fixed points: "
                                "it takes neither --ar-target labels, --consistency local nor --use-aug")
            if self.noise_window < 1 or self.max_blocks < 0:
                raise CllmError("--noise-window must be >= 1 and --max-blocks >= 0")
            if not 1 <= self.noise_shifts <= self.noise_window:
                raise CllmError(f"--noise-shifts must be in 1 .. --noise-window ({self.noise_window}), "
                                f"got {self.noise_shifts}")
        if self.jacobi_eval_held_out < 0:
            raise CllmError(f"--jacobi-eval-held-out must be >= 0, got {self.jacobi_eval_held_out}")
        if self.jacobi_eval_held_out and not (self.max_prompts and self.jacobi_eval_steps > 0):
            raise CllmError("--jacobi-eval-held-out needs --max-prompts (the prompts left out are the held-out ones) "
                            "and --jacobi-eval-steps > 0")
        if self.init_adapter and not (self.use_peft and Path(self.init_adapter, "adapter_config.json").is_file()):
            raise CllmError(f"--init-adapter needs --use-peft and an adapter folder: {self.init_adapter}")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise CllmError(f"DeepSpeed config not found: {self.deepspeed}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, TrainConfig)


def run(args) -> None:
    given = {k: v for k, v in vars(args).items() if k != "command"}
    cfg = config.resolve(TrainConfig, given)
    try:
        train(cfg)
    except CllmError:
        sys.stderr.write("\n")  # end the progress bar's line so the error stands on its own
        raise


def _prepare_environment(cfg: TrainConfig) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: gloo, no CUDA probing
    if cfg.deepspeed and "RANK" not in os.environ:
        # A plain `python train_cllm.py --deepspeed ...` is a world of one; DeepSpeed wants the env set.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", "29591")})


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


def train(cfg: TrainConfig) -> dict:
    """Train and save; returns the final training metrics. `cllm decode --model OUTPUT_DIR` loads the result."""
    _prepare_environment(cfg)
    import torch
    import torch.distributed as dist
    from transformers import TrainingArguments

    from cllm.training.jacobi_forcing import JacobiForcingCollator, JacobiForcingDataset
    from cllm.models import load_model
    from cllm.training.train_data import PackedCollator, TrajectoryDataset, check_records, first_prompts, read_records
    from cllm.training.losses import LossSettings
    from cllm.training.trainer import CllmTrainer

    records = read_records(cfg.data)
    held_out = []
    if cfg.max_prompts:
        kept = first_prompts(records, cfg.max_prompts)
        if cfg.jacobi_eval_held_out:
            kept_ids = {r["data_id"] for r in kept}
            held_out = [r for r in records if r["data_id"] not in kept_ids]  # the prompts training leaves out
            n_held_out = len({r["data_id"] for r in held_out})
            if n_held_out < cfg.jacobi_eval_held_out:
                raise CllmError(f"--jacobi-eval-held-out {cfg.jacobi_eval_held_out}: the data holds only {n_held_out} "
                                f"prompts beyond --max-prompts {cfg.max_prompts} ({', '.join(map(str, cfg.data))})")
        records = kept
    model, tok = load_model(cfg.model, dtype="fp32", device=None)
    check_records(records, cfg.block_size, model.config.vocab_size, where=", ".join(map(str, cfg.data)))
    if cfg.objective == "jacobi_forcing":
        dataset = JacobiForcingDataset(records, cfg.noise_window, cfg.max_blocks or None, cfg.max_context_tokens,
                                       cfg.noise_shifts)
        collator = JacobiForcingCollator(tok.pad_token_id, cfg.block_size, noisy_context=cfg.noisy_context,
                                         consistency_positions=cfg.consistency_positions, ar_scope=cfg.ar_scope)
    else:
        for r in records:  # bound the memory of long contexts: keep the context's end
            if len(r["prompt_ids"]) > cfg.max_context_tokens:
                cut = len(r["prompt_ids"]) - cfg.max_context_tokens
                r["prompt_ids"] = r["prompt_ids"][cut:]
                r["prompt_len"] = max(1, r["prompt_len"] - cut)
        dataset = TrajectoryDataset(records, cfg.state_sampling, cfg.consistency, cfg.use_aug)
        collator = PackedCollator(tok.pad_token_id, cfg.block_size, cfg.ar_target,
                                  consistency_positions=cfg.consistency_positions, ar_scope=cfg.ar_scope)

    if cfg.use_peft and cfg.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    elif cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if cfg.lora_target_modules == "all-linear" else cfg.lora_target_modules.split(",")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    model.config.use_cache = False

    resume_from = None
    if cfg.resume:
        resume_from = _last_checkpoint(cfg.output_dir)
        if resume_from is None:
            print(f"[cllm train] --resume: no checkpoint in {cfg.output_dir}, starting from scratch", file=sys.stderr)

    args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        deepspeed=cfg.deepspeed,
        report_to=[] if cfg.report_to == "none" else cfg.report_to.split(","),
        remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_num_workers,
        save_only_model=False,
        use_cpu=not torch.cuda.is_available(),
    )
    probe = _jacobi_probe(cfg, records, tok, held_out) if cfg.jacobi_eval_steps > 0 else None
    trainer = CllmTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tok,
        loss_settings=LossSettings(cfg.ar_weight, cfg.consistency_weight, cfg.divergence, cfg.jsd_beta,
                                   cfg.temperature, cfg.label_smoothing, cfg.base_kl_weight,
                                   cfg.loss_normalization),
        jacobi_probe=probe,
    )
    step0 = int(Path(resume_from).name.split("-")[-1]) if resume_from else 0
    trainer.add_callback(_cost_callback(cfg, step0))
    result = trainer.train(resume_from_checkpoint=resume_from)
    _save_final(cfg, trainer, tok)
    if dist.is_initialized():
        dist.barrier()
        # Free the DeepSpeed engine (and the gloo work and tensors it holds) while the interpreter is whole, then
        # the groups: left to interpreter exit, their teardown can abort the process (ZeRO-3 offload, bf16).
        del trainer, model
        gc.collect()
        dist.destroy_process_group()
    return result.metrics


class CostLog:
    """Wall and CPU seconds (this process, all threads; rank 0) of each run segment in train_cost.json, updated at
    every checkpoint and at the end, so a killed run still counts the steps its checkpoints kept."""

    def __init__(self, output_dir: str, step0: int):
        self.path = Path(output_dir) / "train_cost.json"
        self.t0, self.c0, self.step0 = time.perf_counter(), time.process_time(), step0
        cost = json.loads(self.path.read_text()) if self.path.is_file() else {"segments": []}
        # A segment that ran past the checkpoint we resume from is cut back to it (those steps are redone).
        self.segments = [s for s in cost["segments"] if s["from_step"] < step0]
        if self.segments and self.segments[-1]["to_step"] > step0:
            self.segments[-1]["to_step"] = step0

    def update(self, step: int, world_size: int) -> None:
        seg = {"from_step": self.step0, "to_step": step, "wall_seconds": round(time.perf_counter() - self.t0, 2),
               "cpu_seconds": round(time.process_time() - self.c0, 2), "world_size": world_size}
        segments = self.segments + [seg]
        cost = {"segments": segments,
                "wall_seconds": round(sum(s["wall_seconds"] for s in segments), 2),
                "cpu_seconds": round(sum(s["cpu_seconds"] for s in segments), 2)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(cost, indent=1) + "\n")


def _cost_callback(cfg: TrainConfig, step0: int):
    from transformers import TrainerCallback

    log = CostLog(cfg.output_dir, step0)

    class _Cost(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                log.update(state.global_step, args.world_size)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                log.update(state.global_step, args.world_size)

    return _Cost()


def _save_final(cfg: TrainConfig, trainer, tok) -> None:
    """A full model in output_dir (LoRA merged), loadable by `cllm decode --model OUTPUT_DIR`."""
    out = Path(cfg.output_dir)
    if cfg.use_peft:
        adapter_dir = out / "adapter"
        trainer.save_model(str(adapter_dir))  # the adapter only (gathered under ZeRO-3)
        if trainer.is_world_process_zero():
            from peft import PeftModel

            from cllm.models import load_model

            # Merge into a fresh copy of the base: works the same after any backend (DDP, ZeRO-2/3).
            base, _ = load_model(cfg.model, dtype="fp32", device="cpu")
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
            merged.save_pretrained(out)
    else:
        trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tok.save_pretrained(out)
        (out / "cllm_train.json").write_text(json.dumps(config.to_dict(cfg), indent=2) + "\n")
        history = [h for h in trainer.state.log_history]
        (out / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")


def _jacobi_probe(cfg: TrainConfig, records: list[dict], tok, held_out: list[dict] = ()):
    """Every `jacobi_eval_steps`: Jacobi tokens per forward on a few training prompts (held-in) and, with
    `jacobi_eval_held_out`, on as many prompts training never sees."""
    import torch

    from cllm.decoding import jacobi_decode

    sets = {"jacobi/tokens_per_forward": _first_prompt_ids(records, cfg.jacobi_eval_prompts)}
    if cfg.jacobi_eval_held_out:
        sets["jacobi/held_out_tokens_per_forward"] = _first_prompt_ids(held_out, cfg.jacobi_eval_held_out)

    def probe(model, step: int) -> dict:
        if step == 0 or step % cfg.jacobi_eval_steps:
            return {}
        was_training = model.training
        model.eval()
        out = {}
        with torch.no_grad():
            for key, prompts in sets.items():
                res = jacobi_decode(model, tok, prompts, cfg.block_size, 4 * cfg.block_size)
                out[key] = round(sum(r.n_new_tokens for r in res) / sum(r.n_forwards for r in res), 4)
        if was_training:
            model.train()
        return out

    return probe


def _first_prompt_ids(records: list[dict], n: int) -> list[list[int]]:
    """The prompt token ids of the n first prompts of `records` by data_id (the order --max-prompts keeps), so the
    held-out probe decodes the data_ids right after the training ones whatever order the files list them in."""
    from cllm.data.trajectories import data_id_order, first_ids

    keep, prompts = first_ids((r["data_id"] for r in records), n), {}
    for r in records:
        if r["data_id"] in keep:
            prompts.setdefault(r["data_id"], r["prompt_ids"][: r["prompt_len"]])
    return [prompts[i] for i in sorted(prompts, key=data_id_order)]
