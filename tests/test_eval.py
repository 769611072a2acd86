"""`cllm eval` on tiny saved models: report consistency, quality scoring, plots, resume, torchrun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cllm.cli import main
from cllm.eval.summary import REFERENCE
from conftest import save_tiny_model
from test_cli import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_scored_prompts(path, n=4):
    lines = [json.dumps({"prompt": " ".join(f"w{3 + (i * 5 + j) % 60}" for j in range(3 + i)), "id": f"q{i}",
                         "answer": "#### 17"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-base"), seed=21)


def _eval(model_dir, prompts, out, *extra):
    return main(["eval", "--model", str(model_dir), "--prompts", str(prompts), "--methods", "ar,jacobi",
                 "--block-size", "4", "--max-new-tokens", "12", "--dtype", "fp64", "--out-dir", str(out), *extra])


def test_eval_report_fields_plots_and_consistency(tiny_model_dir, tmp_path):
    prompts = write_scored_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, prompts, out) == 0
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert set(methods) == {REFERENCE, "ar", "jacobi"}
    for name, m in methods.items():
        assert m["n_prompts"] == 4
        # the speed-up is the ratio of the two recorded rates, and each rate is tokens / seconds
        assert m["tokens_per_second"] == pytest.approx(m["new_tokens"] / m["wall_time_s"], rel=1e-3)
        assert m["speedup_vs_base_ar"] == pytest.approx(m["tokens_per_second"] / methods[REFERENCE]["tokens_per_second"])
        assert m["accuracy"] == 0.0 and m["n_scored"] == 4  # random words never end in 17
        assert 0.0 <= m["repeat_rate"] <= 1.0 and m["perplexity_base"] > 1.0
        assert m["cpu_s_per_token"] > 0
        assert m["energy_j_per_token"] is None or m["energy_j_per_token"] > 0  # null where RAPL is unreadable
        assert sum(int(k) * v for k, v in m["accept_length_hist"].items()) == m["new_tokens"]
    # per-prompt spread of the speed-up, from the rows by hand (rate over the same prompt's base_ar rate)
    rows = [json.loads(x) for x in (out / "rows-rank0.jsonl").read_text().splitlines()]
    ref_rate = {r["index"]: r["new_tokens"] / r["seconds"] for r in rows if r["method"] == REFERENCE}
    by_hand = sorted(r["new_tokens"] / r["seconds"] / ref_rate[r["index"]] for r in rows if r["method"] == "jacobi")
    spread = methods["jacobi"]["speedup_per_prompt"]
    assert spread["median"] == pytest.approx((by_hand[1] + by_hand[2]) / 2)  # 4 prompts
    assert spread["p10"] == pytest.approx(by_hand[0] + 0.3 * (by_hand[1] - by_hand[0]))
    assert methods[REFERENCE]["speedup_per_prompt"]["median"] == pytest.approx(1.0)
    # lossless: the checkpoint is its own base here, so AR and Jacobi reproduce base AR exactly (fp64)
    assert methods["jacobi"]["exact_match_base_ar"] == 1.0 and methods["ar"]["exact_match_base_ar"] == 1.0
    assert methods["jacobi"]["speedup_vs_own_ar"] == pytest.approx(
        methods["jacobi"]["tokens_per_second"] / methods["ar"]["tokens_per_second"])
    assert len(report["per_dataset"]) == 1 and len(report["per_category"]) == 1
    # every row says what it was timed on; one machine here, counted once per prompt
    (tag, n), = report["machines"].items()
    assert n == 4 and "thread" in tag
    for png in ("accept_lengths.png", "per_dataset.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    summary = (out / "summary.md").read_text()
    assert f"x ({spread['median']:.2f} [{spread['p10']:.2f}, {spread['p90']:.2f}]) |" in summary
    assert "| jacobi |" in summary and "speed-up" in summary and f"Measured on: {tag} (4 prompts)" in summary
    answers = [json.loads(x) for x in (out / "answers" / "jacobi.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["q0", "q1", "q2", "q3"]


def test_eval_scores_correct_answers(tiny_model_dir, tmp_path):
    """The reference answer is set to what the model actually says, so every answer scores as right."""
    probe = tmp_path / "probe"
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 2)
    assert _eval(tiny_model_dir, prompts, probe) == 0
    texts = [json.loads(x)["choices"][0]["turns"][0] for x in (probe / "answers" / "ar.jsonl").read_text().splitlines()]
    lines = [json.loads(x) for x in prompts.read_text().splitlines()]
    for line, text in zip(lines, texts):
        line["answer"] = text
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert _eval(tiny_model_dir, prompts, tmp_path / "again") == 0
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["methods"]["ar"]["accuracy"] == 1.0 and report["methods"]["jacobi"]["accuracy"] == 1.0


def test_eval_resume_skips_finished_prompts(tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, prompts, out) == 0
    rows_path = out / "rows-rank0.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()]
    assert len(rows) == 9
    # Simulate a kill during prompt 2: its rows are gone and a half-written line is left.
    kept = [r for r in rows if r["index"] != 2]
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"index": 2, "meth')
    assert _eval(tiny_model_dir, prompts, out) == 0
    after = [json.loads(x) for x in rows_path.read_text().splitlines()]
    assert after[: len(kept)] == kept  # finished prompts untouched (their timings included)
    assert sorted(r["index"] for r in after[len(kept):]) == [2, 2, 2]
    # A finished eval run again decodes nothing and loads no model; it rewrites the report.
    (out / "report.json").unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("a finished eval loaded a model")

    monkeypatch.setattr("cllm.models.loading.load_model", no_model)
    assert _eval(tiny_model_dir, prompts, out) == 0
    assert len(rows_path.read_text().splitlines()) == 9 and (out / "report.json").is_file()


def test_eval_report_only_covers_the_prompts_every_method_finished(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An eval cut short (prompt 2 has only its base_ar row): the plain rerun would decode, --report-only decodes
    nothing and reports prompts 0-1, saying 2 of 3; an empty folder is refused."""
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, prompts, out) == 0
    full = json.loads((out / "report.json").read_text())
    rows_path = out / "rows-rank0.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()]
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["index"] != 2 or r["method"] == REFERENCE))

    def no_model(*args, **kwargs):
        raise AssertionError("--report-only loaded a model")

    monkeypatch.setattr("cllm.models.loading.load_model", no_model)
    assert _eval(tiny_model_dir, prompts, out, "--report-only") == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["prompts_finished"], report["prompts_planned"]) == (2, 3)
    assert full["prompts_finished"] == full["prompts_planned"] == 3
    kept = [r for r in rows if r["index"] < 2 and r["method"] == "jacobi"]
    assert report["methods"]["jacobi"]["n_prompts"] == 2
    assert report["methods"]["jacobi"]["new_tokens"] == sum(r["new_tokens"] for r in kept)
    assert "Cut short: 2 of the 3 planned prompts" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert _eval(tiny_model_dir, prompts, tmp_path / "empty", "--report-only") == 2
    assert "only 0 of 3 prompts are finished" in capsys.readouterr().err


