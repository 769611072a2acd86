"""Training that survives a crash: kill -9 right after a checkpoint (and a checkpoint cut short while saving),
then the same command with --resume, ends with the weights of an uninterrupted run; two runs with one seed are
identical. Tiny model, LoRA with dropout (so the restored RNG matters), gradient accumulation, CLLM and Jacobi
Forcing objectives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cllm.config import resolve
from cllm.training.checkpoints import is_complete, resume_checkpoint
from cllm.training.config import TrainConfig
from cllm.training.run import train
from test_train import traj_dir  # noqa: F401  (the module's fixture: a small `cllm gen` folder)

# A run that kills itself (SIGKILL, nothing flushed, no cleanup) once checkpoint `kill_at` is written.
KILLER = """
import os, signal, sys, json
from transformers import TrainerCallback
import cllm.training.run as run
kill_at = int(sys.argv[1])
build = run.build_trainer
def build_and_arm(*args, **kwargs):
    trainer = build(*args, **kwargs)
    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    trainer.add_callback(Kill())
    return trainer
run.build_trainer = build_and_arm
from cllm.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def _options(tiny_model_dir, data, out, objective: str) -> dict:
    opts = {"model": str(tiny_model_dir), "data": [str(data)], "output_dir": str(out), "block_size": 4,
            "objective": objective, "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
            "max_steps": 4, "save_steps": 1, "save_total_limit": 10, "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 2, "learning_rate": 5e-3, "logging_steps": 1, "seed": 7}
    if objective == "jacobi_forcing":
        opts.update(noise_window=3, noisy_context="clean", noise_shifts=2)
    return opts


def _argv(opts: dict) -> list[str]:
    argv = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag, *map(str, v)] if isinstance(v, list) else [flag] if v is True else [flag, str(v)]
    return argv


def _final(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


@pytest.mark.parametrize("objective", ["cllm", "jacobi_forcing"])
def test_kill_and_resume_gives_the_uninterrupted_weights(objective, tiny_model_dir, traj_dir, tmp_path):  # noqa: F811
    ref = tmp_path / "ref"
    train(resolve(TrainConfig, _options(tiny_model_dir, traj_dir, ref, objective)))
    again = tmp_path / "again"
    train(resolve(TrainConfig, _options(tiny_model_dir, traj_dir, again, objective)))
    assert _losses(again) == _losses(ref)  # one seed, one run: identical, step by step
    want = _final(ref)
    assert all(torch.equal(want[k], v) for k, v in _final(again).items())

    for kill_at in (1, 3):
        out = tmp_path / f"killed{kill_at}"
        opts = _options(tiny_model_dir, traj_dir, out, objective)
        proc = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *_argv(opts)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert not (out / "model.safetensors").exists()
        if kill_at == 1:  # a checkpoint cut short while saving: weights written, trainer state not yet
            torn = out / "checkpoint-2"
            torn.mkdir()
            (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
            (torn / "trainer_state.json").write_text('{"global_step": ')
            assert not is_complete(torn)
            assert resume_checkpoint(out, "test") == str(out / "checkpoint-1")
        train(resolve(TrainConfig, {**opts, "resume": True}))
        got = _final(out)
        for k, v in want.items():
            assert torch.allclose(got[k], v, rtol=0, atol=1e-6), (kill_at, k, (got[k] - v).abs().max())
        steps = [h["step"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
        assert steps[-1] == 4 and _losses(out)[-(4 - kill_at):] == pytest.approx(_losses(ref)[kill_at:], rel=1e-6)


def _eval_rows(out: Path) -> dict:
    rows = [json.loads(x) for x in (out / "rows-rank0.jsonl").read_text().splitlines()]
    keys = [(r["index"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (prompt, method) row was written twice"
    return {k: (r["token_ids"], r["correct"], r["base_logprob_mean"]) for k, r in zip(keys, rows)}


@pytest.mark.parametrize("kill_after_rows", [1, 7])
def test_eval_killed_mid_run_then_rerun_equals_the_uninterrupted_eval(kill_after_rows, tiny_model_dir, tmp_path):
    from test_eval import write_scored_prompts

    prompts = write_scored_prompts(tmp_path / "p.jsonl", 6)
    argv = ["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "ar,jacobi",
            "--block-size", "4", "--max-new-tokens", "12", "--dtype", "fp64", "--warmup", "0"]
    cmd = [sys.executable, "-m", "cllm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd + argv + ["--out-dir", str(tmp_path / "ref")], env=env).returncode == 0
    out = tmp_path / "eval"
    proc = subprocess.Popen(cmd + argv + ["--out-dir", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rows_path = out / "rows-rank0.jsonl"
    while proc.poll() is None:  # kill -9 as soon as this many rows are on disk (a prompt writes its 3 together)
        if rows_path.is_file() and len(rows_path.read_bytes().splitlines()) >= kill_after_rows:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists()
    assert subprocess.run(cmd + argv + ["--out-dir", str(out)], env=env).returncode == 0
    assert _eval_rows(out) == _eval_rows(tmp_path / "ref")
    report, ref = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "ref"))
    for m in ("base_ar", "ar", "jacobi"):
        for key in ("n_prompts", "tokens_per_forward", "accuracy", "perplexity_base"):
            assert report["methods"][m][key] == ref["methods"][m][key], (m, key)


def test_a_checkpoint_with_any_file_truncated_or_zeroed_is_skipped_and_named(tiny_model_dir, traj_dir, tmp_path,  # noqa: F811
                                                                              capsys):
    """Power loss leaves any file of a checkpoint torn whatever order it was written in: each file of the newest
    checkpoint in turn, truncated or zeroed (same size), makes it incomplete, and the resume names it and takes the
    one before; a torn or missing completion marker does too. A torn train_cost.json restarts the cost log."""
    import shutil

    from cllm.training.checkpoints import MARKER
    from cllm.training.run import CostLog

    out = tmp_path / "run"
    train(resolve(TrainConfig, {**_options(tiny_model_dir, traj_dir, out, "cllm"), "max_steps": 2}))
    newest, older = out / "checkpoint-2", out / "checkpoint-1"
    assert is_complete(newest) and is_complete(older)
    files = [p for p in newest.rglob("*") if p.is_file()]
    assert len(files) >= 5 and any(p.name == MARKER for p in files)
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)
    for path in files:
        rel = path.relative_to(newest)
        size = path.stat().st_size
        for damage in ("truncate", "zero", "delete"):
            if damage == "truncate":
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
            elif damage == "zero":
                path.write_bytes(b"\0" * size)
            else:
                path.unlink()
            assert not is_complete(newest), (rel, damage)
            capsys.readouterr()
            assert resume_checkpoint(out, "test") == str(older), (rel, damage)
            assert "skipped incomplete checkpoint-2" in capsys.readouterr().err
            shutil.copy2(pristine / rel, path)
            assert is_complete(newest), rel
    (out / "train_cost.json").write_text('{"segments": [{"from_step": 0, ')
    CostLog(str(out), step0=1).update(2, 1)
    assert json.loads((out / "train_cost.json").read_text())["segments"][0]["from_step"] == 1
    assert "was torn" in capsys.readouterr().err
