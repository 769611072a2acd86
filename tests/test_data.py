"""Prompt sources: every dataset under ../shared/data loads, prompt files fail with file:line."""

from __future__ import annotations

import pytest

from cllm.data.datasets import DATASETS, load_dataset_prompts, load_prompt_file
from cllm.errors import CllmError


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_loads(name):
    recs = load_dataset_prompts(name, limit=3)
    assert len(recs) == 3
    assert all(r.prompt.strip() and r.id for r in recs)
    assert len({r.id for r in recs}) == 3


def test_dataset_specifics():
    train = load_dataset_prompts("gsm8k", split="train", offset=2, limit=2)
    assert train[0].id == "gsm8k-train-2" and "####" in train[0].answer
    spider = load_dataset_prompts("spider", limit=1)[0]
    assert "singer(" in spider.prompt and spider.answer.upper().startswith("SELECT")
    he = load_dataset_prompts("humaneval", limit=1)[0]
    assert he.meta["entry_point"] and "def " in he.prompt
    spec = load_dataset_prompts("spec_bench")
    assert len(spec) == 480 and {r.category for r in spec} >= {"writing", "translation", "math_reasoning", "rag"}


def test_code_prompts_for_collection():
    """Issue 30's code domain: all 604 CoSQA queries (the reference only where the function answers the query),
    and prompts made offline from the standard library's documented functions."""
    everything, matched = load_dataset_prompts("code", split="all"), load_dataset_prompts("code")
    assert (len(everything), len(matched)) == (604, 313)
    assert sum(r.answer is not None for r in everything) == 313 and all(r.answer for r in matched)
    with pytest.raises(CllmError, match="splits"):
        load_dataset_prompts("code", split="test")
    stdlib = load_dataset_prompts("code_stdlib")
    assert len(stdlib) > 1000 and len({r.id for r in stdlib}) == len(stdlib)
    assert len({r.prompt.split(": ", 1)[1] for r in stdlib}) == len(stdlib)  # one prompt per sentence
    assert [r.prompt for r in stdlib] == [r.prompt for r in load_dataset_prompts("code_stdlib")]  # deterministic
    by_id = {r.id: r.prompt for r in stdlib}
    assert by_id["stdlib-math.floor"] == "Write a Python function `floor`: Return the floor of x as an Integral."
    assert "stdlib-pickle.pack" not in by_id  # struct.pack imported into pickle is not pickle's
    assert not any(r.prompt.endswith((",.", "...")) for r in stdlib)


def test_unknown_dataset_and_missing_folder(tmp_path):
    with pytest.raises(CllmError, match="unknown dataset"):
        load_dataset_prompts("imagenet")
    with pytest.raises(CllmError, match="dataset file not found"):
        load_dataset_prompts("gsm8k", data_dir=tmp_path)


def test_prompt_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(CllmError, match=r"p\.jsonl:2: no field 'prompt'"):
        load_prompt_file(f)
    f.write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(CllmError, match=r"p\.jsonl:2: not valid JSON"):
        load_prompt_file(f)
    f.write_text("\n\n")
    with pytest.raises(CllmError, match="no prompts"):
        load_prompt_file(f)
    f.write_text('{"prompt": "  "}\n')
    with pytest.raises(CllmError, match=r"p\.jsonl:1: field 'prompt' is empty"):
        load_prompt_file(f)
    f.write_text('{"prompt": "a"}\n{"prompt": 123}\n')
    with pytest.raises(CllmError, match=r"p\.jsonl:2: field 'prompt' is int 123, not text"):
        load_prompt_file(f)


def test_window_past_the_end_is_an_error_and_a_short_one_is_said(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(3)))
    with pytest.raises(CllmError, match="offset 3 is past the end: there are 3 prompts"):
        load_prompt_file(f, offset=3)
    assert [r.prompt for r in load_prompt_file(f, limit=5, offset=1)] == ["q1", "q2"]
    assert "limit 5: only 2 prompts from offset 1 (3 in all)" in capsys.readouterr().err


def test_prompt_file_fields_and_window(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"q": "one", "answer": "1"}\n{"q": "two", "id": "x"}\n{"q": "three"}\n')
    recs = load_prompt_file(f, "q", limit=2, offset=1)
    assert [r.prompt for r in recs] == ["two", "three"] and recs[0].id == "x"
