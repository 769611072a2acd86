"""`cllm decode` end to end on a tiny saved model: report, answers, bad input, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cllm.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, n: int = 5) -> Path:
    lines = [json.dumps({"prompt": " ".join(f"w{3 + (i * 7 + j) % 60}" for j in range(2 + i)), "id": f"p{i}"})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_decode_with_compare_writes_consistent_report(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl")
    report_path, answers = tmp_path / "report.json", tmp_path / "answers.jsonl"
    code = main(["decode", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--method", "jacobi",
                 "--compare", "ar", "--block-size", "4", "--max-new-tokens", "21", "--dtype", "fp64",
                 "--out", str(answers), "--report", str(report_path), "--batch-size", "2"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["n_prompts"] == 5 and report["settings"]["dtype"] == "fp64"
    ar, jac = report["methods"]["ar"], report["methods"]["jacobi"]
    for m in (ar, jac):
        assert {"tokens_per_second", "tokens_per_forward", "new_tokens", "wall_time_s", "forwards"} <= m.keys()
        assert m["tokens_per_second"] == pytest.approx(m["new_tokens"] / m["wall_time_s"], rel=1e-3)
    assert jac["speedup_vs_ar"] == pytest.approx(jac["tokens_per_second"] / ar["tokens_per_second"])
    assert jac["exact_match_ar"] == 1.0 and ar["tokens_per_forward"] == 1.0
    assert jac["new_tokens"] == ar["new_tokens"] and jac["forwards"] <= ar["forwards"]
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    ar_lines = [json.loads(x) for x in (tmp_path / "answers.ar.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [f"p{i}" for i in range(5)]
    choice = lines[0]["choices"][0]
    assert {"index", "turns", "new_tokens", "wall_time", "decoding_steps", "accept_lengths"} <= choice.keys()
    assert sum(choice["accept_lengths"]) == choice["new_tokens"][0]
    assert [x["choices"][0]["turns"] for x in lines] == [x["choices"][0]["turns"] for x in ar_lines]
    assert "x_vs_ar" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model_dir", "--prompt", "w3"], "model path not found"),
        (["--prompts", "{empty}"], "no prompts"),
        (["--prompts", "{nofield}"], "nofield.jsonl:2: no field 'prompt'"),
        (["--block-size", "0", "--prompt", "w3"], "--block-size must be >= 1"),
        (["--max-new-tokens", "-1", "--prompt", "w3"], "--max-new-tokens must be >= 1"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--prompt", "w3", "--dataset", "gsm8k"], "exactly one of"),
        (["--prompt", "w3", "--top-p", "1.5", "--method", "ar"], "top_p"),
        (["--prompt", "w3", "--out", "{tmp}"], "is a folder"),
        (["--prompt", "w3", "--report", "{empty}/r.json"], "is a file, so"),
        (["--prompt", "w3", "--adapter", "{tmp}"], "adapter_config.json"),
        (["--prompt", "w3 w4", "--max-new-tokens", "1023"], "prompt 0: 2 tokens + --max-new-tokens 1023 exceed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nofield.jsonl").write_text('{"prompt": "w3"}\n{"text": "w4"}\n')
    args = [a.format(empty=tmp_path / "empty.jsonl", nofield=tmp_path / "nofield.jsonl", tmp=tmp_path) for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    code = main(["decode", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("cllm decode: error:") and message in err[0]


def test_console_script_exit_code(tmp_path):
    exe = shutil.which("cllm") or pytest.fail("the console script `cllm` is not installed")
    proc = subprocess.run([exe, "decode", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"cllm decode: error: --model: model path not found: {tmp_path / 'missing'}"


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_keeps_exit_code_and_output(world_size):
    # A rank of several leaves through os._exit (skipping C++ teardown): its exit code and buffered output survive.
    code = "import sys; from cllm.distributed import exit_process; print('out'); sys.stderr.write('err'); exit_process(3)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "WORLD_SIZE": world_size})
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err")


def test_entry_script_main_is_callable(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(REPO / "decode"))
    try:
        import decode as decode_script
    finally:
        sys.path.pop(0)
    report = tmp_path / "r.json"
    assert decode_script.main(["--model", str(tiny_model_dir), "--prompt", "w5 w6", "--max-new-tokens", "5",
                               "--report", str(report), "--quiet"]) == 0
    assert json.loads(report.read_text())["methods"]["jacobi"]["new_tokens"] == 5


def test_torchrun_two_processes_split_prompts_and_merge(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", n=5)
    common = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--block-size", "4",
              "--max-new-tokens", "12", "--dtype", "fp64", "--quiet", "--warmup", "0"]
    assert main(["decode", *common, "--out", str(tmp_path / "one.jsonl"), "--report", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(REPO / "decode" / "decode.py"), *common, "--out", str(tmp_path / "two.jsonl"),
         "--report", str(tmp_path / "two.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in two] == [x["question_id"] for x in one]
    assert [x["choices"][0]["turns"] for x in two] == [x["choices"][0]["turns"] for x in one]
    rep = json.loads((tmp_path / "two.json").read_text())
    assert rep["n_prompts"] == 5 and rep["settings"]["world_size"] == 2


def test_help_of_every_command_loads_no_torch():
    """`cllm --help` and every `cllm COMMAND --help` build their parsers without importing torch (it costs
    seconds): config dataclasses and the decoding registry are torch-free."""
    for command in ([], ["decode"], ["eval"], ["gen"], ["train"], ["pipeline"], ["train-draft"]):
        code = ("import io, sys, contextlib, cllm.cli as c\n"
                f"sys.argv = ['cllm', *{command!r}, '--help']\n"
                "with contextlib.redirect_stdout(io.StringIO()):\n"
                "    try:\n        c.console_main()\n    except SystemExit:\n        pass\n"
                "print('torch' in sys.modules, 'transformers' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
        assert out.stdout.split() == ["False", "False"], command


def test_decode_prints_no_library_warnings(tiny_model_dir, tmp_path):
    """A new user's first screen is the answer: no DeepSpeed accelerator line, no FutureWarning that transformers
    raises about PEFT's calls (an adapter load triggers it), neither for --help nor for a decode with an adapter."""
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(adapter)
    # DeepSpeed imported after the command started, as `cllm train` does (it logs its accelerator line to stdout)
    code = "import sys; from cllm.cli import main; rc = main(sys.argv[1:]); import deepspeed; sys.exit(rc)"
    for args in (["decode", "--help"],
                 ["decode", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "w3 w4",
                  "--method", "ar", "--max-new-tokens", "3", "--quiet"]):
        out = subprocess.run([sys.executable, "-W", "default", "-c", code, *args], capture_output=True, text=True,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert out.returncode == 0, out.stderr
        lines = (out.stdout + out.stderr).splitlines()
        noise = [line for line in lines if "Warning" in line or "accelerator to" in line.lower()]
        assert noise == [], noise


def test_decode_reads_a_yaml_config_the_command_line_overrides(tiny_model_dir, tmp_path, capsys):
    import json

    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"# cllm decode --config d.yaml\nmodel: {tiny_model_dir}\nprompt: [w3 w4, w5 w6]\nmethod: jacobi\n"
                   f"compare: ar\nblock_size: 3\nmax_new_tokens: 12\ndtype: fp64\nreport: {tmp_path / 'r.json'}\n")
    assert main(["decode", "--config", str(cfg), "--max-new-tokens", "6", "--quiet"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["max_new_tokens"] == 6  # the flag over the YAML
    assert report["settings"]["method_options"]["jacobi"]["block_size"] == 3  # the YAML's
    assert set(report["methods"]) == {"jacobi", "ar"} and report["n_prompts"] == 2
    capsys.readouterr()
    cfg.write_text("blok_size: 3\n")
    assert main(["decode", "--config", str(cfg), "--prompt", "w3"]) == 2
    assert "unknown key 'blok_size'" in capsys.readouterr().err
    cfg.write_text("init: zeros\n")
    assert main(["decode", "--config", str(cfg), "--prompt", "w3"]) == 2
    assert "'init' must be one of" in capsys.readouterr().err
