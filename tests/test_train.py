"""CLLM training: packed examples equal separate forwards, short runs train/checkpoint/resume/save, bad input."""

from __future__ import annotations

import itertools

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cllm.cli import main
from cllm.data.collect import generate
from cllm.training.config import TrainConfig
from cllm.training.run import train
from cllm.config import resolve
from cllm.training.objectives.cllm import CONTEXT, FIXED, LABELS, NEXT, PAD, PROMPT, STATE, PackedCollator, segment_mask
from cllm.data.trajectories import GenConfig
from cllm.decoding.options import JacobiOptions
from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def traj_dir(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traj")
    lines = [json.dumps({"prompt": " ".join(f"w{3 + (i * 13 + j * 7) % 60}" for j in range(3 + i % 3)),
                         "answer": f"w{5 + i} w{6 + i} w{7 + i}"}) for i in range(6)]
    (tmp / "p.jsonl").write_text("\n".join(lines) + "\n")
    generate(resolve(GenConfig, {"model": str(tiny_model_dir), "prompts": str(tmp / "p.jsonl"), "out": str(tmp / "t"),
                                 "block_size": 4, "max_new_tokens": 12, "batch_size": 6, "repeat_threshold": 0,
                                 "labels": True}))
    return tmp / "t"


def test_segment_mask_against_brute_force():
    seg = torch.tensor([[PROMPT, PROMPT, CONTEXT, FIXED, FIXED, STATE, STATE, NEXT, LABELS, PAD]])
    got = segment_mask(seg)[0]
    s = seg[0].tolist()
    for q in range(len(s)):
        for k in range(len(s)):
            if k == q:
                want = True
            elif k > q or s[q] == PAD:
                want = False
            elif s[q] == LABELS:
                want = s[k] in (PROMPT, LABELS)
            else:  # prompt, context and block queries: the context and their own segment
                want = s[k] in (PROMPT, CONTEXT) or s[k] == s[q]
                want = want and not (s[q] == PROMPT and s[k] == CONTEXT)
            assert bool(got[q, k]) == want, (q, k)


@torch.no_grad()
def test_packed_forward_equals_separate_forwards():
    model = tiny_model(5)
    ctx, p_len = [5, 6, 7, 8, 9, 10], 4
    fp, st, nxt, labels = [11, 12, 13, 14], [20, 21, 22, 23], [11, 30, 31, 32], [40, 41, 42]
    for (local, ar_target), scope in itertools.product([(False, "fixed_point"), (True, "labels")],
                                                       ["answer", "prompt_and_answer"]):
        ex = {"prompt_ids": ctx, "prompt_len": p_len, "fixed_point": fp, "state": st,
              "next_state": nxt if local else None, "label_ids": labels}
        short = {"prompt_ids": ctx[:5], "prompt_len": 3, "fixed_point": fp[:2], "state": st[:2],
                 "next_state": nxt[:2] if local else None, "label_ids": labels[:2]}
        batch = PackedCollator(0, 4, ar_target, torch.float64, ar_scope=scope)([ex, short])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits

        def sep(seq, start, k):  # logits predicting seq[start : start + k] from a plain causal forward
            return model(torch.tensor([seq])).logits[0, start - 1 : start - 1 + k]

        for b, e in enumerate([ex, short]):
            m, c = len(e["fixed_point"]), e["prompt_ids"]
            pick = lambda key: logits[b, batch[key][b, :m]]  # noqa: E731
            assert torch.allclose(pick("student_idx"), sep(c + e["state"], len(c), m), atol=1e-10)
            teacher = e["next_state"] if local else e["fixed_point"]
            assert torch.allclose(pick("teacher_idx"), sep(c + teacher, len(c), m), atol=1e-10)
            a = int(batch["ar_mask"][b].sum())
            ar_logits = logits[b, batch["ar_idx"][b, :a]]
            # the AR text: prompt + labels, or prompt + generated context + block
            lead = c[: e["prompt_len"]] if ar_target == "labels" else c
            answer = e["label_ids"] if ar_target == "labels" else e["fixed_point"]
            start = 1 if scope == "prompt_and_answer" else len(lead)  # with the prompt: every next-token pair
            assert a == len(lead) + len(answer) - start
            assert torch.allclose(ar_logits, sep(lead + answer, start, a), atol=1e-10)
            assert batch["ar_target"][b, :a].tolist() == (lead + answer)[start:]


def train_cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=[str(data)], output_dir=str(out), block_size=4, max_steps=4,
                logging_steps=1, save_steps=2, learning_rate=1e-3, per_device_train_batch_size=2)
    base.update(kw)
    return resolve(TrainConfig, base)