def test_eval_extended_with_a_method_runs_only_that_method(tiny_model_dir, other_model_dir, tmp_path, monkeypatch):
    """A finished base_ar+jacobi eval gets the checkpoint's own AR added: old rows stay, the report flags the runs."""
    # Both runs in "the same second" of one process: their rows must still carry different run labels.
    monkeypatch.setattr("time.strftime", lambda *a, **k: "20260101T000000")
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "eval"
    first = ["--base-model", str(other_model_dir), "--warmup", "0"]
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "jacobi",
                 "--block-size", "4", "--max-new-tokens", "12", "--dtype", "fp64", "--out-dir", str(out), *first]) == 0
    rows_path = out / "rows-rank0.jsonl"
    before = rows_path.read_text().splitlines()
    assert len(before) == 6
    assert _eval(tiny_model_dir, prompts, out, *first) == 0  # --methods ar,jacobi: ar is new
    after = [json.loads(x) for x in rows_path.read_text().splitlines()]
    assert [json.dumps(r) for r in after[:6]] == [json.dumps(json.loads(x)) for x in before]  # untouched
    assert sorted((r["index"], r["method"]) for r in after[6:]) == [(0, "ar"), (1, "ar"), (2, "ar")]
    assert {r["run"] for r in after[6:]}.isdisjoint({r["run"] for r in after[:6]})
    report = json.loads((out / "report.json").read_text())
    m = report["methods"]
    assert report["settings"]["methods"] == [REFERENCE, "ar", "jacobi"]
    assert m["jacobi"]["exact_match_own_ar"] == 1.0  # lossless against the checkpoint's own AR (fp64)
    assert m["jacobi"]["n_other_run_than_base_ar"] == 0 and m["ar"]["n_other_run_than_base_ar"] == 3
    assert "ar was timed in another run than base_ar on 3 of 3 prompts" in (out / "summary.md").read_text()
    # Leaving out a method of the finished eval is refused, rows kept.
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "ar",
                 "--block-size", "4", "--max-new-tokens", "12", "--dtype", "fp64", "--out-dir", str(out), *first]) == 2
    assert len(rows_path.read_text().splitlines()) == 9


