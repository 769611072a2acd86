"""Hugging Face `generate` in the harness (issue 32): `hf`, `hf_prompt_lookup` and `hf_assisted` give the greedy
output, their per-forward accounting adds up, and they run through `cllm decode` like any method."""

from __future__ import annotations

import json

import pytest

from cllm.cli import main
from cllm.decoding import registry
from cllm.decoding.hf import accept_lengths_from_starts
from cllm.errors import CllmError
from conftest import tiny_model, tiny_tokenizer
from test_eval import write_scored_prompts

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [12, 30, 31, 12, 30], [40]]


def test_accept_lengths_from_forward_starts_by_hand():
    # prompt of 8: prefill starts at 0 and commits token 8; the next forward starts at 8 (feeds it back) ...
    assert accept_lengths_from_starts([0, 8, 9, 10], 8, 4) == [1, 1, 1, 1]
    # a verify forward at 9 that commits 3 tokens (positions 10, 11, 12): the next one starts at 12
    assert accept_lengths_from_starts([0, 8, 9, 12], 8, 6) == [1, 1, 3, 1]
    with pytest.raises(CllmError, match="do not add up"):
        accept_lengths_from_starts([0, 9, 8], 8, 3)  # a forward that starts before the previous one


@pytest.mark.parametrize("method", ["hf", "hf_prompt_lookup", "hf_assisted"])
def test_hf_methods_equal_greedy_ar(method):
    model, tok = tiny_model(1), tiny_tokenizer()
    cfg = registry.DecodeConfig(max_new_tokens=14, gamma=3, lookup_tokens=4)
    draft = tiny_model(2) if method == "hf_assisted" else None
    for i, p in enumerate(PROMPTS):
        want = registry.decode("ar", model, tok, [p], [i], cfg)[0]
        got = registry.decode(method, model, tok, [p], [i], cfg, draft)[0]
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert sum(got.accept_lengths) == got.n_new_tokens and len(got.accept_lengths) == got.n_forwards


class _Inputs:
    """(first position, number of input tokens) of every forward of a model: recorded here, independently of the
    decoder's own accounting."""

    def __init__(self, model):
        self.seen, self.handle = [], model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.seen.append((int(kwargs["position_ids"][0, 0]), ids.shape[1]))


def _candidates(seen, prompt_len, accept_lengths):
    """Per forward, the tokens it was fed beyond what was committed before it (the draft's candidates)."""
    done, out = prompt_len, []
    for (start, length), a in zip(seen, accept_lengths):
        out.append(start + length - done)
        done += a
    return out


def test_hf_counts_one_forward_per_token_exactly():
    model, tok = tiny_model(1), tiny_tokenizer()
    for i, p in enumerate(PROMPTS):
        rec = _Inputs(model)
        got = registry.decode("hf", model, tok, [p], [i], registry.DecodeConfig(max_new_tokens=14))[0]
        rec.handle.remove()
        assert got.n_forwards == got.n_new_tokens == len(rec.seen) and got.accept_lengths == [1] * got.n_new_tokens
        assert rec.seen == [(0, len(p))] + [(len(p) + k, 1) for k in range(got.n_new_tokens - 1)]


@pytest.mark.parametrize("draft_seed", [1, 2])  # the target itself (every candidate right), another model
def test_assisted_accept_lengths_are_what_the_target_was_fed(draft_seed):
    model, tok = tiny_model(1), tiny_tokenizer()
    for i, p in enumerate(PROMPTS):
        cfg = registry.DecodeConfig(max_new_tokens=14, gamma=3)
        rec = _Inputs(model)
        got = registry.decode("hf_assisted", model, tok, [p], [i], cfg, tiny_model(draft_seed))[0]
        rec.handle.remove()
        assert got.n_forwards == len(rec.seen) and sum(got.accept_lengths) == got.n_new_tokens
        cands = _candidates(rec.seen, len(p), got.accept_lengths)
        left = [got.n_new_tokens - sum(got.accept_lengths[:k]) for k in range(len(cands))]
        if draft_seed == 1:  # all candidates accepted, plus the target's own next token (unless the cap cuts it)
            assert got.accept_lengths == [min(c + 1, n) for c, n in zip(cands, left)], (cands, got.accept_lengths)
        else:
            assert all(1 <= a <= c + 1 for a, c in zip(got.accept_lengths, cands)), (cands, got.accept_lengths)
        assert max(cands) <= cfg.options["gamma"]


def test_assisted_with_an_identical_draft_commits_several_tokens_per_forward():
    model, tok = tiny_model(1), tiny_tokenizer()
    cfg = registry.DecodeConfig(max_new_tokens=12, gamma=3)
    want = registry.decode("ar", model, tok, [PROMPTS[0]], [0], cfg)[0]
    got = registry.decode("hf_assisted", model, tok, [PROMPTS[0]], [0], cfg, tiny_model(1))[0]
    assert got.token_ids == want.token_ids
    assert got.n_forwards < got.n_new_tokens and max(got.accept_lengths) > 1 and got.extra["draft_forwards"] > 0


