"""One error path: every class of bad input in docs/bad_input.md's table ends in one line that names the file (and line,
where there is one) and exit code 2, before any work is lost. Fixtures are made here: truncated files, random
bytes, non-UTF-8 lines, an adapter for another base, a LoRA checkpoint resumed without --use-peft."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest

from cllm.cli import main
from cllm.training.checkpoints import seal
from conftest import save_tiny_model


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir):
    """name -> path of each broken fixture."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"prompts": root / "p.jsonl"}
    paths["prompts"].write_text('{"prompt": "w3 w4"}\n')
    for name, content in (("truncated", None), ("random", os.urandom(4000))):
        folder = root / name
        shutil.copytree(tiny_model_dir, folder)
        st = folder / "model.safetensors"
        st.write_bytes(content if content is not None else st.read_bytes()[:500])
        paths[name] = folder
    paths["gguf"] = root / "x.gguf"
    paths["gguf"].write_bytes(b"GGUF" + os.urandom(100))
    paths["not_utf8"] = root / "nu.jsonl"
    paths["not_utf8"].write_bytes(b'{"prompt": "w3"}\n{"prompt": "\xff\xfe w4"}\n')
    paths["bad_json"] = root / "bj.jsonl"
    paths["bad_json"].write_text('{"prompt": "w3"}\n\n{"prompt": "w4"\n')
    paths["int_prompt"] = root / "ip.jsonl"
    paths["int_prompt"].write_text('{"prompt": "w3"}\n{"prompt": 123}\n')
    paths["long_prompt"] = root / "lp.jsonl"
    paths["long_prompt"].write_text('{"prompt": "%s"}\n' % " ".join(["w3"] * 1100))  # the tiny context is 1024
    paths["bad_data"] = root / "data"  # a dataset folder whose file breaks on line 3 (after a blank line)
    (paths["bad_data"] / "gsm8k").mkdir(parents=True)
    (paths["bad_data"] / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n\n{"question"\n')
    paths["new_out"] = root / "not_yet"
    paths["no_weights"] = root / "adapter"
    paths["no_weights"].mkdir()
    (paths["no_weights"] / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    paths["gen_manifest"] = root / "gen"
    paths["gen_manifest"].mkdir()
    (paths["gen_manifest"] / "manifest.json").write_text('{"format": "cllm-traj')
    paths["eval_manifest"] = root / "eval"
    paths["eval_manifest"].mkdir()
    (paths["eval_manifest"] / "eval_manifest.json").write_text("{not json")
    paths["eval_manifest_list"] = root / "eval_list"  # valid JSON, but not the object a manifest is
    paths["eval_manifest_list"].mkdir()
    (paths["eval_manifest_list"] / "eval_manifest.json").write_text("[1, 2]")
    # an adapter trained for another base (hidden size 48, not 32)
    other = save_tiny_model(root / "other", seed=3, hidden_size=48)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(root / "other_adapter")
    paths["other_adapter"] = root / "other_adapter"
    return paths


# Every class of docs/bad_input.md's table: (class, command line with {fixture}s, what the one error line holds).
CASES = [line.split("\t") for line in (Path(__file__).parent / "bad_inputs.tsv").read_text().splitlines()
         if line and not line.startswith("#")]
# Short runs: decoding (never reached) and collection settings that fit the tiny model.
SMALL = {"decode": ["--max-new-tokens", "4", "--block-size", "4", "--quiet", "--no-perplexity", "--warmup", "0"],
         "gen": ["--block-size", "4", "--max-new-tokens", "4"], "eval": ["--block-size", "4", "--max-new-tokens", "4"],
         "train": []}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, bad, tiny_model_dir, capsys):
    _, command, expected = case
    names = {**{k: str(v) for k, v in bad.items()}, "model": str(tiny_model_dir)}
    argv = [a.format(**names) for a in shlex.split(command)]
    assert main(argv + SMALL[argv[0]]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and expected.format(**names) in err[0], err
    assert not bad["new_out"].exists()  # refused before any output folder was made


def test_resuming_a_lora_checkpoint_without_use_peft(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}')
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    seal(ckpt)  # a complete checkpoint: only the kind is wrong
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--resume"]
    assert main(argv) == 2
    assert f"{ckpt} is a LoRA checkpoint: resume it with --use-peft" in capsys.readouterr().err