def test_eval_larger_limit_adds_prompts_and_changed_prompts_are_refused(tiny_model_dir, tmp_path, capsys):
    """--limit 2 then --limit 3 into one folder: only prompt 2 runs; a smaller limit or other prompts are refused."""
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, prompts, out, "--limit", "2") == 0
    rows_path = out / "rows-rank0.jsonl"
    before = rows_path.read_text().splitlines()
    assert len(before) == 6
    assert _eval(tiny_model_dir, prompts, out, "--limit", "3") == 0
    after = rows_path.read_text().splitlines()
    assert after[:6] == before  # the finished prompts are untouched
    assert sorted(json.loads(x)["index"] for x in after[6:]) == [2, 2, 2]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["limit"] == 3 and report["methods"]["jacobi"]["n_prompts"] == 3
    capsys.readouterr()
    assert _eval(tiny_model_dir, prompts, out, "--limit", "2") == 2  # shrinking would drop finished rows
    assert "--limit may only grow" in capsys.readouterr().err
    # The same limit over a prompt file whose prompt 1 changed: its finished rows would be scored wrongly.
    lines = prompts.read_text().splitlines()
    lines[1] = json.dumps({"prompt": "w9 w8 w7", "id": "other", "answer": "#### 17"})
    prompts.write_text("\n".join(lines) + "\n")
    assert _eval(tiny_model_dir, prompts, out, "--limit", "3") == 2
    assert "prompt 1 is 'other'" in capsys.readouterr().err
    assert rows_path.read_text().splitlines() == after
    assert json.loads((out / "eval_manifest.json").read_text())["limit"] == 3


def test_eval_against_another_base_model(tiny_model_dir, other_model_dir, tmp_path):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, prompts, out, "--base-model", str(other_model_dir)) == 0
    report = json.loads((out / "report.json").read_text())
    m = report["methods"]
    assert report["settings"]["base_model"] == str(other_model_dir)
    assert m["ar"]["exact_match_base_ar"] < 1.0  # another model answers differently
    # ... while Jacobi stays lossless against the checkpoint's own AR (fp64); base_ar has no own-AR column
    assert m["jacobi"]["exact_match_own_ar"] == 1.0 and m["ar"]["exact_match_own_ar"] == 1.0
    assert "exact_match_own_ar" not in m[REFERENCE]
    assert "| same as own AR |" in (out / "summary.md").read_text()
    assert m["jacobi"]["tokens_per_second"] / m[REFERENCE]["tokens_per_second"] == pytest.approx(
        m["jacobi"]["speedup_vs_base_ar"])


def test_eval_base_methods_give_base_vs_trained_rows(tiny_model_dir, other_model_dir, tmp_path):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, prompts, out, "--base-model", str(other_model_dir), "--base-methods", "jacobi") == 0
    m = json.loads((out / "report.json").read_text())["methods"]
    assert list(m) == [REFERENCE, "base_jacobi", "ar", "jacobi"]
    assert m["base_jacobi"]["exact_match_base_ar"] == 1.0  # Jacobi on the base reproduces the base's AR (fp64)
    assert m["jacobi"]["exact_match_base_ar"] < 1.0
    assert "exact_match_own_ar" not in m["base_jacobi"] and m["jacobi"]["exact_match_own_ar"] == 1.0