def _weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def _probe_value(model_dir, records, data_ids, block_size=4) -> float:
    """What the Jacobi probe logs, recomputed from a saved model: tokens per forward over the prompts of these
    data_ids decoded together (4 blocks each)."""
    from cllm.decoding import jacobi_decode
    from cllm.models import load_model

    model, tok = load_model(str(model_dir), dtype="fp32")
    prompts = {}
    for r in records:
        prompts.setdefault(r["data_id"], r["prompt_ids"][: r["prompt_len"]])
    res = jacobi_decode(model, tok, [prompts[i] for i in data_ids], JacobiOptions(block_size=block_size),
                        max_new_tokens=4 * block_size)
    return round(sum(r.n_new_tokens for r in res) / sum(r.n_forwards for r in res), 4)


@pytest.mark.parametrize("peft", [False, True])
def test_short_run_trains_checkpoints_resumes_and_decodes(peft, tiny_model_dir, traj_dir, tmp_path):
    out = tmp_path / "run"
    metrics = train(train_cfg(tiny_model_dir, traj_dir, out, use_peft=peft, lora_r=4, lora_alpha=8,
                              gradient_accumulation_steps=2, gradient_checkpointing=True, jacobi_eval_steps=2,
                              report_to="tensorboard"))
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert all("loss/ar" in h and "loss/consistency" in h and "tokens_gained" in h for h in steps)
    probes = [h["jacobi/tokens_per_forward"] for h in steps if "jacobi/tokens_per_forward" in h]
    assert len(probes) == 2  # steps 2 and 4
    if not peft:  # the last probe is the saved model's Jacobi rate on the first 4 prompts (LoRA: merged, rounded)
        from cllm.data.trajectories import load_trajectories

        assert probes[-1] == _probe_value(out / "checkpoint-4", load_trajectories(traj_dir), [0, 1, 2, 3])
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    before, after = _weights(tiny_model_dir), _weights(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if peft:  # LoRA on all linear layers: every projection and the head change once merged
        assert all(k in changed for k in before if k.endswith("proj.weight"))
        assert (out / "adapter" / "adapter_config.json").is_file()
    else:
        assert sorted(changed) == sorted(before)  # every trainable parameter moved
    # Resume: continue from checkpoint-4 to step 6.
    train(train_cfg(tiny_model_dir, traj_dir, out, use_peft=peft, lora_r=4, lora_alpha=8,
                    gradient_accumulation_steps=2, max_steps=6, resume=True))
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h][-2:] == [5, 6]
    assert "checkpoint-6" in [p.name for p in out.glob("checkpoint-*")]
    cost = json.loads((out / "train_cost.json").read_text())
    assert [(c["from_step"], c["to_step"]) for c in cost["segments"]] == [(0, 4), (4, 6)]
    assert cost["cpu_seconds"] == pytest.approx(sum(c["cpu_seconds"] for c in cost["segments"]), abs=0.02)
    assert all(c["cpu_seconds"] > 0 and c["wall_seconds"] > 0 for c in cost["segments"])
    assert metrics["train_runtime"] > 0
    assert main(["decode", "--model", str(out), "--prompt", "w3 w4", "--max-new-tokens", "8", "--quiet"]) == 0


