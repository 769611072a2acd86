import pytest
import torch

from cllm import machine
from cllm.errors import CllmError

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma f16c\n"
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_model_and_bf16_flags_from_cpuinfo():
    assert machine.cpu_model(AVX2_ONLY) == "AMD EPYC"
    assert machine.native_bf16(AVX2_ONLY) is False
    assert machine.native_bf16(SAPPHIRE) is True
    assert machine.native_bf16("") is None  # unreadable: unknown, not "no"


def test_machine_tag_names_cpu_capability_and_threads():
    info = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "torch_threads": 1, "cuda": None}
    assert machine.machine_tag(info) == "AMD EPYC, AVX2, 1 thread"
    assert machine.machine_tag({**info, "torch_threads": 2}).endswith("2 threads")
    live = machine.machine_info()
    assert live["torch_threads"] == torch.get_num_threads() and live["cpu"]


def test_slow_bf16_warning_only_for_bf16_on_cpus_without_it(monkeypatch, capsys):
    monkeypatch.setattr(machine, "_warned", False)
    monkeypatch.setattr(machine, "native_bf16", lambda cpuinfo=None: False)
    machine.warn_if_slow_bf16(torch.float32, "cpu")
    assert capsys.readouterr().err == ""
    machine.warn_if_slow_bf16(torch.bfloat16, "cpu")
    assert "slower than fp32" in capsys.readouterr().err
    machine.warn_if_slow_bf16(torch.bfloat16, "cpu")  # once per process
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(machine, "_warned", False)
    monkeypatch.setattr(machine, "native_bf16", lambda cpuinfo=None: True)
    machine.warn_if_slow_bf16(torch.bfloat16, "cpu")
    assert capsys.readouterr().err == ""


def test_dtype_auto_is_the_fast_dtype_of_the_cpu(monkeypatch):
    """auto -> fp32 on a CPU without bf16 instructions (bf16 is emulated there), bf16 with them or on CUDA; the
    CPU flags are mocked at their one source, /proc/cpuinfo as cllm.machine reads it."""
    from cllm import machine

    monkeypatch.delenv("CLLM_FAST_DTYPE")  # the suite pins fp32 (conftest); this test is about auto itself
    avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n"
    bf16 = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    for cpuinfo, want in ((avx2, "fp32"), (bf16, "bf16")):
        monkeypatch.setattr(machine, "_cpuinfo", lambda text=cpuinfo: text)
        assert machine.resolve_dtype("auto", "cpu") == want
        assert machine.resolve_dtype("fp32", "cpu") == "fp32" and machine.resolve_dtype("bf16", "cpu") == "bf16"
        assert machine.resolve_precision({})["bf16"] is (want == "bf16")
        assert machine.resolve_precision({"bf16": "auto"})["bf16"] is (want == "bf16")
        assert machine.resolve_precision({"bf16": False}) == {"bf16": False}  # the user's choice stands
        assert machine.resolve_precision({"fp16": True}) == {"fp16": True}
    assert machine.resolve_dtype("auto", "cuda:0") == "bf16"


def test_dtype_auto_is_what_the_commands_default_to_and_what_load_model_uses(monkeypatch, tiny_model_dir, capsys):
    import argparse

    import torch

    from cllm import machine
    from cllm.cli import main
    from cllm.commands import chat, decode, serve
    from cllm.eval.config import EvalConfig
    from cllm.models import load_model

    monkeypatch.delenv("CLLM_FAST_DTYPE")

    for command in (decode, serve, chat):
        p = argparse.ArgumentParser()
        command.add_arguments(p)
        assert p.get_default("dtype") == "auto", command.__name__
    assert EvalConfig.__dataclass_fields__["dtype"].default == "auto"
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "flags\t\t: avx2\n")
    model, _ = load_model(str(tiny_model_dir), "auto", "cpu")
    assert next(model.parameters()).dtype == torch.float32
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "flags\t\t: avx2 avx512_bf16\n")
    assert next(load_model(str(tiny_model_dir), "auto", "cpu")[0].parameters()).dtype == torch.bfloat16
    assert main(["decode", "--model", str(tiny_model_dir), "--prompt", "w3 w4", "--method", "ar",
                 "--max-new-tokens", "4", "--quiet"]) == 0
    assert "dtype bf16 (auto)" in capsys.readouterr().out  # the chosen dtype, shown and recorded
    monkeypatch.setenv("CLLM_FAST_DTYPE", "fp8")
    with pytest.raises(CllmError, match="CLLM_FAST_DTYPE"):
        machine.resolve_dtype("auto")


def test_no_shipped_config_names_a_dtype_without_saying_why():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    bare = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.yaml")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.match(r"\s*(dtype|bf16|fp16):", line) and "#" not in line]
    assert bare == []
