"""`TrainConfig` and `DraftConfig`: what `cllm train` and `cllm train-draft` read.

They declare only their own options; every Hugging Face `TrainingArguments` field passes through (`trainer`), so
learning rate, steps, checkpointing, DeepSpeed, precision and logging are set as transformers documents them.

Imports no torch: `cllm train --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cllm.config import opt
from cllm.errors import CllmError
from cllm.models import DEFAULT_MODEL

# Where the defaults differ from transformers': one process on a CPU, a small model, short runs.
TRAINER_DEFAULTS = {
    "learning_rate": 2e-5, "lr_scheduler_type": "cosine", "num_train_epochs": 1.0, "per_device_train_batch_size": 1,
    "logging_steps": 10, "save_strategy": "steps", "save_steps": 100, "save_total_limit": 2, "report_to": "none",
    # The collators need every column; checkpoints keep optimizer and RNG states so a resume continues exactly.
    "remove_unused_columns": False, "save_only_model": False,
}


def check_trainer_options(trainer: dict) -> None:
    """The checks worth making before a model loads (transformers validates the rest when the run starts)."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if name in trainer and not (isinstance(trainer[name], (int, float)) and trainer[name] >= 1):
            raise CllmError(f"--{name.replace('_', '-')} must be >= 1, got {trainer[name]!r}")
    ds = trainer.get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_file():
        raise CllmError(f"DeepSpeed config not found: {ds}")


