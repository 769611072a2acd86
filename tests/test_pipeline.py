"""`cllm pipeline` end to end on a tiny model: gen -> train -> eval, then a rerun that only resumes."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from experiments.ablation.table import ablation_markdown, ablation_row
from cllm.cli import main
from cllm.errors import CllmError
from cllm.eval.summary import per_prompt_speedups, quantile
from cllm.eval.summary import summarize as summarize_method
from cllm.eval.runner import read_rows
from experiments.ablation.plot import plot_ablation, speedup_heights
from experiments.ablation.table import main as ablation_main
from cllm.data.trajectories import summarize
from test_eval import write_scored_prompts


def quick_config(tiny_model_dir, tmp_path) -> dict:
    """A pipeline YAML mapping on 4 scored prompts: collect, 3 training steps, eval of ar and jacobi on 2 prompts."""
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 4)
    return {
        "model": str(tiny_model_dir),
        "out_dir": str(tmp_path / "run"),
        "gen": {"prompts": str(prompts), "limit": 4, "block_size": 4, "max_new_tokens": 16, "batch_size": 2},
        "train": {"block_size": 4, "max_steps": 3, "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-3},
        "eval": {"prompts": str(prompts), "limit": 2, "methods": "ar,jacobi", "base_methods": "jacobi",
                 "block_size": 4, "max_new_tokens": 12, "dtype": "fp32", "warmup": 0},
    }


def test_pipeline_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(quick_config(tiny_model_dir, tmp_path)))
    assert main(["pipeline", "--config", str(path)]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "eval" / "report.json").read_text())
    assert list(report["methods"]) == ["base_ar", "base_jacobi", "ar", "jacobi"]
    assert report["settings"]["base_model"] == str(tiny_model_dir)
    assert (run / "train" / "cllm_train.json").is_file() and (run / "eval" / "training_loss.png").is_file()
    assert "| base_jacobi |" in (run / "summary.md").read_text()
    rows_before = (run / "eval" / "rows-rank0.jsonl").read_text()
    capsys.readouterr()
    # A rerun resumes every stage: nothing is trained or decoded again.
    assert main(["pipeline", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "training already finished, skipped" in out
    assert out.count("| base_jacobi |") == 1 and out.rstrip().endswith(f"{run / 'summary.md'}")  # the table once
    assert (run / "eval" / "rows-rank0.jsonl").read_text() == rows_before


def test_pipeline_rejects_unknown_and_owned_keys(tiny_model_dir, tmp_path, capsys):
    base = {"model": str(tiny_model_dir), "out_dir": str(tmp_path / "run")}
    for extra, message in [({"eval": {"metods": "ar"}}, "pipeline eval: options: unknown key 'metods'"),
                           ({"train": {"output_dir": "x"}}, "train.output_dir is set by the pipeline"),
                           ({"evaluation": {}}, "unknown key 'evaluation'")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, **extra}))
        assert main(["pipeline", "--config", str(path)]) == 2
        assert message in capsys.readouterr().err


def test_two_round_jacobi_forcing_pipeline_keeps_one_adapter(tiny_model_dir, tmp_path):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 4)
    cfg = {
        "model": str(tiny_model_dir),
        "out_dir": str(tmp_path / "run"),
        "gen": {"prompts": str(prompts), "limit": 4, "block_size": 4, "max_new_tokens": 16, "batch_size": 2},
        "train": {"block_size": 4, "max_steps": 2, "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-3,
                  "objective": "jacobi_forcing", "noise_window": 4, "use_peft": True, "lora_r": 2, "lora_alpha": 4},
        "rounds": [{"gen": {"block_size": 8, "limit": 3}, "train": {"block_size": 8, "max_steps": 3}}],
        "eval": {"prompts": str(prompts), "limit": 1, "methods": "jacobi", "block_size": 8, "max_new_tokens": 8,
                 "dtype": "fp32", "warmup": 0},
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "--config", str(path)]) == 0
    run = tmp_path / "run"
    r2 = json.loads((run / "round2" / "train" / "cllm_train.json").read_text())
    assert r2["init_adapter"] == str(run / "train" / "adapter") and r2["model"] == str(tiny_model_dir)
    assert r2["block_size"] == 8 and r2["objective"] == "jacobi_forcing"
    gen2 = json.loads((run / "round2" / "trajectories" / "manifest.json").read_text())
    assert str(run / "train") in json.dumps(gen2)  # round 2 collected with round 1's model
    history = json.loads((run / "round2" / "train" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert all("tokens_converged" in h for h in history if "loss" in h)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["settings"]["model"] == str(run / "round2" / "train")
    row2 = ablation_row(run)  # round 1 trained on 4 prompts, round 2 on 3 re-collected ones
    assert (row2["train_prompts"], row2["train_prompts_per_round"], row2["rounds"], row2["steps"]) == (4, [4, 3], 2, 5)
    assert "| 4+3 |" in ablation_markdown([row2])
    # The final adapter, exported in bf16, loads on the base model and gives the merged model's logits.
    import torch
    from safetensors.torch import load_file

    from cllm.models import load_model

    adapter = run / "round2" / "train" / "adapter"
    assert main(["export-adapter", str(adapter), str(tmp_path / "models" / "jf")]) == 0
    exported = load_file(str(tmp_path / "models" / "jf" / "adapter_model.safetensors"))
    assert exported and all(v.dtype == torch.bfloat16 for v in exported.values())
    original = load_file(str(adapter / "adapter_model.safetensors"))
    assert exported.keys() == original.keys()
    assert sum(v.nbytes for v in exported.values()) * 2 == sum(v.nbytes for v in original.values())
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.no_grad():
        via_adapter = load_model(str(tiny_model_dir), adapter=str(tmp_path / "models" / "jf"))[0](ids).logits
        merged = load_model(str(run / "round2" / "train"))[0](ids).logits
        base = load_model(str(tiny_model_dir))[0](ids).logits
    assert (via_adapter - merged).abs().max() < 0.02 * (merged - base).abs().max()  # bf16 rounding only
    assert main(["export-adapter", str(adapter), str(tmp_path / "big"), "--max-mb", "0.0001"]) == 2
    assert main(["export-adapter", str(tmp_path), str(tmp_path / "x")]) == 2
    # The ablation row of this folder.
    assert ablation_main([str(run), "--out", str(tmp_path / "table.md")]) == 0
    row = json.loads((tmp_path / "table.json").read_text())[0]
    assert (row["objective"], row["tuning"], row["rounds"], row["steps"], row["train_prompts"]) == (
        "jacobi_forcing", "LoRA r=2", 2, 5, 4)
    assert row["cpu_seconds"] > 0 and row["tokens_per_forward"] == report["methods"]["jacobi"]["tokens_per_forward"]
    # 1 eval prompt: p10, median and p90 are its own speed-up, jacobi's tokens/s over base AR's on it
    by_method = {r["method"]: r for r in read_rows(run / "eval")}
    own = (by_method["jacobi"]["new_tokens"] / by_method["jacobi"]["seconds"]) / (
        by_method["base_ar"]["new_tokens"] / by_method["base_ar"]["seconds"])
    assert row["speedup_p10"] == row["speedup_median"] == row["speedup_p90"] == pytest.approx(own, rel=1e-12)
    assert "| run | objective |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CllmError, match="no rows"):
        plot_ablation([], tmp_path / "empty.png")
    # A row whose eval had no base AR gets no bar (NaN), not a 0x bar that reads as a measurement.
    no_ar = {**row, "speedup": None, "speedup_p10": None, "speedup_p90": None}
    heights = speedup_heights([row, no_ar])
    assert heights[0] == row["speedup"] and math.isnan(heights[1])
    assert plot_ablation([row, no_ar], tmp_path / "no_ar.png").read_bytes()[:4] == b"\x89PNG"
    assert ablation_main([str(tmp_path)]) == 2  # not a pipeline folder: a clear error
    # --append keeps rows whose folders are gone: an older row stays first, this folder's row replaces its namesake.
    older = {**row, "name": "gone_row", "tokens_per_forward": 9.0}
    stale = {**row, "tokens_per_forward": -1.0}
    (tmp_path / "table.json").write_text(json.dumps([older, stale]))
    assert ablation_main([str(run), "--out", str(tmp_path / "table.md"), "--append"]) == 0
    appended = json.loads((tmp_path / "table.json").read_text())
    assert [r["name"] for r in appended] == ["gone_row", row["name"]]
    assert appended[0] == older and appended[1]["tokens_per_forward"] == row["tokens_per_forward"]
    assert "gone_row" in (tmp_path / "table.md").read_text()
    assert ablation_main([str(run), "--append"]) == 2  # no --out: nothing to append to
    assert ablation_main([str(run), "--out", str(tmp_path / "none.md"), "--append"]) == 2  # no none.json
    # A second pipeline that trains on round 1's trajectories instead of collecting its own.
    cfg2 = {**cfg, "out_dir": str(tmp_path / "shared"), "trajectories": str(run / "trajectories"), "rounds": []}
    path.write_text(yaml.safe_dump(cfg2))
    assert main(["pipeline", "--config", str(path)]) == 0
    assert not (tmp_path / "shared" / "trajectories").exists()
    shared_row = ablation_row(tmp_path / "shared")
    assert (shared_row["train_prompts"], shared_row["steps"], shared_row["rounds"]) == (4, 2, 1)
    # A row that trains on the first 2 of those 4 prompts counts 2 prompts and the CPU time of their batch.
    cfg3 = {**cfg2, "out_dir": str(tmp_path / "half"), "train": {**cfg["train"], "max_prompts": 2}}
    path.write_text(yaml.safe_dump(cfg3))
    assert main(["pipeline", "--config", str(path)]) == 0
    half_row = ablation_row(tmp_path / "half")
    gen_cpu = summarize(run / "trajectories")["cpu_seconds"]
    batches = [json.loads(x) for x in (run / "trajectories" / "progress-00000-of-00001.jsonl").read_text().splitlines()]
    first_batch_cpu, = [b["cpu_seconds"] for b in batches if b["data_ids"] == [0, 1]]  # batch_size 2
    train_cpu = lambda d: json.loads((d / "train" / "train_cost.json").read_text())["cpu_seconds"]  # noqa: E731
    assert half_row["train_prompts"] == 2
    assert half_row["cpu_seconds"] == pytest.approx(first_batch_cpu + train_cpu(tmp_path / "half"), abs=0.2)
    assert shared_row["cpu_seconds"] == pytest.approx(gen_cpu + train_cpu(tmp_path / "shared"), abs=0.2)


def test_pipeline_rejects_bad_rounds(tiny_model_dir, tmp_path, capsys):
    base = {"model": str(tiny_model_dir), "out_dir": str(tmp_path / "run")}
    for rounds, message in [([{"gen": {"out": "x"}}], "round 2 gen.out is set by the pipeline"),
                            ([{"train": {"init_adapter": "a"}}], "round 2 train.init_adapter"),
                            ([{"eval": {}}], "round 2 must be a mapping with only gen and train")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, "rounds": rounds}))
        assert main(["pipeline", "--config", str(path)]) == 2
        assert message in capsys.readouterr().err


def test_pipeline_runs_collection_and_eval_on_two_ranks(tiny_model_dir, tmp_path, capsys):
    cfg = quick_config(tiny_model_dir, tmp_path)
    cfg["nproc"] = 2
    cfg["train"]["max_steps"] = 1
    cfg["eval"].update(limit=4, methods="jacobi", base_methods="ar")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "--config", str(path)]) == 0
    run = tmp_path / "run"
    assert "torch.distributed.run --standalone --nproc_per_node 2" in capsys.readouterr().out
    # Each rank collected and evaluated its own 2 of the 4 prompts.
    gen_ids = [{i for x in (run / "trajectories" / f"progress-{r:05d}-of-00002.jsonl").read_text().splitlines()
                for i in json.loads(x)["data_ids"]} for r in (0, 1)]
    assert sorted(gen_ids[0] | gen_ids[1]) == [0, 1, 2, 3] and not gen_ids[0] & gen_ids[1]
    eval_ids = [{json.loads(x)["index"] for x in (run / "eval" / f"rows-rank{r}.jsonl").read_text().splitlines()}
                for r in (0, 1)]
    assert sorted(eval_ids[0] | eval_ids[1]) == [0, 1, 2, 3] and not eval_ids[0] & eval_ids[1]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["methods"]["jacobi"]["n_prompts"] == 4
    path.write_text(yaml.safe_dump({**cfg, "nproc": 0}))
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err


def test_per_prompt_speedups_and_quantiles_by_hand():
    row = lambda i, m, tokens, seconds: {"index": i, "method": m, "new_tokens": tokens, "seconds": seconds}  # noqa: E731
    rows = [row(0, "base_ar", 100, 10.0), row(0, "jacobi", 100, 5.0),   # 2.0x
            row(1, "jacobi", 50, 10.0), row(1, "base_ar", 100, 10.0),   # 5 vs 10 tok/s: 0.5x
            row(2, "base_ar", 10, 1.0), row(2, "jacobi", 30, 3.0),      # 1.0x
            row(3, "jacobi", 10, 1.0),                                  # no base_ar row: left out
            row(4, "base_ar", 0, 1.0), row(4, "jacobi", 5, 1.0)]        # base made no tokens: left out
    xs = per_prompt_speedups(rows, "jacobi")
    assert xs == pytest.approx([0.5, 1.0, 2.0])
    assert quantile(xs, 0.5) == pytest.approx(1.0)
    assert quantile(xs, 0.1) == pytest.approx(0.6)    # 0.5 + 0.2 * (1.0 - 0.5)
    assert quantile(xs, 0.9) == pytest.approx(1.8)    # 1.0 + 0.8 * (2.0 - 1.0)
    assert quantile([3.0], 0.9) == 3.0 and quantile([], 0.5) is None
    assert per_prompt_speedups(rows, "ar") == []


def test_summarize_splits_tokens_per_forward_by_degenerate_answers():
    def row(i, tokens, forwards, degenerate):
        return {"index": i, "method": "jacobi", "token_ids": [1] * tokens, "new_tokens": tokens, "forwards": forwards,
                "seconds": 1.0, "cpu_seconds": 1.0, "accept_lengths": [1], "fast_forward": 0, "stationary": 0,
                "correct": None, "degenerate": degenerate, "base_logprob_mean": -1.0}

    rows = [row(0, 100, 20, True), row(1, 30, 20, False), row(2, 20, 20, False)]
    m = summarize_method(rows, None)
    assert m["tokens_per_forward"] == pytest.approx(150 / 60) and m["repeat_rate"] == pytest.approx(1 / 3)
    assert m["n_non_degenerate"] == 2 and m["tokens_per_forward_non_degenerate"] == pytest.approx(50 / 40)
    all_loops = summarize_method([row(0, 100, 20, True)], None)
    assert all_loops["n_non_degenerate"] == 0 and all_loops["tokens_per_forward_non_degenerate"] is None


def test_ablation_objective_names_the_jacobi_forcing_variant():
    from experiments.ablation.table import _objective

    assert _objective({}) == "cllm"
    assert _objective({"objective": "jacobi_forcing", "noisy_context": "noisy", "noise_shifts": 1}) == "jacobi_forcing"
    assert _objective({"objective": "jacobi_forcing", "noisy_context": "clean", "noise_shifts": 16}) == (
        "jacobi_forcing (clean context, 16 shifts)")
    assert _objective({"objective": "cllm", "base_kl_weight": 10.0}) == "cllm (base KL 10)"
    assert _objective({"objective": "cllm", "base_kl_weight": 0.0}) == "cllm"
    old = {"loss_normalization": "token", "consistency_positions": "block", "ar_scope": "answer"}
    assert _objective({"objective": "jacobi_forcing", "noisy_context": "clean", **old}) == (
        "jacobi_forcing (old loss scales, clean context)")
    assert _objective({"objective": "cllm", "loss_normalization": "token"}) == "cllm (token scale)"
