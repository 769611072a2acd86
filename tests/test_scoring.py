"""`cllm eval --dataset` end to end on a tiny data folder: every dataset's answers are scored by its own rule
(GSM8K final number, Spider exact-set-match with its schema, HumanEval tests in the sandbox through the record's
meta). An oracle method answers the first prompt of each dataset right and the second wrong, so the expected
accuracies are known without the model: 1/2 per dataset, and the right rows are exactly the first ones."""

from __future__ import annotations

import gzip
import json

import pytest

from cllm.cli import main
from cllm.decoding import registry
from cllm.decoding.common import DecodeResult

SPIDER_TABLES = [{"db_id": "concert", "table_names_original": ["singer"], "column_names_original":
                  [[-1, "*"], [0, "name"], [0, "age"], [0, "country"]]}]
HUMANEVAL = [
    {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "T/1", "prompt": "def neg(x):\n    \"\"\"-x\"\"\"\n", "entry_point": "neg",
     "test": "def check(f):\n    assert f(4) == -4\n"},
]
# In the order eval meets the prompts: gsm8k, spider, humaneval; the first of each right, the second wrong.
ORACLE = [
    "She pays 9 + 9 = 18 dollars. The answer is 18.", "The answer is 6.",
    "SELECT T1.name FROM singer AS T1 WHERE T1.age > 30", "SELECT country FROM singer",
    "```python\ndef add(a, b):\n    return a + b\n```", "    return x\n",
]


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "w3 w4 w5", "answer": "9 + 9 = 18\n#### 18"},
        {"question": "w6 w7", "answer": "3 + 4 = 7\n#### 7"}]))
    (root / "spider").mkdir()
    (root / "spider" / "tables.json").write_text(json.dumps(SPIDER_TABLES))
    (root / "spider" / "dev.json").write_text(json.dumps([
        {"db_id": "concert", "question": "w8", "query": "SELECT name FROM singer WHERE age > 30"},
        {"db_id": "concert", "question": "w9", "query": "SELECT name FROM singer"}]))
    (root / "humaneval").mkdir()
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in HUMANEVAL)
    return root


@pytest.fixture
def oracle():
    answers = list(ORACLE)

    def answer(model, tok, prompts, seeds, max_new_tokens, opts, draft, on_commit):
        return [DecodeResult(token_ids=[5, 6], text=answers.pop(0), n_forwards=1, accept_lengths=[2],
                             finish_reason="length")]

    registry.register("oracle", registry.Method(answer))
    yield answers
    registry.unregister("oracle")


def test_eval_scores_each_dataset_by_its_own_rule(oracle, data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", "gsm8k,spider,humaneval", "--data-dir",
                 str(data_dir), "--methods", "oracle", "--max-new-tokens", "4", "--dtype", "fp32", "--warmup", "0",
                 "--out-dir", str(out)]) == 0
    assert oracle == []  # called once per prompt, in order
    rows = [json.loads(x) for x in (out / "rows-rank0.jsonl").read_text().splitlines()]
    right = {r["id"]: r["correct"] for r in rows if r["method"] == "oracle"}
    assert right == {"gsm8k-test-0": True, "gsm8k-test-1": False, "spider-dev-0": True, "spider-dev-1": False,
                     "T/0": True, "T/1": False}
    report = json.loads((out / "report.json").read_text())
    assert {name: d["oracle"]["accuracy"] for name, d in report["per_dataset"].items()} == \
        {"gsm8k": 0.5, "spider": 0.5, "humaneval": 0.5}
    assert report["methods"]["oracle"]["accuracy"] == 0.5
