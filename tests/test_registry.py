"""The decoding registry: a new method is one function plus one `register` call, and `cllm decode` and `cllm eval`
run it with no other edit; the config is validated per method before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cllm.cli import main
from cllm.decoding import registry
from cllm.errors import CllmError
from test_eval import write_scored_prompts


def _greedy_twice(model, tok, prompts, seeds, cfg, draft):
    """A toy method: greedy AR, but recorded as if each forward committed two tokens (so its report differs)."""
    from cllm.decoding.ar import ar_decode

    results = ar_decode(model, tok, prompts, cfg.max_new_tokens, 0.0, None, None, seeds)
    for r in results:
        r.n_forwards = (r.n_forwards + 1) // 2
    return results


def _check_even(cfg):
    if cfg.max_new_tokens % 2:
        raise CllmError(f"toy needs an even --max-new-tokens, got {cfg.max_new_tokens}")


@pytest.fixture
def toy():
    registry.register("toy", registry.Method(_greedy_twice, supports_batch=True, check=_check_even))
    yield "toy"
    registry.unregister("toy")


def test_a_registered_method_runs_through_decode_and_eval(toy, tiny_model_dir, tmp_path, capsys):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", n=3)
    report = tmp_path / "report.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--method", "toy",
                 "--compare", "ar", "--max-new-tokens", "12", "--dtype", "fp64", "--batch-size", "2",
                 "--report", str(report), "--quiet"]) == 0
    methods = json.loads(report.read_text())["methods"]
    assert methods["toy"]["identical_to_ar"] == 1.0  # the same greedy tokens
    assert methods["toy"]["tokens_per_forward"] == pytest.approx(2 * methods["ar"]["tokens_per_forward"], rel=0.1)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "toy",
                 "--max-new-tokens", "12", "--dtype", "fp64", "--out-dir", str(out)]) == 0
    ev = json.loads((out / "report.json").read_text())["methods"]
    assert ev["toy"]["n_prompts"] == 3 and ev["toy"]["exact_match_base_ar"] == 1.0
    # the method's own check runs before any model is loaded: one line, exit 2
    assert main(["decode", "--model", str(tmp_path / "no-such-model"), "--prompt", "w3 w4", "--method", "toy",
                 "--max-new-tokens", "11"]) == 2
    assert "even --max-new-tokens" in capsys.readouterr().err


def test_registry_refuses_duplicates_and_unknown_names(toy):
    with pytest.raises(CllmError, match="registered twice"):
        registry.register("toy", registry.Method(_greedy_twice))
    with pytest.raises(CllmError, match="unknown method 'nope'"):
        registry.get("nope")
    assert registry.names()[:5] == ("ar", "jacobi", "multiblock", "sps", "mtad") and "toy" in registry.names()


def test_config_validation_per_method():
    cfg = registry.DecodeConfig()
    cfg.validate(["ar", "jacobi"], batch_size=4)
    with pytest.raises(CllmError, match="one prompt at a time"):
        cfg.validate(["multiblock"], batch_size=2)
    with pytest.raises(CllmError, match="needs --draft"):
        cfg.validate(["sps"], has_draft=False)
    with pytest.raises(CllmError, match="temperature"):  # MTAD samples
        cfg.validate(["mtad"])
    with pytest.raises(CllmError, match="block-size"):
        registry.DecodeConfig(block_size=0).validate(["jacobi"])
    greedy = registry.DecodeConfig(temperature=0.7, top_k=5).greedy()
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (0.0, None, None)


def test_importing_the_registry_loads_no_torch():
    code = "import sys, cllm.decoding.registry as r; r.DecodeConfig(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_method_variants_carry_their_own_options(tiny_model_dir, tmp_path, capsys):
    """`NAME:OPTION=VALUE...` runs a method with options of its own beside the others in one interleaved run."""
    assert registry.split_variant("mtad:tau=0.3:beam_width=2:top_k=none:beam_replacement=true") == (
        "mtad", {"tau": 0.3, "beam_width": 2, "top_k": None, "beam_replacement": True})
    for bad, message in [("jacobi:blok_size=8", "'blok_size=8' is not OPTION=VALUE"),
                         ("jacobi:block_size=x", "block_size='x' is not a int"),
                         ("jacobi:block_size", "is not OPTION=VALUE"), ("nope:block_size=8", "unknown method 'nope'")]:
        with pytest.raises(CllmError, match=message):
            registry.get(bad)
    with pytest.raises(CllmError, match="n-gram size"):
        registry.DecodeConfig().validate(["lookahead:lookahead_ngram=1"])
    prompts = write_scored_prompts(tmp_path / "p.jsonl", n=2)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods",
                 "jacobi:block_size=2,jacobi:block_size=6", "--max-new-tokens", "12", "--dtype", "fp64",
                 "--out-dir", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "rows-rank0.jsonl").read_text().splitlines()]
    for size in (2, 6):
        mine = [r for r in rows if r["method"] == f"jacobi:block_size={size}"]
        assert len(mine) == 2 and max(a for r in mine for a in r["accept_lengths"]) <= size
    methods = json.loads((out / "report.json").read_text())["methods"]
    assert methods["jacobi:block_size=2"]["exact_match_base_ar"] == methods["jacobi:block_size=6"][
        "exact_match_base_ar"] == 1.0
    assert main(["decode", "--model", str(tiny_model_dir), "--prompt", "w3", "--compare", "jacobi:n_blocks=x"]) == 2
    assert "n_blocks='x' is not a int" in capsys.readouterr().err
