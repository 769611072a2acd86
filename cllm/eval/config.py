"""`EvalConfig`: what `cllm eval` reads (flags or YAML, e.g. a pipeline's `eval:` mapping); imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cllm.config import opt
from cllm.decoding import registry
from cllm.decoding.registry import DecodeConfig
from cllm.errors import CllmError
from cllm.models import DEFAULT_MODEL

REFERENCE = "base_ar"  # AR greedy of the base model: the speed reference of every eval


@dataclass
class EvalConfig:
    """The eval's settings and the decoding options (`decoding`: option key -> value, given as the methods' own
    flags or top-level YAML keys, e.g. `block_size: 16`; --temperature applies to the checkpoint's methods)."""

    max_new_tokens: int = opt(256, "new tokens per prompt, at most")
    decoding: dict = opt({}, "decoding options by key (flags of the registered methods)", pass_through=True)

    model: str = opt(DEFAULT_MODEL, "checkpoint to evaluate: alias, folder, HF id, .gguf")
    adapter: str | None = opt(None, "PEFT adapter folder merged into --model")
    base_model: str | None = opt(None, "the speed and quality reference (default: --model without the adapter); AR "
                                       "greedy of it runs as base_ar")
    methods: str = opt("ar,jacobi", "comma-separated decoding methods of the checkpoint; NAME:OPTION=VALUE... runs "
                                    "one with options of its own (mtad:tau=0.3:beam_width=2, jacobi:block_size=8)")
    base_methods: str = opt("", "also run these methods on the base model (as base_<method>), e.g. jacobi for a "
                                "base-vs-trained table in one run")
    dataset: str | None = opt(None, "dataset name(s), comma-separated (gsm8k, spider, humaneval, ...)")
    prompts: str | None = opt(None, "JSONL prompts instead of --dataset; an `answer` field is scored")
    prompt_field: str = opt("prompt", "field of --prompts holding the text")
    split: str | None = opt(None, "dataset split (gsm8k: test by default)")
    data_dir: str | None = opt(None, "dataset root (default: $CLLM_DATA_DIR or ../shared/data)")
    limit: int | None = opt(None, "prompts (per dataset)")
    offset: int = opt(0, "skip this many prompts first")
    spread: bool = opt(False, "--limit prompts evenly spaced over each dataset")
    dtype: str = opt("auto", "weights and activations; auto: bf16 on CUDA or a CPU with AVX512_BF16/AMX, else fp32 "
                             "(the resolved one is recorded)", ("auto", "fp32", "bf16", "fp16", "fp64"))
    device: str | None = opt(None, "cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    draft: str | None = opt(None, "sps/mtad/hf_assisted: draft model")
    seed: int = opt(0, "seed of initial guesses and sampling")
    warmup: int = opt(1, "untimed warm-up runs per method")
    humaneval_timeout: float = opt(10.0, "seconds per HumanEval test run")
    allow_weak_sandbox: bool = opt(False, "score generated code (HumanEval) even where the sandbox is only at the "
                                          "'basic' level (no root or no bubblewrap): the program can then read "
                                          "your files, reach the network and signal your processes")
    out_dir: str | None = opt(None, "report.json, summary.md, answers/, plots (required)")
    training_log: str | None = opt(None, "also plot the loss curves of this training output folder")
    overwrite: bool = opt(False, "discard finished rows of a different earlier eval")
    report_only: bool = opt(False, "decode nothing: write the report from the prompts every method has finished "
                             "(an eval cut short; the report says how many of the planned prompts it covers)")

    def validate(self) -> None:
        """Everything that can be checked before a model loads or the manifest is written."""
        if not self.out_dir:
            raise CllmError("--out-dir is required")
        if sum(x is not None for x in (self.dataset, self.prompts)) != 1:
            raise CllmError("give exactly one of --dataset NAME or --prompts FILE")
        methods = self.method_names()
        self.decode_config().validate([m.removeprefix("base_") for m in methods])
        from cllm.models import ModelSpec, check_model_spec  # before the manifest: a typo must not block the rerun

        ModelSpec(self.model, self.adapter, draft=self.draft).check()
        if self.base_model:
            check_model_spec(self.base_model, "--base-model")
        if self.training_log and not Path(self.training_log).exists():
            raise CllmError(f"--training-log: folder not found: {self.training_log}")

    @staticmethod
    def pass_through() -> tuple[str, type]:
        """The decoding options are the registered methods' own (cllm.config's pass-through)."""
        return "decoding", registry.options_dataclass()

    @staticmethod
    def add_pass_through_arguments(parser) -> None:
        registry.add_arguments(parser, max_new_tokens=False)

    def decode_config(self, **changes) -> DecodeConfig:
        return DecodeConfig(**{"max_new_tokens": self.max_new_tokens, **self.decoding, **changes})

    def method_names(self) -> list[str]:
        """Every method of the run: base_ar (the reference), base_<m> for --base-methods, then --methods."""
        from cllm.decoding import registry

        methods = _parse_methods("--methods", self.methods)
        if not methods:
            raise CllmError("--methods is empty")
        base_methods = [m for m in _parse_methods("--base-methods", self.base_methods or "") if m != "ar"]
        if any(registry.get(m).needs_draft for m in methods + base_methods) and not self.draft:
            raise CllmError("sps/mtad need --draft MODEL")
        return [REFERENCE, *[f"base_{m}" for m in base_methods], *methods]


def _parse_methods(flag: str, value: str) -> list[str]:
    from cllm.decoding import registry

    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if not registry.known(m):
            raise CllmError(f"{flag}: unknown method {m!r}; choose from {', '.join(registry.names())} "
                            "(or NAME:OPTION=VALUE...)")
    if len(set(methods)) != len(methods):
        raise CllmError(f"{flag} lists a method twice: {value}")
    return methods
