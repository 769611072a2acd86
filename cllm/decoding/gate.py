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
import re

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
        self.below: list = []  # the decoder layers below the lowest one with a LoRA layer (run by the base alone)
        self.below_hooked = False
        # (verify rows Lv, (L - Lv,) rows the draft rows copy) of the next forwards, or None: see `shared_below`
        self.branch: tuple[int, torch.Tensor] | None = None

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

    def slice_below(self, module, args: tuple, kwargs: dict):
        """Forward pre-hook of a layer below the adapter: it runs the first Lv rows (the draft rows, last, left out)."""
        if self.branch is None:
            return None
        lv = self.branch[0]
        hidden = args[0]  # (B, L or Lv, d)
        mask = kwargs.get("attention_mask")  # (B, 1, L, S + L): the draft rows are the last rows and key columns
        if not (torch.is_tensor(mask) and mask.dim() == 4):
            raise CllmError(f"a shared-below forward needs an explicit 4-D attention mask, got {type(mask).__name__}")
        n_draft = mask.shape[-2] - lv
        kwargs = dict(kwargs, attention_mask=mask[..., :lv, : mask.shape[-1] - n_draft])
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            kwargs["position_embeddings"] = tuple(t[:, :lv] for t in cos_sin)  # (B, Lv, head_dim) each
        for name in ("position_ids", "cache_position"):
            if torch.is_tensor(kwargs.get(name)):
                kwargs[name] = kwargs[name][..., :lv]
        return (hidden[:, :lv], *args[1:]), kwargs

    def append_draft(self, module, args, output):
        """Forward hook of the last layer below the adapter: the draft rows take their source rows' states."""
        if self.branch is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # (B, Lv, d)
        hidden = torch.cat([hidden, hidden[:, self.branch[1].to(hidden.device)]], dim=1)  # (B, L, d)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

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
        state.below = layers_below(peft_model, layers)
        peft_model.cllm_gate = state
    state.set_enabled(enabled)
    return state


def layers_below(peft_model, lora_layers: list) -> list:
    """The decoder layers below the lowest one that holds a LoRA layer (`--lora-layers top:K`), from the modules'
    names (`...layers.<i>....`); [] when the adapter reaches the first layer or the names have no layer index."""
    names = {id(m): n for n, m in peft_model.named_modules()}
    found = [re.search(r"^(.*\.layers)\.(\d+)\.", names.get(id(m), "")) for m in lora_layers]
    if not found or not all(found) or len({f.group(1) for f in found}) != 1:
        return []
    lowest = min(int(f.group(2)) for f in found)
    return list(peft_model.get_submodule(found[0].group(1)))[:lowest]


@contextlib.contextmanager
def shared_below(model, n_verify: int, sources: list[int] | None):
    """Forwards inside this block run the layers below the adapter on their first `n_verify` rows only; each
    later row (a draft row) enters the lowest adapted layer with the state of row `sources[j]`. Exact when draft
    row j reads the same token at the same position with the same visibility as row sources[j]: below the
    adapter both are the base model on the same input (the guess-reading draft copy of `cllm.decoding.gated`).
    The layers below then cache K/V for the verify rows only; keep only those (`SeqCache.keep`). Yields whether
    it applies (sources given, and the adapter leaves layers below it)."""
    state = gate_state(model)
    if sources is None or state is None or not state.below:
        yield False
        return
    if not state.below_hooked:  # hooked on first use: models that never share pay nothing
        for layer in state.below:
            state.handles.append(layer.register_forward_pre_hook(state.slice_below, with_kwargs=True))
        state.handles.append(state.below[-1].register_forward_hook(state.append_draft))
        state.below_hooked = True
    state.branch = (n_verify, torch.tensor(sources, dtype=torch.long))
    try:
        yield True
    finally:
        state.branch = None


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
