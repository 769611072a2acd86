"""Models: which one (`ModelSpec`, `DEFAULT_MODEL`), loading it (`loading`), publishing what training made
(`export`). This module imports no torch: configs and `--help` read `DEFAULT_MODEL` from here; the loaders are
imported when first used (`cllm.models.load_model` still works)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"  # the one place the default model is named

_LAZY = {"export": ("export_adapter", "export_draft")}


@dataclass
class ModelSpec:
    """What to load: the model (alias, folder, HF id or .gguf), a PEFT adapter, the dtype (`auto`: the machine's
    fast one), the device (None: CUDA if available, else CPU), a draft for the draft-then-verify methods. `load()`
    is the one way gen, decode, eval, serve and chat load their models."""

    model: str = DEFAULT_MODEL
    adapter: str | None = None
    dtype: str = "auto"
    device: str | None = None
    draft: str | None = None
    device_map: str | None = None

    def check(self) -> None:
        """The specs, checked before any work (a typo is one line naming the flag)."""
        from cllm.models.loading import check_model_spec

        check_model_spec(self.model, "--model", self.adapter)
        if self.draft:
            check_model_spec(self.draft, "--draft")

    def resolved(self) -> "ModelSpec":
        """This spec with the device and dtype decided (`auto` -> the fast dtype of that device)."""
        import dataclasses

        import torch

        from cllm.machine import resolve_dtype

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return dataclasses.replace(self, device=device, dtype=resolve_dtype(self.dtype, device))

    def load(self, with_draft: bool = True) -> "Loaded":
        """(model, tokenizer, draft or None, the resolved spec)."""
        from cllm.models.loading import load_draft, load_model

        spec = self.resolved()
        model, tok = load_model(spec.model, spec.dtype, spec.device, spec.device_map, adapter=spec.adapter)
        draft = None
        if with_draft and spec.draft:
            draft = load_draft(spec.draft, model, tok, spec.dtype, spec.device, spec.device_map)
        return Loaded(model, tok, draft, spec)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    draft: object | None
    spec: ModelSpec


def __getattr__(name: str):
    """The loaders and exporters, imported on first use (they import torch)."""
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"cllm.models.{module}"), name)
    if name.startswith("__"):
        raise AttributeError(name)
    loading = importlib.import_module("cllm.models.loading")
    try:
        return getattr(loading, name)
    except AttributeError:
        raise AttributeError(f"module 'cllm.models' has no attribute {name!r}") from None
