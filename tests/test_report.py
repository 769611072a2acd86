"""Report arithmetic on literal rows: the one report of `cllm decode` and `cllm eval`, and decode's table."""

from cllm.eval.report import answer_line, compare_with
from cllm.eval.summary import build_eval_report


def row(i, tokens, forwards, accepts, ff=0, st=0, method="m", seconds=1.0):
    return {"index": i, "id": f"q{i}", "category": "c", "dataset": "d", "token_ids": tokens, "text": "t",
            "new_tokens": len(tokens), "forwards": forwards, "accept_lengths": accepts, "fast_forward": ff,
            "stationary": st, "wall_time": 1.0, "finish_reason": "length", "method": method, "seconds": seconds,
            "cpu_seconds": seconds, "joules": None, "base_logprob_mean": -0.5, "correct": None, "degenerate": False}


def test_speedup_and_identity_from_literal_rows_against_a_named_reference():
    rows = {
        "ar": [row(0, [1, 2, 3, 4], 4, [1, 1, 1, 1], method="ar", seconds=2.0),
               row(1, [5, 6], 2, [1, 1], method="ar", seconds=1.0)],
        "jacobi": [row(0, [1, 2, 3, 4], 2, [3, 1], ff=2, st=1, method="jacobi", seconds=1.0),
                   row(1, [5, 7], 2, [1, 1], method="jacobi", seconds=1.0)],
    }
    rep = build_eval_report(rows, {"temperature": 0.0}, reference="ar")
    ar, jac = rep["methods"]["ar"], rep["methods"]["jacobi"]
    assert rep["reference"] == "ar"
    assert ar["tokens_per_second"] == 2.0 and jac["tokens_per_second"] == 3.0
    assert jac["speedup_vs_ar"] == 1.5 and ar["speedup_vs_ar"] == 1.0
    assert jac["tokens_per_forward"] == 6 / 4 and jac["accept_length_hist"] == {1: 3, 3: 1}
    assert jac["exact_match_ar"] == 0.5 and jac["not_identical_ids"] == ["q1"]
    assert jac["fast_forward_tokens"] == 2 and jac["stationary_tokens"] == 1
    assert "speedup_vs_base_ar" not in jac  # named after its reference
    assert "speedup_vs_base_ar" not in build_eval_report(rows, {})["methods"]["jacobi"]  # eval's base_ar: absent


def test_answer_line_is_spec_bench_format():
    line = answer_line(row(3, [1, 2, 3], 2, [2, 1]), "m-jacobi")
    assert line["question_id"] == "q3" and line["model_id"] == "m-jacobi"
    assert line["choices"][0]["new_tokens"] == [3] and line["choices"][0]["decoding_steps"] == [2]


def test_compare_with_by_hand():
    # ref 10 tok/s; "a" 15 tok/s matching 1 of 2 prompts; "b" without a rate; "base_x" skipped by `matched`
    rows = {"ref": [{"index": 0, "id": "p0", "token_ids": [1, 2]}, {"index": 1, "id": "p1", "token_ids": [3]}],
            "a": [{"index": 0, "id": "p0", "token_ids": [1, 2]}, {"index": 1, "id": "p1", "token_ids": [4]}],
            "b": [{"index": 1, "id": "p1", "token_ids": [3]}],
            "base_x": [{"index": 0, "id": "p0", "token_ids": [9]}]}
    stats = {"ref": {"tokens_per_second": 10.0}, "a": {"tokens_per_second": 15.0}, "b": {"tokens_per_second": None},
             "base_x": {"tokens_per_second": 5.0}}
    compare_with(stats, rows, "ref", "up", "same", matched=lambda m: not m.startswith("base_"), ids_key="diff")
    assert stats["ref"] == {"tokens_per_second": 10.0, "up": 1.0, "same": 1.0, "diff": []}
    assert stats["a"] == {"tokens_per_second": 15.0, "up": 1.5, "same": 0.5, "diff": ["p1"]}
    assert stats["b"]["up"] is None and stats["b"]["same"] == 1.0
    assert stats["base_x"] == {"tokens_per_second": 5.0, "up": 0.5}
    compare_with(stats, rows, "a", "vs_a", include_ref=False)
    assert "vs_a" not in stats["a"] and stats["ref"]["vs_a"] == 10.0 / 15.0 and "same" in stats["a"]


def test_decode_table_labels_every_column_and_says_why_a_method_is_slower():
    from cllm.eval.report import format_table

    rows = {"ar": [row(0, [1, 2, 3, 4, 5, 6], 6, [1] * 6, method="ar", seconds=3.0)],
            "jacobi": [row(0, [1, 2, 3, 4, 5, 6], 5, [2, 1, 1, 1, 1], method="jacobi", seconds=6.0)]}
    rep = build_eval_report(rows, {"model": "m", "dtype": "fp32", "dtype_requested": "auto"}, reference="ar")
    rep["n_prompts"] = 1
    text = format_table(rep)
    head = text.splitlines()[1].split()
    assert head == ["method", "tokens", "forwards", "tok/fwd", "max_acc", "tok/s", "x_vs_ar", "same_as_ar", "ppl"]
    assert "dtype fp32 (auto)" in text.splitlines()[0]
    jac = text.splitlines()[3].split()
    assert jac == ["jacobi", "6", "5", "1.200", "2", "1.00", "0.500", "1.00", "1.649"]  # max_acc, ppl e^0.5 filled
    for label in ("tok/fwd:", "max_acc:", "x_vs_ar:", "same_as_ar:", "ppl:"):
        assert label in text
    # 1.2 tokens per forward, each forward 2.4x an AR step (6 s / 5 against 3 s / 6): slower, and the line says so
    assert "jacobi is 0.50x ar: it commits 1.20 tokens per forward, but each of its forwards took 2.40x an ar" in text
    assert "ar is" not in text.replace("jacobi is", "")
