"""Answer extraction, Spider matching, the HumanEval runner and the repetition detector on literal examples."""

from __future__ import annotations

import json

import pytest

from cllm.data.datasets import default_data_dir
from cllm.eval.quality import (extract_number, extract_sql, gsm8k_correct, humaneval_passes, is_degenerate, repeat_rate,
                          spider_exact_match)


@pytest.mark.parametrize("text, expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The answer is $18.00.", "18"),
    ("So 0.5 of them, 2.75 in total", "2.75"),
    ("Costs -3 dollars", "-3"),
    ("first 5 then 12 so #### 40 and later 99", "40"),  # '####' wins over the last number
    ("no numbers here", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_gsm8k_correct():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k_correct("She sold 48 + 24 = 72 clips.", ref)
    assert gsm8k_correct("... so the total is 72.0", ref)
    assert not gsm8k_correct("She sold 24 clips in May. #### 24", ref)
    assert not gsm8k_correct("I don't know", ref)


@pytest.fixture(scope="module")
def concert_schema():
    tables = json.loads((default_data_dir() / "spider" / "tables.json").read_text())
    return next(t for t in tables if t["db_id"] == "concert_singer")


@pytest.mark.parametrize("pred, gold, same", [
    ("SELECT count(*) FROM singer", "SELECT count(*) FROM singer", True),
    ("select COUNT(*) from SINGER;", "SELECT count(*) FROM singer", True),  # case and trailing semicolon
    ("SELECT age, name FROM singer", "SELECT name ,  age FROM singer", True),  # SELECT is a set
    ("SELECT name FROM singer WHERE age > 30", "SELECT name FROM singer WHERE age > 40", True),  # values ignored
    ("SELECT name FROM singer WHERE country = 'US' AND age > 3",
     "SELECT name FROM singer WHERE age > 3 AND country = 'France'", True),  # condition order
    ("SELECT T1.name FROM singer AS T1", "SELECT name FROM singer", True),  # alias resolved
    ("SELECT max(age) FROM singer", "SELECT min(age) FROM singer", False),
    ("SELECT name FROM singer ORDER BY age DESC", "SELECT name FROM singer ORDER BY age", False),
    ("SELECT name FROM singer", "SELECT DISTINCT name FROM singer", False),
    ("SELECT name FROM singer LIMIT 1", "SELECT name FROM singer", False),
    ("SELECT name FROM singer WHERE age > 1 OR age < 2", "SELECT name FROM singer WHERE age > 1 AND age < 2", False),
    ("SELECT country FROM singer WHERE age > 40 INTERSECT SELECT country FROM singer WHERE age < 30",
     "SELECT country FROM singer WHERE age  >  40 INTERSECT SELECT country FROM singer WHERE age  <  30", True),
    ("SELECT country FROM singer WHERE age > 40 UNION SELECT country FROM singer WHERE age < 30",
     "SELECT country FROM singer WHERE age  >  40 INTERSECT SELECT country FROM singer WHERE age  <  30", False),
    ("SELECT b.name , count(*) FROM singer_in_concert AS a JOIN concert AS b ON a.concert_id = b.concert_id "
     "GROUP BY b.concert_id",
     "SELECT T2.concert_name ,  count(*) FROM singer_in_concert AS T1 JOIN concert AS T2 ON T1.concert_id  =  "
     "T2.concert_id GROUP BY T2.concert_id", False),  # different column selected
    ("SELECT T2.concert_name , count(*) FROM concert AS T2 JOIN singer_in_concert AS T1 ON T2.concert_id = "
     "T1.concert_id GROUP BY T2.concert_id",
     "SELECT T2.concert_name ,  count(*) FROM singer_in_concert AS T1 JOIN concert AS T2 ON T1.concert_id  =  "
     "T2.concert_id GROUP BY T2.concert_id", True),  # join order and equality sides
    ("SELECT name FROM singer WHERE age > (SELECT avg(age) FROM singer)",
     "SELECT name FROM singer WHERE age  >  (SELECT avg(age) FROM singer)", True),
    ("SELECT name FROM singer WHERE age > (SELECT max(age) FROM singer)",
     "SELECT name FROM singer WHERE age  >  (SELECT avg(age) FROM singer)", False),
])
def test_spider_exact_match(pred, gold, same, concert_schema):
    assert spider_exact_match(pred, gold, concert_schema) is same


def test_extract_sql_from_chat_answers():
    assert extract_sql("Here you go:\n```sql\nSELECT a FROM t;\n```\nThis counts.") == "SELECT a FROM t"
    assert extract_sql("SELECT name FROM singer; -- done") == "SELECT name FROM singer"
    assert extract_sql("I cannot answer that.") == ""
    assert not spider_exact_match("I cannot answer that.", "SELECT count(*) FROM singer")


PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_humaneval_runner_correct_wrong_and_looping():
    meta = {"code_prompt": PROMPT, "test": TEST, "entry_point": "add"}
    for answer in ("```python\n    return a + b\n```", "Sure:\n```python\ndef add(a, b):\n    return b + a\n```"):
        res = humaneval_passes(meta, answer)
        assert (res.passed, res.status) == (True, "passed"), answer
    res = humaneval_passes(meta, "    return a - b\n")
    assert not res.passed and res.status == "failed: AssertionError"
    assert humaneval_passes(meta, "    while True:\n        pass\n", timeout=2).status == "timeout"
    res = humaneval_passes(meta, "    raise ValueError('no')\n")
    assert res.status == "failed: ValueError: no"
    # the basic level's only network guard is in the candidate's own interpreter
    net = "    import socket\n    socket.socket()\n    return a + b\n"
    assert humaneval_passes(meta, net, level="basic").status == "failed: OSError: network disabled by cllm's sandbox"


def test_is_degenerate_and_repeat_rate():
    varied = list(range(100))
    assert not is_degenerate(varied)
    assert is_degenerate([7] * 40)  # one token 40 times
    assert not is_degenerate([7] * 39)
    loop = list(range(50)) + [1, 2, 3, 4, 5, 6] * 8  # a 6-token phrase looping over 48 tokens
    assert is_degenerate(loop)
    assert not is_degenerate(list(range(50)) + [1, 2, 3, 4, 5, 6] * 3)
    assert repeat_rate([varied, [7] * 50, loop, varied]) == 0.5
    assert repeat_rate([]) is None
