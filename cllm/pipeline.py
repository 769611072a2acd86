"""The pipeline: trajectories -> CLLM training (-> more rounds) -> evaluation of base vs trained, one YAML,
resumable (`cllm pipeline` is its front door).

Each stage resumes on its own: `cllm gen` from its commit log, training from its last checkpoint (and is skipped
once the final model is saved), `cllm eval` from its per-prompt rows. Run the same command again after a kill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cllm import config
from cllm.config import opt
from cllm.errors import CllmError
from cllm.models import DEFAULT_MODEL


@dataclass
class PipelineConfig:
    model: str = opt(DEFAULT_MODEL, "base model of every stage")
    out_dir: str | None = opt(None, "folder of the stages: trajectories/, train/, eval/")
    gen: dict = opt({}, "`cllm gen` options (GenConfig keys; model and out are set here)")
    train: dict = opt({}, "`cllm train` options (TrainConfig keys; model, data, output_dir and resume are set here)")
    eval: dict = opt({}, "`cllm eval` options (flag names with _; model, base_model, out_dir, training_log set here)")
    trajectories: str | None = opt(None, "use this finished `cllm gen` folder as round 1's data instead of "
                                         "collecting (ablations that share data); gen options then apply to "
                                         "later rounds only")
    rounds: list = opt([], "further training rounds, each {gen: {...}, train: {...}} overriding the first round's "
                           "options: trajectories are re-collected with the previous round's model and training "
                           "continues from it (the same LoRA adapter with use_peft)")
    nproc: int = opt(1, "processes for the collection and evaluation stages: above 1 they run under torchrun, each "
                        "rank on a disjoint share of the prompts with this process's CPU threads split between "
                        "them (training stays in this process)")

    def validate(self) -> None:
        if not self.out_dir:
            raise CllmError("--out-dir is required")
        if self.nproc < 1:
            raise CllmError(f"--nproc must be at least 1, got {self.nproc}")
        if self.trajectories and not Path(self.trajectories, "manifest.json").is_file():
            raise CllmError(f"trajectories: not a `cllm gen` output folder (no manifest.json): {self.trajectories}")
        for section, owned in (("gen", ("model", "out")), ("train", ("model", "data", "output_dir", "resume")),
                               ("eval", ("model", "base_model", "out_dir", "training_log"))):
            for key in getattr(self, section):
                if key in owned:
                    raise CllmError(f"pipeline {section}.{key} is set by the pipeline itself; remove it")
        for i, extra in enumerate(self.rounds, 2):
            if not isinstance(extra, dict) or set(extra) - {"gen", "train"}:
                raise CllmError(f"pipeline rounds: round {i} must be a mapping with only gen and train keys")
            for section, owned in (("gen", ("model", "out")),
                                   ("train", ("model", "data", "output_dir", "resume", "init_adapter"))):
                for key in extra.get(section) or {}:
                    if key in owned:
                        raise CllmError(f"pipeline rounds: round {i} {section}.{key} is set by the pipeline itself")


def eval_config(cfg: PipelineConfig, model: str, training_log: str | None = None):
    """The eval stage's `EvalConfig`: the pipeline's eval options with the model, base, folder and log it sets;
    resolved (so checked) before hours of work, with the base model standing in for the one not trained yet."""
    from cllm.eval.config import EvalConfig

    owned = {"model": model, "base_model": cfg.model, "out_dir": str(Path(cfg.out_dir) / "eval"),
             "training_log": training_log}
    try:
        return config.resolve(EvalConfig, {**cfg.eval, **owned})
    except CllmError as e:
        raise CllmError(f"pipeline eval: {e}") from None


def _launch(argv: list[str], nproc: int) -> int:
    """Run a `cllm` command on `nproc` torchrun ranks splitting this process's CPU threads (a stage with one
    process runs in this one, without a launch)."""
    import torch

    # Set explicitly: an inherited OMP_NUM_THREADS meant for one process would oversubscribe the cores nproc times.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // nproc))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cllm.cli", *argv]
    print(f"[cllm pipeline] OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env=env).returncode


def plan(cfg: PipelineConfig) -> list[tuple]:
    """Every round's (gen config or None when given `trajectories`, gen folder, train config, train folder), resolved
    and so checked before any work starts."""
    from cllm.training.config import TrainConfig
    from cllm.data.trajectories import GenConfig

    out = Path(cfg.out_dir)
    rounds = [(cfg.gen, cfg.train)] + [({**cfg.gen, **(r.get("gen") or {})}, {**cfg.train, **(r.get("train") or {})})
                                       for r in cfg.rounds]
    model, prev_train, stages = cfg.model, None, []
    for i, (gen_opts, train_opts) in enumerate(rounds, 1):
        # Round 1 keeps the flat layout (out/trajectories, out/train); later rounds go to out/round<i>/.
        base = out if i == 1 else out / f"round{i}"
        gen_dir, train_dir = base / "trajectories", base / "train"
        gen_cfg = None
        if i == 1 and cfg.trajectories:
            gen_dir = Path(cfg.trajectories)
        else:
            gen_cfg = config.resolve(GenConfig, {**gen_opts, "model": model, "out": str(gen_dir)})
        train_extra = {"model": model}
        if prev_train is not None and train_opts.get("use_peft"):
            # Keep one adapter on the base model: continue the previous round's adapter.
            train_extra = {"model": cfg.model, "init_adapter": str(prev_train / "adapter")}
        train_cfg = TrainConfig(**{**config.to_dict(config.resolve(TrainConfig, {**train_opts, "model": cfg.model,
                                   "data": [str(gen_dir)], "output_dir": str(train_dir), "resume": True})),
                                   **train_extra})
        stages.append((gen_cfg, gen_dir, train_cfg, train_dir))
        model, prev_train = str(train_dir), train_dir  # the next round collects with the model trained here
    return stages


def run_pipeline(cfg: PipelineConfig) -> str:
    import yaml

    from cllm.data.collect import generate
    from cllm.eval.runner import run_eval
    from cllm.training.run import train

    out = Path(cfg.out_dir)
    eval_dir = out / "eval"
    eval_config(cfg, cfg.model)  # checked before hours of work, not after
    stages = plan(cfg)
    n_rounds = len(stages)
    out.mkdir(parents=True, exist_ok=True)
    # for the ablation table (experiments/ablation)
    (out / "pipeline.json").write_text(json.dumps(config.to_dict(cfg), indent=1) + "\n")

    for i, (gen_cfg, gen_dir, train_cfg, train_dir) in enumerate(stages, 1):
        tag = f"round {i}/{n_rounds}: " if n_rounds > 1 else ""
        if gen_cfg is None:
            print(f"[cllm pipeline] {tag}trajectories: using {gen_dir}", flush=True)
        else:
            print(f"[cllm pipeline] {tag}trajectories -> {gen_dir}", flush=True)
            if cfg.nproc == 1:
                generate(gen_cfg)
            else:
                gen_yaml = gen_dir.parent / "gen.yaml"  # the resolved options, for the ranks (and the record)
                gen_yaml.parent.mkdir(parents=True, exist_ok=True)
                gen_yaml.write_text(yaml.safe_dump(config.to_dict(gen_cfg), sort_keys=False))
                code = _launch(["gen", "--config", str(gen_yaml)], cfg.nproc)
                if code != 0:
                    raise CllmError(f"round {i} collection failed (exit {code}); fix the cause and run the same "
                                    "command again")
        print(f"[cllm pipeline] {tag}training -> {train_dir}", flush=True)
        if (train_dir / "cllm_train.json").is_file():
            print("[cllm pipeline] training already finished, skipped", flush=True)
        else:
            train_cfg.validate()  # the previous round's adapter exists only now
            train(train_cfg)

    print(f"[cllm pipeline] evaluation -> {eval_dir}", flush=True)
    eval_cfg = eval_config(cfg, str(train_dir), str(train_dir))
    eval_yaml = out / "eval.yaml"  # the resolved options, for the ranks (and the record)
    eval_yaml.write_text(yaml.safe_dump(config.to_dict(eval_cfg), sort_keys=False))
    if cfg.nproc == 1:
        run_eval(eval_cfg)
    else:
        code = _launch(["eval", "--config", str(eval_yaml)], cfg.nproc)
        if code != 0:
            raise CllmError(f"the evaluation stage failed (exit {code}); fix the cause and run the same command "
                            "again")
    summary = (eval_dir / "summary.md").read_text()
    (out / "summary.md").write_text(summary)
    return summary