def test_prompt_lookup_is_greedy_only_and_hf_runs_through_decode(tiny_model_dir, tmp_path):
    with pytest.raises(CllmError, match="greedy"):
        registry.DecodeConfig(temperature=0.7).validate(["hf_prompt_lookup"])
    prompts = write_scored_prompts(tmp_path / "p.jsonl", n=2)
    report = tmp_path / "r.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--method", "hf",
                 "--compare", "ar,hf_prompt_lookup", "--max-new-tokens", "10", "--dtype", "fp64",
                 "--report", str(report), "--quiet"]) == 0
    methods = json.loads(report.read_text())["methods"]
    assert methods["hf"]["exact_match_ar"] == 1.0 and methods["hf_prompt_lookup"]["exact_match_ar"] == 1.0


def test_decode_reports_every_method_against_hf_and_ar(tiny_model_dir, tmp_path, capsys):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", n=2)
    report = tmp_path / "r.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--method", "jacobi",
                 "--compare", "hf,ar", "--max-new-tokens", "10", "--dtype", "fp64", "--report", str(report)]) == 0
    methods = json.loads(report.read_text())["methods"]
    hf_rate = methods["hf"]["tokens_per_second"]
    for name in ("jacobi", "ar"):
        assert methods[name]["speedup_vs_hf"] == pytest.approx(methods[name]["tokens_per_second"] / hf_rate)
        assert methods[name]["exact_match_hf"] == 1.0
    assert methods["jacobi"]["exact_match_ar"] == 1.0 and methods["hf"]["speedup_vs_hf"] == 1.0
    assert "vs_hf" in capsys.readouterr().out


def test_eval_reports_every_method_against_hf_generate_of_the_base(tiny_model_dir, tmp_path):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", n=2)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "ar,jacobi",
                 "--base-methods", "hf", "--max-new-tokens", "10", "--dtype", "fp64", "--out-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["hf_reference"] == "base_hf"
    m = report["methods"]
    assert m["base_hf"]["exact_match_base_ar"] == 1.0 and m["base_hf"]["speedup_vs_hf"] == pytest.approx(1.0)
    for name in ("base_ar", "ar", "jacobi"):
        assert m[name]["speedup_vs_hf"] == pytest.approx(m[name]["tokens_per_second"]
                                                         / m["base_hf"]["tokens_per_second"])
    assert "vs base_hf" in (out / "summary.md").read_text()


def _row(method, index, dataset, tokens, seconds, token_ids):
    return {"method": method, "index": index, "dataset": dataset, "category": dataset, "new_tokens": tokens,
            "forwards": tokens, "seconds": seconds, "cpu_seconds": seconds, "joules": None, "accept_lengths": [1],
            "fast_forward": 0, "stationary": 0, "correct": None, "degenerate": False, "base_logprob_mean": None,
            "token_ids": token_ids}


def test_each_dataset_is_compared_with_hf_and_own_ar_over_its_own_prompts():
    from cllm.eval.summary import build_eval_report, summary_markdown

    # prompt 0 is gsm8k, prompt 1 humaneval; jacobi matches the checkpoint's own AR on gsm8k only
    rows = {"base_ar": [_row("base_ar", 0, "gsm8k", 10, 1.0, [1]), _row("base_ar", 1, "humaneval", 10, 1.0, [2])],
            "base_hf": [_row("base_hf", 0, "gsm8k", 10, 2.0, [1]), _row("base_hf", 1, "humaneval", 10, 0.5, [2])],
            "ar": [_row("ar", 0, "gsm8k", 10, 1.0, [3]), _row("ar", 1, "humaneval", 10, 1.0, [4])],
            "jacobi": [_row("jacobi", 0, "gsm8k", 10, 0.5, [3]), _row("jacobi", 1, "humaneval", 10, 4.0, [5])]}
    report = build_eval_report(rows, {"model": "m"})
    gsm, code = report["per_dataset"]["gsm8k"], report["per_dataset"]["humaneval"]
    # by hand: gsm8k hf 5 tok/s, jacobi 20 -> 4x; humaneval hf 20 tok/s, jacobi 2.5 -> 0.125x
    assert gsm["jacobi"]["speedup_vs_hf"] == pytest.approx(4.0)
    assert code["jacobi"]["speedup_vs_hf"] == pytest.approx(0.125)
    assert gsm["jacobi"]["exact_match_own_ar"] == 1.0 and code["jacobi"]["exact_match_own_ar"] == 0.0
    assert gsm["jacobi"]["speedup_vs_own_ar"] == pytest.approx(2.0)
    # overall: 20 tokens over 4.5 s against hf's 20 over 2.5 s
    assert report["methods"]["jacobi"]["speedup_vs_hf"] == pytest.approx(2.5 / 4.5)
    assert report["methods"]["jacobi"]["exact_match_own_ar"] == 0.5
    assert "| humaneval | jacobi | 1 | - | 1.000 | 2.50 | 0.250x | 0.125x | 0.00 |" in summary_markdown(report)
