"""Shared fixtures: tiny random Llama models built in memory (float64 for exact comparisons) and a tiny tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 64

# `dtype: auto` (and training's bf16 auto) resolve to fp32 in every test and every process a test starts, whatever
# this machine's fast dtype: the tests compare outputs exactly. tests/test_machine.py tests auto itself.
os.environ["CLLM_FAST_DTYPE"] = "fp32"


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights. Random weights give nearly flat logits; a larger init std makes the
    greedy chain less repetitive, so that Jacobi iterations actually have something to converge."""
    torch.manual_seed(seed)
    cfg = tiny_config(initializer_range=0.5, **overrides)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def with_random_gated_adapter(model, seed: int = 0, r: int = 4, layers: list[int] | None = None):
    """`model` wrapped with a gated LoRA adapter on all linear layers (of the decoder layers `layers`, default all)
    whose B weights are random (PEFT starts them at zero, which would make every test of the gate pass trivially);
    eval mode, gate attached (adapter off)."""
    from peft import LoraConfig, get_peft_model

    from cllm.decoding.gate import attach_gate
    from cllm.training.run import lora_targets

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=lora_targets(model, "all-linear", layers),
                        layers_to_transform=layers)
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    model.eval()
    attach_gate(model)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over '<pad> <eos> <unk> w3 .. w63' without a chat template (plain-text prompts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def random_prompt(gen: torch.Generator, length: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=gen).tolist()


def save_tiny_model(path, seed: int, tokenizer=None, **overrides):
    """Save a tiny fp32 model (eos = 1) with a tokenizer into `path`, loadable by `--model DIR`; returns path."""
    model = tiny_model(seed=seed, dtype=torch.float32, eos_token_id=1, **overrides)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder with tokenizer (fp32), loadable by `cllm decode --model DIR`; eos = 1."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=1)
