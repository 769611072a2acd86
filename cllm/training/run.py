"""Training a consistency LLM: the dataset for the objective, the model (LoRA or full), the trainer, the run.

`train(cfg)` is what `cllm train` and `train/train_cllm.py` call; it runs under plain python, `torchrun`,
`accelerate launch` and `deepspeed` (`--deepspeed configs/deepspeed/*.json`).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

from cllm import config
from cllm.errors import CllmError
from cllm.fileio import atomic_write_text
from cllm.training.checkpoints import check_kind, resume_checkpoint, seal_callback
from cllm.training.config import TrainConfig


def _prepare_environment(cfg: TrainConfig) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: gloo, no CUDA probing
    if cfg.trainer.get("deepspeed") and "RANK" not in os.environ:
        # A plain `python train_cllm.py --deepspeed ...` is a world of one; DeepSpeed wants the env set.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", "29591")})


def build_dataset(cfg: TrainConfig, tok, vocab_size: int):
    """(dataset, collator, records, held-out records) for the objective; the records are checked first."""
    from cllm.training.records import check_records, drop_looping, read_records, split_blocks

    records = read_records(cfg.data)
    if cfg.split_blocks:
        records = split_blocks(records, cfg.block_size, where=", ".join(map(str, cfg.data)))
    if cfg.drop_looping:
        records, dropped = drop_looping(records)
        print(f"[cllm train] --drop-looping: left out {len(dropped)} looping responses "
              f"({len({r['data_id'] for r in records})} kept)", file=sys.stderr)
    records, held_out = _select_prompts(cfg, records)
    check_records(records, cfg.block_size, vocab_size, where=", ".join(map(str, cfg.data)))
    dataset, collator = OBJECTIVES[cfg.objective](cfg, tok, records)
    return dataset, collator, records, held_out


def _cllm_data(cfg: TrainConfig, tok, records: list[dict]):
    """CLLM: one trajectory state per example, packed with its block's teacher (`objectives.cllm`)."""
    from cllm.training.objectives.cllm import PackedCollator, TrajectoryDataset

    for r in records:  # bound the memory of long contexts: keep the context's end
        if len(r["prompt_ids"]) > cfg.max_context_tokens:
            cut = len(r["prompt_ids"]) - cfg.max_context_tokens
            r["prompt_ids"] = r["prompt_ids"][cut:]
            r["prompt_len"] = max(1, r["prompt_len"] - cut)
    dataset = TrajectoryDataset(records, cfg.state_sampling, cfg.consistency, cfg.use_aug,
                                seed=cfg.seed)
    collator = PackedCollator(tok.pad_token_id, cfg.block_size, cfg.ar_target,
                              consistency_positions=cfg.consistency_positions, ar_scope=cfg.ar_scope)
    return dataset, collator


def _jacobi_forcing_data(cfg: TrainConfig, tok, records: list[dict]):
    """Jacobi Forcing: whole responses as noisy/clean block pairs (`jacobi_forcing`)."""
    from cllm.training.objectives.jacobi_forcing import JacobiForcingCollator, JacobiForcingDataset

    dataset = JacobiForcingDataset(records, cfg.noise_window, cfg.max_blocks or None, cfg.max_context_tokens,
                                   cfg.noise_shifts)
    collator = JacobiForcingCollator(tok.pad_token_id, cfg.block_size, noisy_context=cfg.noisy_context,
                                     consistency_positions=cfg.consistency_positions, ar_scope=cfg.ar_scope)
    return dataset, collator


def _gated_data(cfg: TrainConfig, tok, records: list[dict]):
    """Gated: Jacobi Forcing's clean-context packing, the noisy blocks at gate 1 (`gated`)."""
    from cllm.training.objectives.gated import GatedCollator
    from cllm.training.objectives.jacobi_forcing import JacobiForcingDataset

    dataset = JacobiForcingDataset(records, cfg.noise_window, cfg.max_blocks or None, cfg.max_context_tokens,
                                   cfg.noise_shifts)
    return dataset, GatedCollator(tok.pad_token_id, cfg.block_size, cfg.draft_input, cfg.mask_token_id)


