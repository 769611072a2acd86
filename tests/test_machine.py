import torch

from cllm import machine

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
