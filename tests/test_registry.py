"""The decoding registry: a new method is one function plus one `register` call, and `cllm decode` and `cllm eval`
run it with no other edit; the config is validated per method before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

from cllm.cli import main
from cllm.decoding import registry
from cllm.errors import CllmError
from cllm.config import opt
from test_eval import write_scored_prompts


@dataclass
class ToyOptions:
    """A toy method's two options: how many tokens each forward pretends to commit, and a label."""

    prefix: ClassVar[str] = "toy"
    factor: int = opt(2, "toy: tokens each forward pretends to commit")
    label: str = opt("plain", "toy: a label recorded in the result", ("plain", "fancy"))

    def check(self) -> None:
        if self.factor < 1:
            raise CllmError(f"toy needs --toy-factor >= 1, got {self.factor}")


def _greedy_pretend(model, tok, prompts, seeds, max_new_tokens, opts, draft, on_commit):
    """A toy method: greedy AR, but recorded as if each forward committed `factor` tokens (so its report
    differs)."""
    from cllm.decoding.ar import ar_decode

    results = ar_decode(model, tok, prompts, max_new_tokens=max_new_tokens, seed=seeds)
    for r in results:
        r.n_forwards = -(-r.n_forwards // opts.factor)
        r.extra["label"] = opts.label
    return results


@pytest.fixture
def toy():
    registry.register("toy", registry.Method(_greedy_pretend, ToyOptions, supports_batch=True))
    yield "toy"
    registry.unregister("toy")


def test_a_new_methods_options_are_flags_of_decode_eval_and_serve(toy):
    """The toy's options dataclass is all it takes: its flags appear in `cllm decode`, `eval`, `serve` and `chat`
    help, with their help and default, and YAML keys and variants accept them."""
    import argparse

    from cllm import config
    from cllm.commands import chat, decode, eval as eval_cmd, serve
    from cllm.eval.config import EvalConfig

    for command in (decode, eval_cmd, serve, chat):
        p = argparse.ArgumentParser()
        command.add_arguments(p)
        text = p.format_help()
        assert "--toy-factor" in text and "--toy-label {plain,fancy}" in text, command.__name__
        assert "tokens each forward pretends to commit (default: 2)" in " ".join(text.split())
    cfg = config.resolve(EvalConfig, {"toy_factor": 3, "out_dir": "x", "prompts": "p.jsonl", "methods": "toy"})
    assert cfg.decode_config().settings("toy") == {"factor": 3, "label": "plain"}
    assert registry.DecodeConfig().settings("toy:toy_label=fancy") == {"factor": 2, "label": "fancy"}
    with pytest.raises(CllmError, match="'toy_factor' must be int"):
        config.resolve(EvalConfig, {"toy_factor": "3", "out_dir": "x", "prompts": "p.jsonl", "methods": "toy"})


def test_a_registered_method_runs_through_decode_and_eval(toy, tiny_model_dir, tmp_path, capsys):
    prompts = write_scored_prompts(tmp_path / "p.jsonl", n=3)
    report = tmp_path / "report.json"
    assert main(["decode", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--method", "toy",
                 "--compare", "ar", "--max-new-tokens", "12", "--dtype", "fp64", "--batch-size", "2",
                 "--report", str(report), "--quiet"]) == 0
    methods = json.loads(report.read_text())["methods"]
    assert methods["toy"]["exact_match_ar"] == 1.0  # the same greedy tokens
    assert methods["toy"]["tokens_per_forward"] == pytest.approx(2 * methods["ar"]["tokens_per_forward"], rel=0.1)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--methods", "toy",
                 "--max-new-tokens", "12", "--dtype", "fp64", "--out-dir", str(out)]) == 0
    ev = json.loads((out / "report.json").read_text())["methods"]
    assert ev["toy"]["n_prompts"] == 3 and ev["toy"]["exact_match_base_ar"] == 1.0
    # the method's own check runs before any model is loaded: one line, exit 2
    assert main(["decode", "--model", str(tmp_path / "no-such-model"), "--prompt", "w3 w4", "--method", "toy",
                 "--toy-factor", "0"]) == 2
    assert "toy needs --toy-factor >= 1, got 0" in capsys.readouterr().err


def test_registry_refuses_duplicates_and_unknown_names(toy):
    with pytest.raises(CllmError, match="registered twice"):
        registry.register("toy", registry.Method(_greedy_pretend))
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
    with pytest.raises(CllmError, match="temperature > 0"):  # MTAD samples
        registry.DecodeConfig(temperature=0.0).validate(["mtad"])
    with pytest.raises(CllmError, match="greedy-only"):
        registry.DecodeConfig(temperature=0.5).validate(["jacobi"])
    with pytest.raises(CllmError, match="block-size"):
        registry.DecodeConfig(block_size=0).validate(["jacobi"])
    greedy = registry.DecodeConfig(temperature=0.7, top_k=5).greedy()
    assert greedy.options == {"temperature": 0.0}  # top_k, top_p back to each method's default (None)


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
    assert "'n_blocks=x' is not OPTION=VALUE of an option of jacobi" in capsys.readouterr().err
    assert main(["decode", "--model", str(tiny_model_dir), "--prompt", "w3", "--compare", "multiblock:n_blocks=x"]) == 2
    assert "n_blocks='x' is not a int" in capsys.readouterr().err