# objective -> (cfg, tokenizer, records) -> (dataset, collator whose batches honour `cllm.training.batch`)
OBJECTIVES = {"cllm": _cllm_data, "jacobi_forcing": _jacobi_forcing_data, "gated": _gated_data}


def _select_prompts(cfg: TrainConfig, records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the records of the first --max-prompts prompts, the records of the prompts left out for the held-out probe)."""
    from cllm.training.records import first_prompts

    if not cfg.max_prompts:
        return records, []
    kept = first_prompts(records, cfg.max_prompts)
    if not cfg.jacobi_eval_held_out:
        return kept, []
    kept_ids = {r["data_id"] for r in kept}
    held_out = [r for r in records if r["data_id"] not in kept_ids]
    n_held_out = len({r["data_id"] for r in held_out})
    if n_held_out < cfg.jacobi_eval_held_out:
        raise CllmError(f"--jacobi-eval-held-out {cfg.jacobi_eval_held_out}: the data holds only {n_held_out} "
                        f"prompts beyond --max-prompts {cfg.max_prompts} ({', '.join(map(str, cfg.data))})")
    return kept, held_out


def build_model(cfg: TrainConfig):
    """(model, tokenizer): the base in fp32, wrapped in a new or continued LoRA adapter with use_peft."""
    from transformers import set_seed

    from cllm.models import load_model

    model, tok = load_model(cfg.model, dtype="fp32", device=None)
    set_seed(cfg.seed)  # a new adapter's random initialisation is part of the run: the same in every run
    if cfg.use_peft and cfg.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    elif cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        from cllm.training.config import lora_layer_indices

        layers = lora_layer_indices(cfg.lora_layers, model.config.num_hidden_layers)
        targets = lora_targets(model, cfg.lora_target_modules, layers)
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                 layers_to_transform=layers, task_type="CAUSAL_LM"))
    if cfg.objective == "gated":
        from cllm.decoding.gate import attach_gate

        attach_gate(model, enabled=True)  # every training forward sets its gate (the batch's `gate`)
        if cfg.sampler_head:
            _sampler_head(cfg, model)
    model.config.use_cache = False
    return model, tok


def _sampler_head(cfg: TrainConfig, model) -> None:
    """The draft's sampler head: --init-adapter's when it has one, else a new one; with train_adapter false the
    LoRA weights are frozen, so only the head learns (and no gradient runs back through the model)."""
    from cllm.decoding.sampler_head import load_sampler, new_sampler

    head = load_sampler(model, cfg.init_adapter) if cfg.init_adapter else None
    if head is None:
        new_sampler(model, base_input=cfg.sampler_base, attn_heads=cfg.sampler_attn_heads)
    elif head.base_input != cfg.sampler_base:
        raise CllmError(f"--init-adapter {cfg.init_adapter}'s sampler head "
                        f"{'reads' if head.base_input else 'does not read'} the base's hidden state: "
                        f"--sampler-base {str(head.base_input).lower()}")
    elif head.attn_heads != cfg.sampler_attn_heads:
        raise CllmError(f"--init-adapter {cfg.init_adapter}'s sampler head has {head.attn_heads} attention heads: "
                        f"--sampler-attn-heads {head.attn_heads}")
    if not cfg.train_adapter:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)


def lora_targets(model, target_modules: str, layers: list[int] | None):
    """PEFT's target_modules for `--lora-target-modules` (comma-separated or all-linear) on `layers` (None: all):
    PEFT takes layers_to_transform with a list of names only, so all-linear becomes the decoder's linear names."""
    import torch

    if target_modules != "all-linear":
        return target_modules.split(",")
    if layers is None:
        return "all-linear"
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in name})


def build_trainer(cfg: TrainConfig, model, tok, dataset, collator, probe=None):
    """The `CllmTrainer` with the passed-through TrainingArguments and the loss settings."""
    import torch
    from transformers import TrainingArguments

    from cllm.training.losses import LossSettings
    from cllm.training.trainer import CllmTrainer

    args = TrainingArguments(**{"use_cpu": not torch.cuda.is_available(), **cfg.training_arguments()})
    return CllmTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tok,
        loss_settings=LossSettings.from_config(cfg),
        jacobi_probe=probe,
        callbacks=[seal_callback()],  # first: every checkpoint is sealed before anything else sees it
    )