def test_eval_bad_input(tiny_model_dir, tmp_path, capsys):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, prompts, out) == 0
    capsys.readouterr()
    # Another setting into the same folder: refused, rows kept.
    assert _eval(tiny_model_dir, prompts, out, "--block-size", "8") == 2
    assert "block_size" in capsys.readouterr().err and (out / "rows-rank0.jsonl").is_file()
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "ar,beam",
                 "--out-dir", str(tmp_path / "x")]) == 2
    assert "unknown method 'beam'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "sps",
                 "--out-dir", str(tmp_path / "x")]) == 2
    assert "--draft" in capsys.readouterr().err
    # A typo in --model or --adapter is refused before the eval folder is made, so the corrected command runs as is
    fresh = tmp_path / "fresh"
    for flags, msg in ((["--model", str(tmp_path / "typo")], "model path not found"),
                       (["--model", str(tiny_model_dir), "--adapter", str(tmp_path)], "adapter_config.json"),
                       (["--model", str(tmp_path)], "no config.json")):
        assert main(["eval", *flags, "--prompts", str(prompts), "--out-dir", str(fresh)]) == 2
        assert msg in capsys.readouterr().err and not fresh.exists()
    assert _eval(tiny_model_dir, prompts, fresh) == 0


def test_eval_training_log_plot(tiny_model_dir, tmp_path):
    log_dir = tmp_path / "train"
    log_dir.mkdir()
    (log_dir / "log_history.json").write_text(json.dumps(
        [{"step": s, "loss": 5.0 / s, "loss/ar": 0.3 / s, "loss/consistency": 2.0 / s} for s in range(1, 6)]))
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 1)
    assert _eval(tiny_model_dir, prompts, tmp_path / "eval", "--training-log", str(log_dir)) == 0
    assert (tmp_path / "eval" / "training_loss.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_torchrun_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", 4)
    assert _eval(tiny_model_dir, prompts, tmp_path / "one", "--warmup", "0") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
         str(REPO / "decode" / "evaluate.py"), "--model", str(tiny_model_dir), "--prompts", str(prompts),
         "--methods", "ar,jacobi", "--block-size", "4", "--max-new-tokens", "12", "--dtype", "fp64",
         "--warmup", "0", "--out-dir", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = {f.name: {json.loads(x)["index"] for x in f.read_text().splitlines()}
             for f in (tmp_path / "two").glob("rows-rank*.jsonl")}
    assert set(ranks) == {"rows-rank0.jsonl", "rows-rank1.jsonl"}
    assert ranks["rows-rank0.jsonl"].isdisjoint(ranks["rows-rank1.jsonl"])
    assert ranks["rows-rank0.jsonl"] | ranks["rows-rank1.jsonl"] == {0, 1, 2, 3}
    for m in ("ar", "jacobi"):
        one = (tmp_path / "one" / "answers" / f"{m}.jsonl").read_text().splitlines()
        two = (tmp_path / "two" / "answers" / f"{m}.jsonl").read_text().splitlines()
        assert [json.loads(x)["choices"][0]["turns"] for x in one] == [json.loads(x)["choices"][0]["turns"] for x in two]


def test_energy_per_token_only_where_every_row_measured_it():
    from cllm.eval.summary import summarize

    def row(tokens, joules):
        return {"new_tokens": tokens, "forwards": tokens, "seconds": 1.0, "cpu_seconds": 2.0, "accept_lengths": [1],
                "fast_forward": 0, "stationary": 0, "correct": None, "degenerate": False, "base_logprob_mean": -1.0,
                "joules": joules}

    assert summarize([row(10, 3.0), row(30, 5.0)], None)["energy_j_per_token"] == 8.0 / 40
    assert summarize([row(10, 3.0), row(30, None)], None)["energy_j_per_token"] is None
    assert summarize([row(10, 3.0)], None)["cpu_s_per_token"] == 2.0 / 10