@dataclass
class TrainConfig:
    model: str = opt(DEFAULT_MODEL, "model to train: alias, local folder, HF id or .gguf")
    data: list = opt([], "`cllm gen` output folders or .jsonl record files")
    output_dir: str | None = opt(None, "checkpoints and the final (merged) model")
    block_size: int = opt(16, "Jacobi block size n; must match the data (or divide it, with split_blocks)")
    split_blocks: bool = opt(False, "cut the data's blocks (a multiple of block_size) into blocks of block_size; "
                                    "each piece keeps the states of a true block_size trajectory "
                                    "(cllm.training.records.split_blocks)")
    objective: str = opt("cllm", "cllm: one trajectory state per example (CLLM paper); jacobi_forcing: whole "
                                 "responses packed as noisy/clean block pairs (Jacobi Forcing); gated: a gated "
                                 "LoRA adapter learns to draft on that packing while the base stays exact (the "
                                 "lossless `gated` decoding method; needs use_peft, ar_weight 0)",
                         ("cllm", "jacobi_forcing", "gated"))
    draft_input: str = opt("guess", "gated: what the draft copy reads, the Jacobi state (guess) or mask tokens",
                           ("guess", "mask"))
    mask_token_id: int = opt(0, "gated with draft_input mask: the token id the draft reads at unknown positions")
    sampler_head: bool = opt(False, "gated: also train a sampler head (cllm.decoding.sampler_head) that redrafts the "
                                    "next guess from the draft's hidden states and the token before each, saved "
                                    "beside the adapter (continued from --init-adapter's when it has one)")
    sampler_base: bool = opt(False, "gated with sampler_head: a new head also reads the base's hidden state at the "
                                    "row that predicted its token (EAGLE's feature; cllm.decoding.sampler_head)")
    sampler_attn_heads: int = opt(0, "gated with sampler_base: a new head also attends (this many heads, ALiBi) "
                                     "to the committed text, each token with the base's row that predicted it "
                                     "(EAGLE's draft layer, reduced; cllm.decoding.sampler_head); 0 = none")
    sampler_weight: float = opt(1.0, "gated with sampler_head: weight of the head's KL to the base's distribution")
    train_adapter: bool = opt(True, "gated: train the LoRA adapter; false keeps --init-adapter's frozen and trains "
                                    "the sampler head alone (no backward through the model)")
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
    drop_looping: bool = opt(False, "leave out the responses whose answer loops (a span of >= 40 tokens repeating "
                                    "with a period <= 20, the eval's repeat-rate rule), counted on stderr: the "
                                    "collection drops only one-token runs")
    use_peft: bool = opt(False, "train a LoRA adapter (merged into the saved model at the end)")
    init_adapter: str | None = opt(None, "with use_peft: continue training this LoRA adapter folder (a later "
                                         "round), so the result stays one adapter on the base model")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "comma-separated module names, or all-linear")
    lora_layers: str = opt("all", "which decoder layers get LoRA: all, top:K (the last K; a gated draft's LoRA "
                                  "cost per forward is per layer), or comma-separated indices (PEFT's "
                                  "layers_to_transform)")
    resume: bool = opt(False, "continue from the newest complete checkpoint in output_dir (a DeepSpeed checkpoint is "
                              "read with torch.load(weights_only=False), which unpickles: resume only folders "
                              "your own runs wrote)")
    jacobi_eval_steps: int = opt(0, "every this many steps, measure Jacobi tokens per forward on a few training "
                                    "prompts and log it (0 = off)")
    jacobi_eval_prompts: int = opt(4, "prompts for that probe")
    jacobi_eval_held_out: int = opt(0, "with --max-prompts: also probe this many prompts of the data that training "
                                       "leaves out (the next data_ids), logged as jacobi/held_out_tokens_per_forward: "
                                       "a generalisation curve at the cost of a few decodes")
    trainer: dict = opt({}, "Hugging Face TrainingArguments, passed through: any of its fields, in YAML at the top "
                            "level or under trainer:, on the command line as its flag (--learning-rate 1e-4 "
                            "--max-steps 200 --save-steps 50 --deepspeed ds.json --bf16 ...); bf16/fp16 unset or auto: bf16 "
                            "where it is the fast dtype (CUDA, a CPU with AVX512_BF16/AMX). Defaults that differ "
                            f"from transformers': {TRAINER_DEFAULTS}", pass_through=True)

    @staticmethod
    def pass_through():
        """The dataclass whose fields this config forwards (into `trainer`), imported only when a config resolves."""
        from transformers import TrainingArguments

        return "trainer", TrainingArguments

    def validate(self) -> None:
        if not self.data:
            raise CllmError("--data is required (a `cllm gen` output folder or .jsonl files)")
        if not self.output_dir:
            raise CllmError("--output-dir is required")
        if self.max_prompts < 0:
            raise CllmError(f"--max-prompts must be >= 0, got {self.max_prompts}")
        for name in ("block_size", "lora_r", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise CllmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        check_trainer_options(self.trainer)
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
        if self.objective == "gated":
            self._validate_gated()
        elif self.sampler_head or self.sampler_base or self.sampler_attn_heads or not self.train_adapter:
            raise CllmError("--sampler-head, --sampler-base, --sampler-attn-heads and --train-adapter are options "
                            "of --objective gated")
        if self.jacobi_eval_held_out < 0:
            raise CllmError(f"--jacobi-eval-held-out must be >= 0, got {self.jacobi_eval_held_out}")
        if self.jacobi_eval_held_out and not (self.max_prompts and self.jacobi_eval_steps > 0):
            raise CllmError("--jacobi-eval-held-out needs --max-prompts (the prompts left out are the held-out ones) "
                            "and --jacobi-eval-steps > 0")
        log_every = int(self.training_arguments()["logging_steps"])  # checked >= 1 above
        if self.jacobi_eval_steps > 0 and self.jacobi_eval_steps % log_every:
            # the probe runs at logging steps only: any other interval would skip it silently
            raise CllmError(f"--jacobi-eval-steps {self.jacobi_eval_steps} must be a multiple of --logging-steps "
                            f"{log_every} (the probe runs when the losses are logged)")
        lora_layer_indices(self.lora_layers, None)  # the form; the range is checked once the model is loaded
        if self.init_adapter and not (self.use_peft and Path(self.init_adapter, "adapter_config.json").is_file()):
            raise CllmError(f"--init-adapter needs --use-peft and an adapter folder: {self.init_adapter}")

    def _validate_gated(self) -> None:
        if not self.use_peft:
            raise CllmError("--objective gated trains a gated LoRA adapter: add --use-peft")
        if self.ar_weight or self.base_kl_weight:
            raise CllmError("--objective gated never changes the base (gate 0 is the base exactly), so an AR or "
                            "base-KL term has no gradient: set --ar-weight 0 and --base-kl-weight 0")
        if self.consistency != "global" or self.use_aug or self.ar_target != "fixed_point":
            raise CllmError("--objective gated takes the fixed point as its target: no --consistency local, "
                            "--use-aug or --ar-target labels")
        if self.noise_window < 1 or not 1 <= self.noise_shifts <= self.noise_window or self.max_blocks < 0:
            raise CllmError("--noise-window must be >= 1, --noise-shifts in 1 .. --noise-window, --max-blocks >= 0")
        if not self.train_adapter and not (self.sampler_head and self.init_adapter):
            raise CllmError("--train-adapter false trains the sampler head alone on a frozen adapter: add "
                            "--sampler-head and --init-adapter")
        if self.sampler_base and not self.sampler_head:
            raise CllmError("--sampler-base is an option of the sampler head: add --sampler-head")
        if self.sampler_attn_heads < 0 or (self.sampler_attn_heads and not self.sampler_base):
            raise CllmError(f"--sampler-attn-heads must be >= 0 and needs --sampler-base (its keys are the base's "
                            f"rows), got {self.sampler_attn_heads}")
        if self.sampler_weight < 0:
            raise CllmError(f"--sampler-weight must be >= 0, got {self.sampler_weight}")

    def training_arguments(self) -> dict:
        """The keyword arguments of `TrainingArguments`: the defaults above, then the given ones."""
        from cllm.machine import resolve_precision

        return resolve_precision({**TRAINER_DEFAULTS, **self.trainer, "output_dir": self.output_dir})

    @property
    def seed(self) -> int:
        """The run's seed (TrainingArguments' `seed`): also the LoRA initialisation's and the state draws'."""
        return int(self.training_arguments().get("seed", 42))


# Distilling a draft: a few hundred steps of small batches, warm-up, checkpoints every 50 steps.
DRAFT_TRAINER_DEFAULTS = {**TRAINER_DEFAULTS, "learning_rate": 3e-4, "warmup_steps": 10,
                          "per_device_train_batch_size": 4, "max_steps": 300, "save_steps": 50}


@dataclass
class DraftConfig:
    model: str = opt(DEFAULT_MODEL, "target model: alias, local folder, HF id or .gguf")
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
    held_out: int = opt(64, "sequences left out of training (a seeded draw over all the text) on which the "
                            "teacher-forced top-1 agreement and KL with the target are reported, before and after")
    vocab_subset: int = opt(0, "draft with an LM head cut to the K most frequent tokens of the --data text (the "
                               "target's own outputs; else the dataset text) plus the special tokens: cheaper "
                               "drafting, SpS still exact (0 = the full vocabulary)")
    resume: bool = opt(False, "continue from the newest complete checkpoint in output_dir")
    trainer: dict = opt({}, "Hugging Face TrainingArguments, passed through as for cllm train (--learning-rate, "
                            f"--max-steps, --save-steps, --bf16, ...). Defaults that differ: {DRAFT_TRAINER_DEFAULTS}",
                        pass_through=True)

    pass_through = TrainConfig.pass_through

    def validate(self) -> None:
        if not self.output_dir:
            raise CllmError("--output-dir is required")
        if not self.datasets and not self.data:
            raise CllmError("give --datasets and/or --data (cllm gen output) as the distillation text")
        if self.draft_layers < 1:
            raise CllmError(f"--draft-layers must be >= 1, got {self.draft_layers}")
        if self.vocab_subset < 0:
            raise CllmError(f"--vocab-subset must be >= 0, got {self.vocab_subset}")
        check_trainer_options(self.trainer)
        if self.trainer.get("max_steps", 1) < 1:
            raise CllmError(f"--max-steps must be >= 1, got {self.trainer['max_steps']}")
        if self.max_seq_len < 2:
            raise CllmError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if self.kl_temperature <= 0:
            raise CllmError(f"--kl-temperature must be > 0, got {self.kl_temperature}")
        if self.held_out < 0:
            raise CllmError(f"--held-out must be >= 0, got {self.held_out}")

    def training_arguments(self) -> dict:
        from cllm.machine import resolve_precision

        return resolve_precision({**DRAFT_TRAINER_DEFAULTS, **self.trainer, "output_dir": self.output_dir})


def lora_layer_indices(spec: str, n_layers: int | None) -> list[int] | None:
    """`--lora-layers` as PEFT's layers_to_transform: None for all, else the indices. With n_layers None only the
    form is checked (and None returned): the range needs the loaded model."""
    spec = spec.strip()
    if spec == "all":
        return None
    try:
        top = int(spec[4:]) if spec.startswith("top:") else None
        idx = None if top is not None else sorted({int(x) for x in spec.split(",")})
        if top is not None and top < 1:
            raise ValueError
    except ValueError:
        raise CllmError(f"--lora-layers must be all, top:K (K >= 1) or comma-separated layer indices, got {spec!r}")
    if n_layers is None:
        return None
    idx = list(range(n_layers - top, n_layers)) if top is not None else idx
    if min(idx) < 0 or max(idx) >= n_layers:
        raise CllmError(f"--lora-layers {spec!r}: the model has {n_layers} layers (indices 0 .. {n_layers - 1})")
    return idx