def test_held_out_probe_decodes_only_prompts_training_leaves_out(tiny_model_dir, traj_dir, tmp_path, monkeypatch):
    import cllm.decoding

    from cllm.data.trajectories import load_trajectories

    seen = []  # the prompts of each probe decode, as token-id tuples

    def recording(model, tok, prompts, *args, **kwargs):
        seen.append([tuple(p) for p in prompts])
        return real(model, tok, prompts, *args, **kwargs)

    real = cllm.decoding.jacobi_decode
    monkeypatch.setattr(cllm.decoding, "jacobi_decode", recording)
    records = load_trajectories(traj_dir)
    reversed_data = tmp_path / "reversed.jsonl"  # files need not list prompts in data_id order
    reversed_data.write_text("".join(json.dumps(r) + "\n" for r in reversed(records)))
    out = tmp_path / "run"
    train(train_cfg(tiny_model_dir, reversed_data, out, max_prompts=3, jacobi_eval_steps=2, jacobi_eval_prompts=2,
                    jacobi_eval_held_out=2))
    by_id = {}
    for r in records:
        by_id.setdefault(r["data_id"], tuple(r["prompt_ids"][: r["prompt_len"]]))
    ids = sorted(by_id)
    assert len(ids) == 6
    assert len(seen) == 4  # steps 2 and 4, held-in then held-out
    for held_in, held_out in (seen[0:2], seen[2:4]):
        assert held_in == [by_id[i] for i in ids[:2]]  # the first training prompts
        assert held_out == [by_id[i] for i in ids[3:5]]  # the data_ids right after the 3 trained ones
    probes = [h for h in json.loads((out / "log_history.json").read_text()) if "jacobi/tokens_per_forward" in h]
    assert [h["step"] for h in probes] == [2, 4]
    # the step-4 probes are the final model's Jacobi rates on those prompts
    assert probes[-1]["jacobi/tokens_per_forward"] == _probe_value(out, records, ids[:2])
    assert probes[-1]["jacobi/held_out_tokens_per_forward"] == _probe_value(out, records, ids[3:5])


def test_nan_loss_stops_with_the_step(tiny_model_dir, traj_dir, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(traj_dir), "--output-dir",
                 str(tmp_path / "o"), "--block-size", "4", "--max-steps", "3", "--ar-weight", "inf"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("cllm train: error:")]
    assert code == 2 and len(errors) == 1 and "non-finite loss at step 1" in errors[0]


def test_bad_data_and_config_are_refused(tiny_model_dir, traj_dir, tmp_path, capsys):
    from cllm.data.trajectories import load_trajectories

    recs = load_trajectories(traj_dir)
    wrong_format = tmp_path / "w.jsonl"
    wrong_format.write_text(json.dumps({"prompt": "x"}) + "\n")
    other_vocab = tmp_path / "v.jsonl"
    other_vocab.write_text(json.dumps({**recs[0], "fixed_point": [70000] * 4}) + "\n")
    yaml_bad = tmp_path / "c.yaml"
    yaml_bad.write_text("block_size: 4\nlearnig_rate: 0.1\n")
    common = ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")]
    cases = [
        (["--data", str(wrong_format)], "not a trajectory record"),
        (["--data", str(other_vocab), "--block-size", "4"], "outside the model's vocabulary"),
        (["--data", str(traj_dir), "--block-size", "8"], "block_size is 8"),
        (["--config", str(yaml_bad), "--data", str(traj_dir)], "unknown key 'learnig_rate'"),
        (["--data", str(tmp_path / "missing")], "trajectory data not found"),
        (["--data", str(traj_dir), "--block-size", "4", "--jacobi-eval-steps", "1", "--jacobi-eval-held-out", "1"],
         "needs --max-prompts"),
        (["--data", str(traj_dir), "--block-size", "4", "--jacobi-eval-steps", "10", "--max-prompts", "5",
          "--jacobi-eval-held-out", "2"], "holds only 1 prompts beyond --max-prompts 5"),
    ]
    for args, message in cases:
        capsys.readouterr()
        code = main(["train", *common, *args])
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cllm train: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, errors)


