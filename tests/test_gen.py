"""`cllm gen`: trajectories are right, resumable after any interruption, shardable, and bad input is refused."""

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

from cllm.cli import main
from cllm.data.collect import generate
from cllm.config import resolve
from cllm.decoding import ar_decode
from cllm.models import load_model
from cllm.data.prompts import format_prompt
from cllm.data.trajectories import (
    GenConfig,
    augment_state,
    first_prompts_cpu_seconds,
    load_trajectories,
    longest_run,
    summarize,
    thin_states,
    tile_guesses,
)

REPO = Path(__file__).resolve().parents[1]


def prompt_file(path: Path, n: int = 7) -> Path:
    lines = [json.dumps({"prompt": " ".join(f"w{3 + (i * 11 + j * 5) % 60}" for j in range(1 + i % 4)),
                         "answer": f"w{10 + i} w{11 + i}"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def cfg_for(model_dir, prompts, out, **kw) -> GenConfig:
    base = dict(model=str(model_dir), prompts=str(prompts), out=str(out), dtype="fp64", block_size=4,
                max_new_tokens=16, batch_size=3, repeat_threshold=0)
    base.update(kw)
    return resolve(GenConfig, base)


def record_set(out) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in load_trajectories(out))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen-ref")
    prompts = prompt_file(tmp / "p.jsonl")
    summary = generate(cfg_for(tiny_model_dir, prompts, tmp / "ref"))
    return prompts, tmp / "ref", summary


def test_pure_helpers():
    assert longest_run([1, 2, 2, 2, 3, 3]) == 3 and longest_run([]) == 0
    states = [[i] for i in range(10)]
    assert thin_states(states, 0) == states and thin_states(states, 20) == states
    assert thin_states(states, 3) == [[0], [5], [9]] or thin_states(states, 3) == [[0], [4], [9]]
    assert thin_states(states, 2) == [[0], [9]]
    gen = torch.Generator().manual_seed(0)
    fp = [1, 2, 3, 4, 5, 6]
    aug = augment_state([9, 9, 9, 9, 5, 6], fp, 0.5, gen)
    wrong_before, wrong_after = 4, sum(a != b for a, b in zip(aug, fp))
    assert wrong_after == wrong_before - 2 and all(a in (9, b) for a, b in zip(aug, fp))
    assert augment_state([1, 2, 3, 4, 5, 9], fp, 0.5, gen) is None  # one wrong token: nothing to augment
    assert sum(a != b for a, b in zip(augment_state([9] * 6, fp, 1.0, gen), fp)) == 1


def test_tile_guesses_covers_the_text_with_consecutive_blocks():
    """By hand: guesses of width 3 at offsets 0, 1, 3, 4, 8 (each forward committed a + 1 tokens) over 11 tokens.
    Kept: 0 (ends at 3), 3 (ends at 6), 8 (ends at 11, cut to the text); 6..8 is a noise-0 block; 1 and 4 overlap."""
    from cllm.decoding.common import BlockTrajectory

    text = list(range(100, 111))
    starts = [0, 1, 3, 4, 8]
    guesses = [BlockTrajectory(i, s, [[7, 8, 9]], text[s : s + 3]) for i, s in enumerate(starts)]
    tiles = tile_guesses(guesses, text)
    assert [(b.block_index, b.start) for b in tiles] == [(0, 0), (1, 3), (2, 6), (3, 8)]
    assert [b.fixed_point for b in tiles] == [text[0:3], text[3:6], text[6:8], text[8:11]]
    assert [b.states for b in tiles] == [[[7, 8, 9]], [[7, 8, 9]], [text[6:8]], [[7, 8, 9]]]
    # a guess past the end (the last forward's, fixed point cut by EOS) keeps its committed part only
    short = [BlockTrajectory(0, 0, [[7, 8, 9]], text[:3]), BlockTrajectory(1, 3, [[5, 6, 4]], text[3:4])]
    assert [(b.start, b.states, b.fixed_point) for b in tile_guesses(short, text[:4])] == [
        (0, [[7, 8, 9]], text[:3]), (3, [[5]], text[3:4])]
    assert [b.fixed_point for b in tile_guesses([], text[:4])] == [text[:1], text[1:2], text[2:3], text[3:4]]


def test_first_prompts_cpu_seconds_counts_the_batches_of_those_prompts(tmp_path):
    """Two shards of batches: 10 + 30 CPU s for prompts 0-3, then 50 + 70 s for an extension (4-7, 9, 11)."""
    def progress(shard, batches):
        lines = [json.dumps({"data_ids": ids, "skipped": {}, "n_records": 0, "cpu_seconds": cpu}) for ids, cpu in batches]
        (tmp_path / f"progress-0000{shard}-of-00002.jsonl").write_text("\n".join(lines) + "\n")

    progress(0, [([0, 2], 10.0), ([4, 6], 50.0)])
    progress(1, [([1, 3], 30.0), ([5, 7, 9, 11], 70.0)])
    assert first_prompts_cpu_seconds(tmp_path, 4) == pytest.approx(40.0)  # the batches of 0-3, not 4/10 of 160
    assert first_prompts_cpu_seconds(tmp_path, 2) == pytest.approx(20.0)  # half of each batch holding 0 and 1
    assert first_prompts_cpu_seconds(tmp_path, 10) == pytest.approx(160.0)  # every prompt (10 ids in all)
    assert first_prompts_cpu_seconds(tmp_path, 6) == pytest.approx(40.0 + 50.0 / 2 + 70.0 / 4)  # 0-5


def test_records_are_jacobi_trajectories_of_greedy_output(reference, tiny_model_dir):
    prompts, out, summary = reference
    records = load_trajectories(out)
    model, tok = load_model(str(tiny_model_dir), dtype="fp64")
    by_prompt: dict[int, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["data_id"], []).append(r)
    assert sorted(by_prompt) == list(range(7)) and summary["prompts_done"] == 7
    for data_id, blocks in by_prompt.items():
        text = json.loads(prompts.read_text().splitlines()[data_id])["prompt"]
        ids = format_prompt(tok, text)
        greedy = ar_decode(model, tok, ids, max_new_tokens=16).token_ids
        assert [b["block_index"] for b in blocks] == list(range(len(blocks)))
        assert sum((b["fixed_point"] for b in blocks), []) == greedy
        for b in blocks:
            assert b["prompt_len"] == len(ids)
            assert b["prompt_ids"] == ids + greedy[: 4 * b["block_index"]]
            assert all(len(s) == len(b["fixed_point"]) for s in b["states"])
            if len(b["fixed_point"]) < 4:
                assert b["fixed_point"][-1] == tok.eos_token_id  # only an EOS block is shorter than n
            # The last state reaches the fixed point in one full Jacobi step.
            last = b["states"][-1]
            with torch.no_grad():
                logits = model(torch.tensor([b["prompt_ids"] + last[:-1]])).logits[0]
            assert logits[len(b["prompt_ids"]) - 1 :].argmax(-1).tolist() == b["fixed_point"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["block_size"] == 4 and manifest["config"]["seed"] == 0


def test_readable_with_hf_datasets(reference):
    from datasets import load_dataset

    _, out, _ = reference
    files = [str(p) for p in sorted(out.glob("part-*.jsonl"))]
    ds = load_dataset("json", data_files=files, split="train")
    assert len(ds) == len(load_trajectories(out)) and "states" in ds.column_names


def test_resume_after_exception_gives_the_same_records(reference, tiny_model_dir, tmp_path):
    prompts, ref_out, _ = reference

    def boom(n):
        if n == 2:
            raise RuntimeError("simulated crash")

    cfg = cfg_for(tiny_model_dir, prompts, tmp_path / "o")
    with pytest.raises(RuntimeError):
        generate(cfg, after_commit=boom)
    assert summarize(tmp_path / "o")["prompts_done"] == 6
    generate(cfg)
    assert record_set(tmp_path / "o") == record_set(ref_out)


def test_torn_writes_are_repaired(reference, tiny_model_dir, tmp_path):
    prompts, ref_out, _ = reference
    cfg = cfg_for(tiny_model_dir, prompts, tmp_path / "o", limit=3)
    generate(cfg)
    part = next((tmp_path / "o").glob("part-*.jsonl"))
    progress = next((tmp_path / "o").glob("progress-*.jsonl"))
    with open(part, "a") as f:
        f.write('{"data_id": 5, "block_index": 0, "stat')  # a record cut by a kill
    with open(progress, "a") as f:
        f.write('{"data_ids": [3')  # a progress line cut by a kill
    generate(cfg_for(tiny_model_dir, prompts, tmp_path / "o"))
    assert record_set(tmp_path / "o") == record_set(ref_out)


@pytest.mark.parametrize("kill_after", [1, 5])
def test_sigkill_then_resume(kill_after, tiny_model_dir, tmp_path):
    prompts = prompt_file(tmp_path / "p.jsonl", n=30)
    generate(cfg_for(tiny_model_dir, prompts, tmp_path / "ref", batch_size=1))
    out = tmp_path / "o"
    cmd = [sys.executable, str(REPO / "data_gen" / "generate_trajectories.py"), "--model", str(tiny_model_dir),
           "--prompts", str(prompts), "--out", str(out), "--dtype", "fp64", "--block-size", "4",
           "--max-new-tokens", "16", "--batch-size", "1", "--repeat-threshold", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    progress = out / "progress-00000-of-00001.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-1000:]
    assert kill_after <= summarize(out)["prompts_done"] < 30
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert record_set(out) == record_set(tmp_path / "ref")


def test_job_array_shards_are_disjoint_and_complete(reference, tiny_model_dir, tmp_path):
    prompts, ref_out, _ = reference
    for i in range(3):
        generate(cfg_for(tiny_model_dir, prompts, tmp_path / "o", num_shards=3, shard_index=i))
    ids = [sorted({r["data_id"] for r in load_trajectories(tmp_path / "o")})]
    assert ids[0] == list(range(7))
    assert record_set(tmp_path / "o") == record_set(ref_out)
    assert len(list((tmp_path / "o").glob("progress-*"))) == 3


def test_torchrun_two_ranks_equal_one_process(reference, tiny_model_dir, tmp_path):
    prompts, ref_out, _ = reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "data_gen" / "generate_trajectories.py"), "--model", str(tiny_model_dir), "--prompts",
           str(prompts), "--out", str(tmp_path / "o"), "--dtype", "fp64", "--block-size", "4",
           "--max-new-tokens", "16", "--batch-size", "3", "--repeat-threshold", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_rank = [{r for e in map(json.loads, p.read_text().splitlines()) for r in e["data_ids"]}
                for p in sorted((tmp_path / "o").glob("progress-*"))]
    assert len(per_rank) == 2 and not per_rank[0] & per_rank[1]
    assert record_set(tmp_path / "o") == record_set(ref_out)


def test_labels_augmentation_and_repeat_filter(tiny_model_dir, tmp_path):
    prompts = prompt_file(tmp_path / "p.jsonl", n=3)
    s = generate(cfg_for(tiny_model_dir, prompts, tmp_path / "o", labels=True, augment=True, repeat_threshold=2))
    recs = load_trajectories(tmp_path / "o")
    _, tok = load_model(str(tiny_model_dir))
    assert s["blocks_kept"] + s["blocks_dropped"] == s["blocks"] and s["blocks_dropped"] > 0
    for r in recs:
        assert longest_run(r["fixed_point"]) < 2
        assert r["label_ids"][-1] == tok.eos_token_id and "aug_states" in r


def run_cli(args, capsys):
    capsys.readouterr()  # drop what earlier calls printed
    code = main(["gen", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_records_fail_with_file_and_line_or_are_skipped(tiny_model_dir, tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "w3 w4"}\n{"prompt": "w5"\n{"prompt": ""}\n{"prompt": "w6"}\n')
    common = ["--model", str(tiny_model_dir), "--prompts", str(p), "--block-size", "4", "--max-new-tokens", "8"]
    code, err = run_cli([*common, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and len(err) == 1 and f"{p}:2: not valid JSON" in err[0]
    s = generate(resolve(GenConfig, {"model": str(tiny_model_dir), "prompts": str(p), "out": str(tmp_path / "b"),
                                     "block_size": 4, "max_new_tokens": 8, "on_bad_record": "skip"}))
    assert s["bad_records_skipped"] == 2 and s["prompts_done"] == 2


def test_long_prompts_are_skipped_or_truncated(tiny_model_dir, tmp_path):
    prompts = prompt_file(tmp_path / "p.jsonl", n=4)  # prompts of 1..4 tokens
    s = generate(cfg_for(tiny_model_dir, prompts, tmp_path / "a", max_prompt_tokens=2))
    assert s["prompts_skipped"] == 2 and s["skipped_reasons"] == {"too_long": 2} and s["prompts_done"] == 2
    s = generate(cfg_for(tiny_model_dir, prompts, tmp_path / "b", max_prompt_tokens=2, on_long_prompt="truncate"))
    assert s["prompts_done"] == 4
    assert all(r["prompt_len"] <= 2 for r in load_trajectories(tmp_path / "b"))


def test_config_mismatch_and_other_bad_input(reference, tiny_model_dir, tmp_path, capsys):
    prompts, ref_out, _ = reference
    out = tmp_path / "o"
    generate(cfg_for(tiny_model_dir, prompts, out, limit=2))
    before = record_set(out)
    common = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--dtype", "fp64", "--block-size", "4",
              "--max-new-tokens", "16", "--repeat-threshold", "0"]
    code, err = run_cli([*common, "--out", str(out), "--seed", "1"], capsys)
    assert code == 2 and "another config (seed: 0 there, 1 now)" in err[0]
    assert record_set(out) == before  # nothing written lost
    code, _ = run_cli([*common, "--out", str(out), "--seed", "1", "--overwrite"], capsys)
    assert code == 0 and summarize(out)["prompts_done"] == 7
    code, err = run_cli(["--dataset", "imagenet", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "unknown dataset" in err[0]
    code, err = run_cli([*common, "--out", str(tmp_path / "y"), "--max-new-tokens", "10"], capsys)
    assert code == 2 and "multiple of --block-size" in err[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("block_size: 4\nblok_size: 8\n")
    code, err = run_cli(["--config", str(cfg), "--dataset", "gsm8k", "--out", str(tmp_path / "z")], capsys)
    assert code == 2 and "unknown key 'blok_size'" in err[0]


def test_a_bad_model_writes_nothing_and_the_corrected_rerun_needs_no_overwrite(tiny_model_dir, tmp_path, capsys):
    prompts = prompt_file(tmp_path / "p.jsonl", n=2)
    out = tmp_path / "o"
    common = ["--prompts", str(prompts), "--dtype", "fp64", "--block-size", "4", "--max-new-tokens", "8",
              "--out", str(out)]
    code, err = run_cli(["--model", str(tmp_path / "no-such-model"), *common], capsys)
    assert code == 2 and "no-such-model" in err[0]
    assert not out.exists()  # no manifest that would refuse the corrected command
    code, _ = run_cli(["--model", str(tiny_model_dir), *common], capsys)
    assert code == 0 and summarize(out)["prompts_done"] == 2
