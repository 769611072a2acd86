"""What a timing was measured on: CPU model, threads, torch build, native bf16 support.

Wall-clock figures only compare within one machine. bf16 is the fast dtype on CPUs with bf16 matrix instructions
(AVX512_BF16, AMX) and an emulated, slow one elsewhere, where a multi-token forward costs several times more in bf16
than in fp32 (bench/window_cost.py measures it; docs/experiments/machine_and_base_model.md has the figures). So an
eval records the machine next to its numbers and `load_model` warns when bf16 is asked for on a CPU without them.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str, text: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    return _cpuinfo_field("model name", text) or platform.processor() or platform.machine() or "unknown"


def native_bf16(cpuinfo: str | None = None) -> bool | None:
    """True when the CPU has bf16 matrix instructions; None when /proc/cpuinfo is not readable."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = _cpuinfo_field("flags", text)
    if flags is None:
        return None
    return any(f in flags.split() for f in BF16_FLAGS)


def fast_dtype(device=None, cpuinfo: str | None = None) -> str:
    """The fast compute dtype here: bf16 on CUDA and on CPUs with bf16 matrix instructions (AVX512_BF16, AMX),
    fp32 elsewhere (bf16 is emulated there and slower). `cpuinfo` stands in for /proc/cpuinfo (tests)."""
    forced = os.environ.get("CLLM_FAST_DTYPE")
    if forced:  # a deliberate choice for every `auto` (the test suite pins fp32: exactness on every machine)
        if forced not in ("fp32", "bf16", "fp16"):
            from cllm.errors import CllmError

            raise CllmError(f"$CLLM_FAST_DTYPE must be fp32, bf16 or fp16, got {forced!r}")
        return forced
    if device is not None and str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if native_bf16(cpuinfo) else "fp32"


def resolve_dtype(dtype, device=None):
    """`auto` -> `fast_dtype(device)`; any other value unchanged."""
    return fast_dtype(device) if str(dtype).lower() == "auto" else dtype


def resolve_precision(trainer: dict, device=None) -> dict:
    """TrainingArguments' `bf16`/`fp16` with `auto` (or neither given) resolved: bf16 where it is the fast dtype
    (`fast_dtype`), full precision elsewhere."""
    out = dict(trainer)
    auto = [k for k in ("bf16", "fp16") if out.get(k) == "auto"]
    for k in auto:
        out.pop(k)
    if out.get("bf16") is True or out.get("fp16") is True:  # the user's choice
        return out
    if auto or ("bf16" not in out and "fp16" not in out):
        out["bf16"] = fast_dtype(device) == "bf16"
    return out


def machine_info() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_tag(info: dict | None = None) -> str:
    """One short string per timing setting, stored on every eval row ("AMD EPYC, AVX2, 1 thread")."""
    info = info or machine_info()
    if info.get("cuda"):
        return info["cuda"]
    threads = info["torch_threads"]
    return f"{info['cpu']}, {info['cpu_capability']}, {threads} thread{'s' if threads != 1 else ''}"


_warned = False


def warn_if_slow_bf16(dtype, device) -> None:
    """One stderr line when bf16 runs on a CPU without bf16 instructions (it works, but slower than fp32)."""
    global _warned
    import torch

    if _warned or dtype != torch.bfloat16 or torch.device(device or "cpu").type != "cpu":
        return
    if native_bf16() is False:
        _warned = True
        print(f"cllm: warning: bf16 on a CPU without {'/'.join(BF16_FLAGS)} ({cpu_model()}) is emulated and "
              "usually slower than fp32, wide (Jacobi) forwards most of all; use --dtype fp32 for speed here",
              file=sys.stderr)