@pytest.mark.parametrize("zero,objective", [("zero2", "cllm"), ("zero3", "jacobi_forcing")])
def test_deepspeed_two_processes(zero, objective, tiny_model_dir, traj_dir, tmp_path):
    """DeepSpeed on 2 ranks ends with the weights of one process with the same global batch. Plain SGD without
    clipping (the Trainer's optimizer handed to DeepSpeed), so a wrong gradient scale (summed instead of averaged
    over ranks, a micro-batch counted twice) shows in the update: Adam's normalisation and clipping would hide it."""
    out = tmp_path / zero
    ds_cfg = json.loads((REPO / "configs" / "deepspeed" / f"{zero}.json").read_text())
    del ds_cfg["optimizer"]
    ds_cfg["zero_allow_untested_optimizer"] = True
    (tmp_path / "ds_sgd.json").write_text(json.dumps(ds_cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "cllm" / "torch_extensions")}
    port = "29561" if zero == "zero2" else "29562"
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port,
         str(REPO / "train" / "train_cllm.py"), "--model", str(tiny_model_dir), "--data", str(traj_dir),
         "--output-dir", str(out), "--block-size", "4", "--max-steps", "3", "--save-steps", "3", "--learning-rate",
         "1e-2", "--objective", objective, "--optim", "sgd", "--max-grad-norm", "0",
         "--deepspeed", str(tmp_path / "ds_sgd.json")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    before, after = _weights(tiny_model_dir), _weights(out)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    # The same run in one process with the same global batch (2 = 2 ranks x 1): the ranks' micro-batches are the
    # single process's batch split in two, and their gradients are averaged.
    single = tmp_path / "single"
    train(train_cfg(tiny_model_dir, traj_dir, single, max_steps=3, save_steps=3, objective=objective,
                    per_device_train_batch_size=2, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0))
    one = _weights(single)
    biggest = max(float((one[k] - before[k]).abs().max()) for k in before)
    assert biggest > 1e-4  # the runs moved the weights
    for k in before:
        ds_step, one_step = after[k] - before[k], one[k] - before[k]
        assert torch.allclose(ds_step, one_step, rtol=0, atol=1e-3 * biggest), (k, (ds_step - one_step).abs().max())


def test_cost_log_cuts_a_killed_segment_back_to_the_resumed_checkpoint(tmp_path):
    from cllm.training.run import CostLog

    (tmp_path / "train_cost.json").write_text(json.dumps({"segments": [
        {"from_step": 0, "to_step": 4, "wall_seconds": 8.0, "cpu_seconds": 15.0, "world_size": 1},
        {"from_step": 4, "to_step": 10, "wall_seconds": 9.0, "cpu_seconds": 17.0, "world_size": 1}]}))
    log = CostLog(str(tmp_path), step0=8)  # killed after step 10, resumed from checkpoint-8
    log.update(12, 1)
    cost = json.loads((tmp_path / "train_cost.json").read_text())
    assert [(c["from_step"], c["to_step"]) for c in cost["segments"]] == [(0, 4), (4, 8), (8, 12)]
    assert cost["wall_seconds"] >= 17.0 and cost["cpu_seconds"] >= 32.0


def test_drop_looping_leaves_out_whole_looping_responses(capsys, tiny_model_dir, traj_dir, tmp_path):
    from cllm.training.records import drop_looping

    def rec(data_id, block, context, fixed_point):
        return {"data_id": data_id, "block_index": block, "prompt_ids": [9, 9] + context, "prompt_len": 2,
                "states": [[0] * 4], "fixed_point": fixed_point}

    loop = [5, 6, 7] * 20  # a period-3 loop: no token repeats twice in a row, so repeat_threshold keeps it
    records = [rec(0, 0, [], [1, 2, 3, 4]), rec(0, 1, [1, 2, 3, 4], [8, 3, 1, 2]),
               rec(1, 0, [], loop[:4]), rec(1, 1, loop[:56], loop[56:60]),
               rec(2, 0, [], [5, 6, 7, 5])]
    kept, dropped = drop_looping(records)
    assert dropped == [1] and [(r["data_id"], r["block_index"]) for r in kept] == [(0, 0), (0, 1), (2, 0)]
    # through cllm train: the count is said, the rest trains
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(traj_dir), "--output-dir",
                 str(tmp_path / "o"), "--block-size", "4", "--max-steps", "1", "--drop-looping"]) == 0
    assert "--drop-looping: left out" in capsys.readouterr().err


