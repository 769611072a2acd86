"""Publishing what training made: an adapter cast to a small dtype, a draft without the tensors it shares with its
target. (`cllm export-adapter`, `cllm export-draft`.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cllm.errors import CllmError
from cllm.models.loading import (DRAFT_WEIGHTS, _fingerprint, load_model, parse_dtype, portable_model_name,
                                 shared_tensor_names)


def _save_cast(tensors: dict, path: Path, dtype: str, max_mb: float | None, what: str, hint: str) -> dict:
    """Save `tensors` (floating ones cast to `dtype`) as safetensors at `path`, refusing more than `max_mb` MiB."""
    from safetensors.torch import save_file

    target = parse_dtype(dtype)
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    if max_mb is not None and size > max_mb * 2**20:
        raise CllmError(f"{what} is {size / 2**20:.1f} MiB in {dtype}, over the {max_mb:g} MiB limit ({hint})")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def export_adapter(src: str | Path, dst: str | Path, dtype: str = "bf16", max_mb: float | None = None) -> dict:
    """Copy a PEFT LoRA adapter folder with its weights cast to `dtype` (bf16 halves an fp32 adapter); returns
    {"tensors", "parameters", "bytes"}. `max_mb` refuses a result larger than that (a publishing limit)."""
    import shutil

    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    weights = src / "adapter_model.safetensors"
    if not (src / "adapter_config.json").is_file() or not weights.is_file():
        raise CllmError(f"not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors): {src}")
    tensors = _save_cast(load_file(str(weights)), dst / "adapter_model.safetensors", dtype, max_mb, "the adapter",
                         "train a lower lora_r")
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = portable_model_name(config.get("base_model_name_or_path"))
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    from cllm.decoding.gate import GATE_FILE

    from cllm.decoding.sampler_head import SAMPLER_FILE

    if (src / GATE_FILE).is_file():  # a gated adapter stays gated
        shutil.copy2(src / GATE_FILE, dst / GATE_FILE)
    files = ["adapter_model.safetensors"]
    if (src / SAMPLER_FILE).is_file():  # and keeps its sampler head, cast like the adapter
        files.append(SAMPLER_FILE)
        tensors = {**tensors, **{f"sampler.{k}": v for k, v in _save_cast(
            load_file(str(src / SAMPLER_FILE)), dst / SAMPLER_FILE, dtype, None, "the sampler head", "").items()}}
    size = sum((dst / f).stat().st_size for f in files)
    if max_mb is not None and size > max_mb * 2**20:
        raise CllmError(f"the adapter with its sampler head is {size / 2**20:.1f} MiB in {dtype}, over the "
                        f"{max_mb:g} MiB limit")
    return {"tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values()), "bytes": size}


def export_draft(src: str | Path, dst: str | Path, target: str | None = None, dtype: str = "bf16",
                 max_mb: float | None = 30.0) -> dict:
    """Publish a `cllm train-draft` folder without what it shares with its target (embeddings, LM head), which
    must equal the target's: `dst` holds config.json, cllm_draft.json and DRAFT_WEIGHTS in `dtype`, and loads as
    `--draft dst` beside that target. Returns {"tensors", "parameters", "bytes", "shared"}."""
    src, dst = Path(src), Path(dst)
    if not (src / "cllm_draft.json").is_file():
        raise CllmError(f"not a `cllm train-draft` output folder (no cllm_draft.json): {src}")
    meta = json.loads((src / "cllm_draft.json").read_text())
    target = target or meta.get("config", {}).get("model")
    draft, _ = load_model(str(src), "fp32", "cpu")
    base_state, state = load_model(target, "fp32", "cpu")[0].state_dict(), draft.state_dict()
    shared = shared_tensor_names(draft)
    for k in shared:
        if k not in base_state or not torch.equal(state[k], base_state[k]):
            raise CllmError(f"{src}: {k} is not the target {target}'s, so it cannot be left out (give --model)")
    tensors = _save_cast({k: v for k, v in state.items() if k not in shared}, dst / DRAFT_WEIGHTS, dtype, max_mb,
                         "the draft without the shared tensors", "fewer --draft-layers")
    draft.config.save_pretrained(dst)
    meta["shared_with_target"] = {"model": target, "tensors": {k: _fingerprint(state[k]) for k in shared}}
    (dst / "cllm_draft.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values()),
            "bytes": (dst / DRAFT_WEIGHTS).stat().st_size, "shared": shared}
