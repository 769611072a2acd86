"""Draft models end to end: `cllm decode --method sps|mtad --draft`, the vocabulary check, the draft builder and
trainer, and the report's energy and perplexity fields."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cllm.cli import main
from cllm.models import check_draft_compatible
from cllm.training.draft import build_draft, spread_layers
from cllm.eval.energy import EnergyMeter
from cllm.errors import CllmError
from cllm.eval.metrics import perplexity, token_logprobs
from conftest import VOCAB, save_tiny_model, tiny_model, tiny_tokenizer
from test_cli import write_prompts


def other_tokenizer() -> PreTrainedTokenizerFast:
    """Same size as the tiny tokenizer, different words: an incompatible draft."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"v{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def draft_dirs(tmp_path_factory):
    """A compatible tiny draft (other weights, same tokenizer) and one with another vocabulary."""
    good, bad = tmp_path_factory.mktemp("draft-good"), tmp_path_factory.mktemp("draft-bad")
    save_tiny_model(good, seed=11, num_hidden_layers=1)
    save_tiny_model(bad, seed=11, tokenizer=other_tokenizer(), num_hidden_layers=1)
    return good, bad


def test_decode_sps_mtad_and_ar_sampling_report(tiny_model_dir, draft_dirs, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    report_path = tmp_path / "report.json"
    code = main(["decode", "--model", str(tiny_model_dir), "--draft", str(draft_dirs[0]), "--prompts", str(prompts),
                 "--method", "mtad", "--compare", "ar,sps", "--temperature", "1", "--top-k", "10", "--top-p", "0.9",
                 "--gamma", "3", "--beam-width", "3", "--tau", "0.5", "--max-new-tokens", "12",
                 "--report", str(report_path), "--out", str(tmp_path / "a.jsonl")])
    assert code == 0
    report = json.loads(report_path.read_text())
    methods = report["methods"]
    assert set(methods) == {"mtad", "ar", "sps"}
    for name in ("mtad", "sps"):
        m = methods[name]
        rows = report["rows"][name]
        assert len(rows) == 4
        for r in rows:  # one target forward per iteration, each committing its accepted drafts and one token
            assert r["iterations"] == r["forwards"] and r["accepted"] <= r["drafted"] <= 3 * r["iterations"]
            # the last iteration may be cut by the length cap after its accepted drafts: one token less
            assert r["new_tokens"] - r["iterations"] <= r["accepted"] <= r["new_tokens"] - r["iterations"] + 1
        accepted, drafted = sum(r["accepted"] for r in rows), sum(r["drafted"] for r in rows)
        assert m["acceptance_rate"] == accepted / drafted
        assert m["block_efficiency"] == 1 + accepted / sum(r["iterations"] for r in rows)
        assert m["speedup_vs_ar"] == pytest.approx(m["tokens_per_second"] / methods["ar"]["tokens_per_second"])
    for m in methods.values():
        assert m["ms_per_token"] == pytest.approx(1000 * m["wall_time_s"] / m["new_tokens"], rel=1e-3)
        assert m["perplexity_base"] is not None and m["perplexity_base"] > 1.0
        assert m["energy_j_per_token"] is None or m["energy_j_per_token"] > 0  # null where RAPL is unreadable
        assert 0 < m["cpu_s_per_token"] < 50 * m["ms_per_token"] / 1000  # always there; all threads' CPU time
        assert "exact_match_ar" not in m  # sampling: outputs are not expected to match
    assert methods["ar"].get("acceptance_rate") is None
    assert report["settings"]["tau"] == 0.5 and report["settings"]["gamma"] == 3
    out = capsys.readouterr().out
    assert "blk_eff" in out and "mtad" in out


def test_decode_sps_greedy_is_identical_to_ar(tiny_model_dir, draft_dirs, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    report_path = tmp_path / "report.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--draft", str(draft_dirs[0]), "--prompts", str(prompts),
                 "--method", "sps", "--compare", "ar", "--max-new-tokens", "15", "--dtype", "fp64",
                 "--adaptive-gamma", "--report", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["methods"]["sps"]["exact_match_ar"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sps", "--draft", "{bad}"], "vocabulary differs"),
        (["--method", "sps", "--draft", "{good}", "--gamma", "0"], "gamma"),
        (["--method", "mtad", "--draft", "{good}", "--temperature", "1", "--tau", "0"], "tau must be > 0"),
        (["--method", "mtad", "--draft", "{good}", "--temperature", "1", "--tau", "-2"], "tau must be > 0"),
        (["--method", "mtad", "--draft", "{good}", "--temperature", "1", "--top-p", "0"], "top_p"),
        (["--method", "sps", "--draft", "{good}", "--top-p", "1.01", "--temperature", "1"], "top_p"),
        (["--method", "mtad", "--draft", "{good}", "--temperature", "0"], "temperature > 0"),
        (["--method", "sps"], "needs --draft"),
        (["--method", "sps", "--draft", "{good}", "--batch-size", "2"], "--batch-size 1"),
        (["--method", "ar", "--compare", "jacobi,beam"], "unknown method 'beam'"),
    ],
)
def test_bad_draft_input_is_one_line_and_exit_2(args, message, tiny_model_dir, draft_dirs, capsys):
    args = [a.format(good=draft_dirs[0], bad=draft_dirs[1]) for a in args]
    code = main(["decode", "--model", str(tiny_model_dir), "--prompt", "w3 w4", "--max-new-tokens", "4", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("cllm decode: error:") and message in err[0]


def test_check_draft_compatible_names_the_difference():
    model = tiny_model(0)
    check_draft_compatible(model, tiny_tokenizer(), tiny_model(1), tiny_tokenizer())  # same vocabulary: fine
    with pytest.raises(CllmError, match="only in target"):
        check_draft_compatible(model, tiny_tokenizer(), tiny_model(1), other_tokenizer())
    with pytest.raises(CllmError, match="LM head"):
        check_draft_compatible(model, tiny_tokenizer(), tiny_model(1, vocab_size=VOCAB + 8), tiny_tokenizer())


# ---------------------------------------------------------------------------------------------- draft builder


def test_spread_layers():
    assert spread_layers(30, 4) == [0, 10, 19, 29]
    assert spread_layers(2, 2) == [0, 1] and spread_layers(5, 1) == [4]
    with pytest.raises(CllmError):
        spread_layers(4, 5)


@torch.inference_mode()
def test_build_draft_copies_the_kept_layers():
    target = tiny_model(3, num_hidden_layers=3)
    ids = torch.tensor([[5, 9, 13, 2, 40]])
    full = build_draft(target, [0, 1, 2])
    assert torch.allclose(full(input_ids=ids).logits, target(input_ids=ids).logits, atol=1e-12)
    # Two of three layers: the same computation as running the target with its middle layer skipped.
    cut = build_draft(target, [0, 2])
    assert cut.config.num_hidden_layers == 2 and cut.config.cllm_draft["target_layers"] == [0, 2]
    h = target.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = target.model.rotary_emb(h, pos)
    for i in (0, 2):
        h = target.model.layers[i](h, position_embeddings=rope, attention_mask=None, position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
    expect = target.lm_head(target.model.norm(h))
    assert torch.allclose(cut(input_ids=ids).logits, expect, atol=1e-10)


def test_train_draft_runs_resumes_and_loads(tiny_model_dir, tmp_path):
    out = tmp_path / "draft"
    common = ["train-draft", "--model", str(tiny_model_dir), "--output-dir", str(out), "--draft-layers", "1",
              "--datasets", "gsm8k", "--limit", "16", "--max-seq-len", "64", "--save-steps", "2",
              "--logging-steps", "1", "--per-device-train-batch-size", "2", "--held-out", "4"]
    assert main([*common, "--max-steps", "2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main([*common, "--max-steps", "4", "--resume"]) == 0
    summary = json.loads((out / "cllm_draft.json").read_text())["summary"]
    assert summary["steps"] == 4 and summary["draft_layers"] == [1]
    assert summary["sequences"] == 16 - 4 and summary["held_out"]["sequences"] == 4
    for report in (summary["held_out_before"], summary["held_out"]):
        assert 0 <= report["top1_agreement"] <= 1 and report["kl"] >= 0 and report["positions"] > 4
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # steps 3-4 continued from checkpoint-2
    from cllm.models import load_model

    draft, tok = load_model(str(out), "fp32", "cpu")
    target, target_tok = load_model(str(tiny_model_dir), "fp32", "cpu")
    check_draft_compatible(target, target_tok, draft, tok)
    assert draft.config.num_hidden_layers == 1
    # Embeddings and LM head are the target's, untouched by training.
    assert torch.equal(draft.get_input_embeddings().weight, target.get_input_embeddings().weight)
    assert torch.equal(draft.get_output_embeddings().weight, target.get_output_embeddings().weight)
    # A draft with its LM head cut to the 8 most frequent tokens of its text (plus the special tokens): loaded as
    # such for SpS, whose greedy output is still the target's.
    pruned = tmp_path / "pruned"
    assert main([*common[:4], str(pruned), *common[5:], "--max-steps", "1", "--vocab-subset", "8"]) == 0
    subset = json.loads((pruned / "cllm_draft.json").read_text())["summary"]["vocab_subset"]
    # (the tiny tokenizer reads most of GSM8K as unknown words: few distinct ids, so fewer than 8 here)
    assert 1 <= len(subset) <= 8 + 3 and subset == sorted(subset) and target_tok.eos_token_id in subset
    from cllm.decoding.pruned_draft import PrunedVocabDraft
    from cllm.models import load_draft

    loaded = load_draft(str(pruned), target, target_tok)
    assert isinstance(loaded, PrunedVocabDraft) and loaded.token_ids.tolist() == subset
    report = tmp_path / "r.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--draft", str(pruned), "--prompt", "w3 w4 w5",
                 "--method", "sps", "--compare", "ar", "--max-new-tokens", "12", "--quiet", "--report",
                 str(report)]) == 0
    assert json.loads(report.read_text())["methods"]["sps"]["exact_match_ar"] == 1.0
    # Hugging Face assisted generation cannot use a pruned head: it drafts with the full head the draft wraps
    assert main(["decode", "--model", str(tiny_model_dir), "--draft", str(pruned), "--prompt", "w3 w4 w5",
                 "--method", "hf_assisted", "--compare", "ar", "--max-new-tokens", "12", "--quiet", "--report",
                 str(report)]) == 0
    assert json.loads(report.read_text())["methods"]["hf_assisted"]["exact_match_ar"] == 1.0


class _FixedLogits(torch.nn.Module):
    """A stand-in model whose logits at each position are `scale` on one id, a function of the input id there."""

    def __init__(self, vocab: int, shift):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=3.0 * torch.nn.functional.one_hot(self.shift(input_ids) % self.vocab, self.vocab))


def test_held_out_metrics_against_a_hand_computation():
    from cllm.training.draft import held_out_metrics

    vocab = 5
    target = _FixedLogits(vocab, lambda x: x)
    draft = _FixedLogits(vocab, lambda x: x + x % 2)  # agrees at even input ids, one id off at odd ones
    seqs = [[0, 1, 2], [3, 4]]  # 5 positions, the second row padded with id 0 (masked)
    got = held_out_metrics(draft, target, seqs, pad_id=0, token_ids=[0, 1, 3], batch_size=2)
    e3 = math.exp(3)
    # a disagreeing position: p puts e^3/(e^3+4) on a, q puts it on b, all else equal: KL = 3 (e^3 - 1) / (e^3 + 4)
    kl_miss = 3 * (e3 - 1) / (e3 + 4)
    assert got["positions"] == 5 and got["sequences"] == 2
    assert got["top1_agreement"] == pytest.approx(3 / 5)  # ids 0, 2, 4 agree; 1 and 3 do not
    assert got["kl"] == pytest.approx(2 * kl_miss / 5)
    # restricted to ids {0, 1, 3} the draft's scores tie at every input but 0 (its choice 2 or 4 is cut), and the
    # tie goes to id 0: only input 0 agrees
    assert got["top1_agreement_pruned"] == pytest.approx(1 / 5)
    same = held_out_metrics(target, target, seqs, pad_id=0, batch_size=1)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert "top1_agreement_pruned" not in same


def test_held_out_indices_are_seeded_and_in_range():
    from cllm.training.draft import held_out_indices

    held = held_out_indices(20, 5)
    assert len(held) == 5 and held <= set(range(20)) and held_out_indices(20, 5) == held
    assert held_out_indices(20, 0) == set()
    with pytest.raises(CllmError, match="--held-out 20: the distillation text has only 20 sequences"):
        held_out_indices(20, 20)


def test_train_draft_bad_input(tiny_model_dir, tmp_path, capsys):
    code = main(["train-draft", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "d"),
                 "--draft-layers", "0"])
    assert code == 2 and "--draft-layers must be >= 1" in capsys.readouterr().err


def test_export_draft_publishes_only_what_the_target_lacks(tiny_model_dir, tmp_path, capsys):
    """export-draft leaves the embeddings and LM head out; the folder loads beside its target as the same draft
    (fp32: the same logits), and refuses a target that is not the one it shares those tensors with."""
    from cllm.models import DRAFT_WEIGHTS, load_draft, load_model

    src, pub, pub16 = tmp_path / "draft", tmp_path / "published", tmp_path / "published-bf16"
    assert main(["train-draft", "--model", str(tiny_model_dir), "--output-dir", str(src), "--draft-layers", "1",
                 "--datasets", "gsm8k", "--limit", "8", "--max-seq-len", "32", "--max-steps", "1",
                 "--held-out", "0"]) == 0
    assert main(["export-draft", str(src), str(pub), "--dtype", "fp32"]) == 0
    assert "shared with the target: lm_head.weight, model.embed_tokens.weight" in capsys.readouterr().out
    assert main(["export-draft", str(src), str(pub16)]) == 0
    from safetensors.torch import load_file

    own = load_file(str(pub / DRAFT_WEIGHTS))
    assert "lm_head.weight" not in own and "model.embed_tokens.weight" not in own and own
    assert (pub16 / DRAFT_WEIGHTS).stat().st_size < 0.6 * (pub / DRAFT_WEIGHTS).stat().st_size  # bf16 halves it
    target, tok = load_model(str(tiny_model_dir), "fp32", "cpu")
    trained, _ = load_model(str(src), "fp32", "cpu")
    loaded = load_draft(str(pub), target, tok)
    ids = torch.tensor([[3, 9, 4, 17, 5]])
    assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    report = tmp_path / "r.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--draft", str(pub16), "--prompt", "w3 w4 w5",
                 "--method", "sps", "--compare", "ar", "--max-new-tokens", "12", "--quiet", "--report",
                 str(report)]) == 0
    assert json.loads(report.read_text())["methods"]["sps"]["exact_match_ar"] == 1.0
    other = save_tiny_model(tmp_path / "other-base", seed=5)  # same shapes and vocabulary, other weights
    code = main(["decode", "--model", str(other), "--draft", str(pub), "--prompt", "w3", "--method", "sps",
                 "--max-new-tokens", "4", "--quiet"])
    assert code == 2 and "the draft was made for another base" in capsys.readouterr().err
    code = main(["export-draft", str(src), str(tmp_path / "x"), "--model", str(other)])
    assert code == 2 and "is not the target" in capsys.readouterr().err
    code = main(["export-draft", str(tiny_model_dir), str(tmp_path / "y")])
    assert code == 2 and "not a `cllm train-draft` output folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- energy, perplexity


def test_energy_meter_reads_rapl_and_handles_wraparound(tmp_path):
    pkg = tmp_path / "intel-rapl:0"
    (pkg / "intel-rapl:0:0").mkdir(parents=True)  # a sub-domain: not counted twice
    (pkg / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    (pkg / "energy_uj").write_text("999000000\n")
    (pkg / "max_energy_range_uj").write_text("1000000000\n")
    meter = EnergyMeter(tmp_path)
    assert meter.available
    meter.start()
    (pkg / "energy_uj").write_text("1000000\n")  # wrapped: 1e6 uJ to the top plus 1e6 uJ after
    meter.stop()
    assert meter.joules == pytest.approx(2.0)
    assert EnergyMeter(tmp_path / "none").joules is None  # no counters: null, never invented


@torch.inference_mode()
def test_token_logprobs_and_perplexity():
    model = tiny_model(0)
    prompt, new = [5, 6, 7], [8, 9, 10]
    lp = token_logprobs(model, prompt, new)
    logits = model(input_ids=torch.tensor([prompt + new])).logits[0].float().log_softmax(-1)
    assert lp == pytest.approx([float(logits[2 + t, new[t]]) for t in range(3)], abs=1e-9)
    assert token_logprobs(model, prompt, []) == []
    # exp(- mean over prompts of per-prompt means): prompts weigh equally whatever their length.
    assert perplexity([[-1.0, -1.0], [-3.0]]) == pytest.approx(math.exp(2.0))
    assert perplexity([[], [-2.0]]) == pytest.approx(math.exp(2.0)) and perplexity([]) is None
