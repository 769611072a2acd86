"""Gated LoRA: an adapter whose update is multiplied by a per-position gate, so one forward mixes the base model
(gate 0) and base + adapter (gate 1).

The adapter is a PEFT LoRA adapter; `attach_gate` hooks every `lora_B` output so that a layer computes
`base(x) + gate * lora_B(lora_A(x)) * scaling`. At gate 0 the sum adds an exact zero, so those positions, their
K/V included, are the base model's bit for bit, and no gradient reaches the adapter through them. Outside a
`gated(...)` block the adapter layers are switched off entirely: every method that does not ask for a gate runs
the base model exactly (and pays nothing for the adapter).

Relatives: "Your LLM Knows the Future" (Samragh et al., 2025) gates a LoRA on its mask tokens; here the gate is
any per-position pattern (`cllm.decoding.gated` puts a verify copy at 0 and a draft copy at 1 in one forward).
"""

from __future__ import annotations

import contextlib

import torch

from cllm.errors import CllmError

# The file a gated adapter folder carries beside PEFT's adapter_config.json (what the adapter was trained to read).
GATE_FILE = "cllm_gate.json"


class GateState:
    """The gate of the next forwards, (B, T) or None, and the LoRA layers it switches."""

    def __init__(self, lora_layers: list):
        self._gate: torch.Tensor | None = None
        self._cast: torch.Tensor | None = None  # the gate as (B, T, 1) in the layers' dtype, made once per gate
        self.layers = lora_layers
        self.handles: list = []
        self.meta: dict = {}  # the adapter folder's GATE_FILE: what the draft was trained to read

    @property
    def gate(self) -> torch.Tensor | None:
        return self._gate

    @gate.setter
    def gate(self, gate: torch.Tensor | None) -> None:
        self._gate, self._cast = gate, None

    def hook(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        """`lora_B` output (B, T, out) times the gate (B, T, 1)."""
        if self._gate is None:
            raise CllmError("a gated LoRA adapter ran without a gate (use cllm.decoding.gate.gated)")
        if self._cast is None or self._cast.dtype != output.dtype:  # one cast per forward, not one per layer
            self._cast = self._gate.to(output.dtype).unsqueeze(-1)
        return output * self._cast

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers:
            layer._disable_adapters = not enabled  # PEFT's own switch: disabled layers return base_layer(x)


def attach_gate(peft_model, enabled: bool = False) -> GateState:
    """Hook the gate into every LoRA layer of `peft_model` (idempotent); the adapter starts switched off unless
    `enabled` (training keeps it on and sets a gate for every batch)."""
    state = getattr(peft_model, "cllm_gate", None)
    if state is None:
        from peft.tuners.lora import LoraLayer

        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        if not layers or not all(hasattr(m, "_disable_adapters") for m in layers):
            raise CllmError("a gated adapter needs a PEFT LoRA model (no LoRA layer found)")
        state = GateState(layers)
        for layer in layers:
            for b in layer.lora_B.values():
                state.handles.append(b.register_forward_hook(state.hook))
        peft_model.cllm_gate = state
    state.set_enabled(enabled)
    return state


def gate_state(model) -> GateState | None:
    """The gate of `model` (a PEFT model, or a wrapper of one that forwards attributes), if it has one."""
    while model is not None:
        state = getattr(model, "cllm_gate", None)
        if state is not None:
            return state
        model = getattr(model, "module", None)  # DDP / DeepSpeed wrappers
    return None


def is_gated(model) -> bool:
    return gate_state(model) is not None


@contextlib.contextmanager
def gated(model, gate: torch.Tensor):
    """Forwards of `model` inside this block run with `gate` (B, T): 0 = base, 1 = base + adapter, per position."""
    state = gate_state(model)
    if state is None:
        raise CllmError("this model has no gated adapter (load one with --adapter DIR of a gated adapter)")
    was_enabled = not state.layers[0]._disable_adapters
    state.gate = gate
    state.set_enabled(True)
    try:
        yield
    finally:
        state.gate = None
        state.set_enabled(was_enabled)