def test_split_blocks_keeps_true_trajectories_of_the_smaller_block(tiny_model_dir, tmp_path):
    """Blocks of 8 cut into pieces of 4: every kept state of a piece steps (one Jacobi iteration on the piece's
    committed context) to the next kept state, and the last to the piece's fixed point; the pieces chain as
    consecutive blocks; blocks that are not a multiple are refused."""
    from cllm.errors import CllmError
    from cllm.models import load_model
    from cllm.training.records import read_records, split_blocks
    from test_jacobi import jacobi_step

    lines = [json.dumps({"prompt": " ".join(f"w{3 + (i * 11 + j * 5) % 60}" for j in range(3 + i % 3))})
             for i in range(4)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    generate(resolve(GenConfig, {"model": str(tiny_model_dir), "prompts": str(tmp_path / "p.jsonl"),
                                 "out": str(tmp_path / "t"), "block_size": 8, "max_new_tokens": 16,
                                 "batch_size": 4, "repeat_threshold": 0}))
    records = read_records(tmp_path / "t")
    pieces = split_blocks(records, 4)
    assert len(pieces) == sum(-(-len(r["fixed_point"]) // 4) for r in records)
    model = load_model(str(tiny_model_dir), dtype="fp32")[0]
    stepped = 0
    for p in pieces:
        states, fp = p["states"], p["fixed_point"]
        assert all(len(s) == len(fp) for s in states)
        for a, b in zip(states, [*states[1:], fp]):
            if a != fp:
                assert jacobi_step(model, p["prompt_ids"], a)[:len(fp)] == b
                stepped += 1
    assert stepped > len(pieces)  # the check ran on real iterations, not only on converged pieces
    by_id = {}
    for p in sorted(pieces, key=lambda p: (p["data_id"], p["block_index"])):
        ctx = by_id.get(p["data_id"], p["prompt_ids"])
        assert p["prompt_ids"] == ctx
        by_id[p["data_id"]] = ctx + p["fixed_point"]
    with pytest.raises(CllmError, match="not a multiple"):
        split_blocks(records, 3)


def test_split_blocks_by_hand():
    """Piece 1 keeps only the states whose piece 0 is already the fixed point's; states equal to the piece's
    fixed point and repeats go; a piece left with none keeps its fixed point."""
    from cllm.training.records import split_blocks

    r = {"data_id": 7, "block_index": 1, "prompt_ids": [9, 9, 5], "prompt_len": 2, "fixed_point": [1, 2, 3, 4],
         "states": [[0, 0, 0, 0], [1, 0, 6, 6], [1, 2, 6, 0], [1, 2, 3, 0]]}
    a, b = split_blocks([r], 2)
    assert (a["block_index"], a["prompt_ids"], a["states"], a["fixed_point"]) == (2, [9, 9, 5], [[0, 0], [1, 0]], [1, 2])
    assert (b["block_index"], b["prompt_ids"], b["states"], b["fixed_point"]) == (3, [9, 9, 5, 1, 2], [[6, 0], [3, 0]],
                                                                                    [3, 4])
    done = dict(r, states=[[1, 2, 3, 4]])
    assert [p["states"] for p in split_blocks([done], 2)] == [[[1, 2]], [[3, 4]]]


def test_two_sources_numbered_alike_keep_their_prompts_apart(tmp_path):
    """CoSQA and the stdlib prompts both number their prompts from 0: read together, the second source's data_ids
    are qualified with its name, so each response's blocks stay one prompt's (Jacobi Forcing groups by data_id);
    sources that collide under their names too are refused."""
    from cllm.errors import CllmError
    from cllm.training.objectives.jacobi_forcing import group_responses
    from cllm.training.records import read_records

    def write(path: Path, prompt: list[int]) -> Path:
        recs = [{"data_id": 0, "block_index": j, "prompt_ids": prompt + [5] * 2 * j, "prompt_len": len(prompt),
                 "states": [[0, 0]], "fixed_point": [5, 5]} for j in range(2)]
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return path

    a, b = write(tmp_path / "a.jsonl", [1, 2]), write(tmp_path / "b.jsonl", [3, 4, 6])
    records = read_records([a, b])
    assert sorted({r["data_id"] for r in records}, key=str) == [0, "b.jsonl/0"]
    responses = group_responses(records)
    assert sorted((r["prompt_ids"], len(r["blocks"])) for r in responses) == [([1, 2], 2), ([3, 4, 6], 2)]
    (tmp_path / "x").mkdir()
    with pytest.raises(CllmError, match="distinct names"):
        read_records([a, b, write(tmp_path / "x" / "b.jsonl", [7])])