def train(cfg: TrainConfig) -> dict:
    """Train and save; returns the final training metrics. `cllm decode --model OUTPUT_DIR` loads the result."""
    _prepare_environment(cfg)
    import torch.distributed as dist

    resume_from = resume_checkpoint(cfg.output_dir, "cllm train") if cfg.resume else None
    if resume_from:
        check_kind(resume_from, cfg.use_peft)
    model, tok = build_model(cfg)
    if resume_from and cfg.sampler_head:
        from cllm.decoding.sampler_head import load_sampler

        load_sampler(model, resume_from)  # the head as the checkpoint left it (Trainer restores the adapter)
    dataset, collator, records, held_out = build_dataset(cfg, tok, model.config.vocab_size)
    probe = _jacobi_probe(cfg, records, tok, held_out) if cfg.jacobi_eval_steps > 0 else None
    trainer = build_trainer(cfg, model, tok, dataset, collator, probe)
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
        cost = {"segments": []}
        if self.path.is_file():
            try:
                cost = json.loads(self.path.read_text())
                cost["segments"] = [s for s in cost["segments"] if {"from_step", "to_step"} <= set(s)]
            except (ValueError, KeyError, TypeError):  # torn by a kill before the atomic write existed: start over
                print(f"[cllm train] {self.path} was torn; the cost log restarts at step {step0}", file=sys.stderr)
                cost = {"segments": []}
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
        atomic_write_text(self.path, json.dumps(cost, indent=1) + "\n")


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
        if cfg.objective == "gated":  # never merged: gate 0 must stay the base
            if trainer.is_world_process_zero():
                _write_gate_file(cfg, adapter_dir)
        elif trainer.is_world_process_zero():
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


def _write_gate_file(cfg: TrainConfig, adapter_dir: Path) -> None:
    """Mark the adapter folder as gated, with what its draft was trained to read (`cllm.decoding.gate`)."""
    from cllm.decoding.gate import GATE_FILE

    meta = {"draft_input": cfg.draft_input, "mask_token_id": cfg.mask_token_id, "block_size": cfg.block_size,
            "noise_window": cfg.noise_window}
    (adapter_dir / GATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _jacobi_probe(cfg: TrainConfig, records: list[dict], tok, held_out: list[dict] = ()):
    """Every `jacobi_eval_steps`: Jacobi tokens per forward on a few training prompts (held-in) and, with
    `jacobi_eval_held_out`, on as many prompts training never sees."""
    import torch

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
                res = _probe_decode(cfg, model, tok, prompts)
                out[key] = round(sum(r.n_new_tokens for r in res) / sum(r.n_forwards for r in res), 4)
        if was_training:
            model.train()
        return out

    return probe


def _probe_decode(cfg: TrainConfig, model, tok, prompts: list[list[int]]) -> list:
    """Jacobi decoding of the prompts; for a gated adapter, gated decoding with its draft alone (no n-gram pool)."""
    from cllm.decoding import jacobi_decode
    from cllm.decoding.options import GatedOptions, JacobiOptions

    if cfg.objective != "gated":
        return jacobi_decode(model, tok, prompts, JacobiOptions(block_size=cfg.block_size), 4 * cfg.block_size)
    from cllm.decoding.gated import gated_decode

    # no pooled n-grams; prompt lookup of 7 tokens kept, as every recorded probe of rows g1 and g2 ran
    opts = GatedOptions(block_size=cfg.block_size, draft_input=cfg.draft_input, pool_candidates=0,
                        lookup_tokens=7, mask_token_id=cfg.mask_token_id)
    return [gated_decode(model, tok, p, opts, 4 * cfg.block_size) for p in prompts]


def _first_prompt_ids(records: list[dict], n: int) -> list[list[int]]:
    """The prompt token ids of the n first prompts of `records` by data_id (the order --max-prompts keeps), so the
    held-out probe decodes the data_ids right after the training ones whatever order the files list them in."""
    from cllm.data.trajectories import data_id_order, first_ids

    keep, prompts = first_ids((r["data_id"] for r in records), n), {}
    for r in records:
        if r["data_id"] in keep:
            prompts.setdefault(r["data_id"], r["prompt_ids"][: r["prompt_len"]])
    return [prompts[i] for i in sorted(prompts, key=data_id_order)]
