"""Report arithmetic on literal rows."""

from cllm.eval.report import answer_line, build_report, compare_with


def row(i, tokens, forwards, accepts, ff=0, st=0):
    return {"index": i, "id": f"q{i}", "category": "c", "dataset": "d", "token_ids": tokens, "text": "t",
            "new_tokens": len(tokens), "forwards": forwards, "accept_lengths": accepts, "fast_forward": ff,
            "stationary": st, "wall_time": 1.0, "finish_reason": "length"}


def test_speedup_and_identity_from_literal_rows():
    rows = {
        "ar": [row(0, [1, 2, 3, 4], 4, [1, 1, 1, 1]), row(1, [5, 6], 2, [1, 1])],
        "jacobi": [row(0, [1, 2, 3, 4], 2, [3, 1], ff=2, st=1), row(1, [5, 7], 2, [1, 1])],
    }
    rep = build_report("m", "fp32", rows, {"ar": 3.0, "jacobi": 2.0}, {"temperature": 0.0})
    ar, jac = rep["methods"]["ar"], rep["methods"]["jacobi"]
    assert ar["tokens_per_second"] == 2.0 and jac["tokens_per_second"] == 3.0
    assert jac["speedup_vs_ar"] == 1.5
    assert jac["tokens_per_forward"] == 6 / 4 and jac["mean_accept_length"] == 1.5
    assert jac["identical_to_ar"] == 0.5 and jac["not_identical_ids"] == ["q1"]
    assert jac["fast_forward_tokens"] == 2 and jac["stationary_tokens"] == 1
    assert "speedup_vs_ar" not in ar


def test_sampled_baseline_has_no_identity_claim():
    rows = {"ar": [row(0, [1], 1, [1])], "jacobi": [row(0, [1], 1, [1])]}
    rep = build_report("m", "fp32", rows, {"ar": 1.0, "jacobi": 1.0}, {"temperature": 0.7})
    assert "identical_to_ar" not in rep["methods"]["jacobi"]


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

    rows = {"ar": [row(0, [1, 2, 3, 4, 5, 6], 6, [1] * 6)], "jacobi": [row(0, [1, 2, 3, 4, 5, 6], 5, [2, 1, 1, 1, 1])]}
    rep = build_report("m", "fp32", rows, {"ar": 3.0, "jacobi": 6.0},
                       {"temperature": 0.0, "dtype_requested": "auto"})
    text = format_table(rep)
    head = text.splitlines()[1].split()
    assert head == ["method", "tokens", "forwards", "tok/fwd", "max_acc", "tok/s", "x_vs_ar", "same_as_ar", "ppl"]
    assert "dtype fp32 (auto)" in text.splitlines()[0]
    jac = text.splitlines()[3].split()
    assert jac[:8] == ["jacobi", "6", "5", "1.200", "2", "1.00", "0.500", "1.00"]  # max_acc filled, not "-"
    for label in ("tok/fwd:", "max_acc:", "x_vs_ar:", "same_as_ar:", "ppl:"):
        assert label in text
    # 1.2 tokens per forward, each forward 2.4x an AR step (6 s / 5 against 3 s / 6): slower, and the line says so
    assert "jacobi is 0.50x ar: it commits 1.20 tokens per forward, but each of its forwards took 2.40x an ar step" in text
    assert "ar is" not in text.replace("jacobi is", "")