HUMANEVAL = REPO.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason="HumanEval data not in ../shared/data")
def test_generated_code_is_refused_at_a_weak_sandbox_unless_allowed_and_the_level_is_reported(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    from cllm.eval import sandbox

    monkeypatch.setattr(sandbox, "_probe", lambda: ("basic", "no bubblewrap in this test"))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_model_dir), "--dataset", "humaneval", "--limit", "1", "--methods", "ar",
            "--block-size", "4", "--max-new-tokens", "6", "--dtype", "fp64", "--out-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "only at the 'basic' level (no bubblewrap in this test)" in err and "--allow-weak-sandbox" in err
    assert not out.exists()  # refused before anything was written
    assert main(argv + ["--allow-weak-sandbox"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sandbox_level"] == "basic"
    assert "sandbox at the `basic` level (weak" in (out / "summary.md").read_text()
    rows = [json.loads(x) for x in (out / "rows-rank0.jsonl").read_text().splitlines()]
    assert {r["sandbox_level"] for r in rows} == {"basic"} and all(r["correct"] is False for r in rows)


def test_an_eval_started_before_per_method_options_resumes_and_still_refuses_other_options(tmp_path):
    """A manifest of flat options (written before options were recorded per method) is checked option by option
    against every method that has it: the same command resumes, another block size is refused."""
    import shutil
    from pathlib import Path

    from cllm import config as cfg_mod
    from cllm.eval.config import EvalConfig
    from cllm.errors import CllmError
    from cllm.eval.runner import _check_manifest, settings_of

    old = Path(__file__).resolve().parents[1] / "docs/results/gated/g1_gsm8k100_fp32/eval_manifest.json"
    assert "block_size" in json.loads(old.read_text()) and "method_options" not in json.loads(old.read_text())
    shutil.copy(old, tmp_path / "eval_manifest.json")

    def settings(**over):
        c = cfg_mod.resolve(EvalConfig, {"model": "smollm2-135m", "adapter": "models/smollm2-135m-gated-gsm8k",
                                         "dataset": "gsm8k", "limit": 100, "methods": "gated",
                                         "base_methods": "lookahead", "dtype": "fp32", "max_new_tokens": 256,
                                         "block_size": 16, "out_dir": str(tmp_path), **over})
        return settings_of(c, c.method_names())

    _check_manifest(tmp_path, settings(), False, [])
    shutil.copy(old, tmp_path / "eval_manifest.json")
    with pytest.raises(CllmError, match="block_size=16, this one runs gated with 8"):
        _check_manifest(tmp_path, settings(block_size=8), False, [])


def test_an_eval_recorded_before_an_option_was_added_resumes_at_its_default(tmp_path):
    """g22's eval recorded gated's options before gated could sample: the same command resumes (the new options at
    their defaults are what it ran with); gated at temperature 0.7 is refused."""
    from pathlib import Path

    from cllm import config as cfg_mod
    from cllm.errors import CllmError
    from cllm.eval.config import EvalConfig
    from cllm.eval.runner import _check_manifest, settings_of

    old = Path(__file__).resolve().parents[1] / "docs/results/gated/g22_gsm8k100_bf16/eval_manifest.json"
    g = "gated:block_size=4:lookup_tokens=5:pool_candidates=1"
    assert "temperature" not in json.loads(old.read_text())["method_options"][g]

    # the recorded adapter (runs/ablation/g22_export) is not in a clean clone: a committed one takes its place in
    # both the record and the command, so only the method options differ from what g22's run recorded
    adapter = Path(__file__).resolve().parents[1] / "experiments/ablation/adapters/g21_gated_top8_block4"
    record = json.loads(old.read_text())
    record["adapter"] = str(adapter)

    def settings(**over):
        c = cfg_mod.resolve(EvalConfig, {"model": "smollm2-135m", "adapter": str(adapter),
                                         "dataset": "gsm8k", "limit": 100, "methods": g, "dtype": "bf16",
                                         "base_methods": "hf,lookahead:lookahead_window=3:lookahead_ngram=3:"
                                                         "lookahead_guesses=3", "max_new_tokens": 256,
                                         "out_dir": str(tmp_path), **over})
        return settings_of(c, c.method_names())

    (tmp_path / "eval_manifest.json").write_text(json.dumps(record))
    _check_manifest(tmp_path, settings(), False, [])
    sampled = settings()
    sampled["method_options"][g]["temperature"] = 0.7  # an added option away from its default
    (tmp_path / "eval_manifest.json").write_text(json.dumps(record))
    with pytest.raises(CllmError, match="ran with"):
        _check_manifest(tmp_path, sampled, False, [])
