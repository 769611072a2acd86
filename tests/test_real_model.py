"""The real default model, SmolLM2-135M-Instruct (marked `real_model`: slower, still run in CI)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cllm.data.datasets import load_dataset_prompts
from cllm.decoding import ar_decode, jacobi_decode
from cllm.models import DRAFT_WEIGHTS, load_model
from cllm.data.prompts import format_prompt
from cllm.decoding.options import JacobiOptions, MtadOptions, MultiblockOptions, SpeculativeOptions

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    load_model("smollm2-135m")  # converts once if the cache is empty
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", dtype="fp32")
    return model, tok, time.perf_counter() - t0


def test_alias_loads_from_cache_in_seconds(smollm):
    model, tok, seconds = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    assert seconds < 30, f"reloading the converted model took {seconds:.1f} s"


def test_chat_template_is_applied(smollm):
    _, tok, _ = smollm
    ids = format_prompt(tok, "What is 2 + 3?")
    text = tok.decode(ids)
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_jacobi_equals_ar_equals_generate_on_gsm8k(smollm):
    model, tok, _ = smollm
    for rec in load_dataset_prompts("gsm8k", limit=2):
        ids = format_prompt(tok, rec.prompt)
        gen = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
        ar = ar_decode(model, tok, ids, max_new_tokens=48)
        jac = jacobi_decode(model, tok, ids, JacobiOptions(block_size=16), max_new_tokens=48)
        assert ar.token_ids == gen
        assert jac.token_ids == gen
        assert jac.n_forwards <= ar.n_forwards


def test_multiblock_equals_ar_on_gsm8k(smollm):
    """Multi-block Jacobi with recycling on the real model in fp32: token-identical to greedy AR."""
    from cllm.decoding import multiblock_decode

    model, tok, _ = smollm
    for rec in load_dataset_prompts("gsm8k", limit=2):
        ids = format_prompt(tok, rec.prompt)
        ar = ar_decode(model, tok, ids, max_new_tokens=48)
        mb = multiblock_decode(model, tok, ids, MultiblockOptions(block_size=8, n_blocks=3, spawn_ratio=0.25,
                               n_recycle=2), max_new_tokens=48)
        assert mb.token_ids == ar.token_ids
        assert mb.extra["max_in_flight"] >= 2


def test_sps_and_mtad_with_a_cut_draft_of_smollm(smollm):
    """A 3-layer draft cut out of SmolLM2 (untrained): greedy SpS reproduces AR exactly in fp32, and MTAD with the
    target as its own draft accepts every drafted token (cache handling on a real tied-embedding model)."""
    from cllm.decoding import mtad_decode, speculative_decode
    from cllm.models import check_draft_compatible
    from cllm.training.draft import build_draft, spread_layers

    model, tok, _ = smollm
    draft = build_draft(model, spread_layers(model.config.num_hidden_layers, 3))
    check_draft_compatible(model, tok, draft, tok)
    ids = format_prompt(tok, load_dataset_prompts("gsm8k", "test", limit=1)[0].prompt)
    ar = ar_decode(model, tok, ids, max_new_tokens=24)
    sps = speculative_decode(model, draft, tok, ids, SpeculativeOptions(gamma=3), max_new_tokens=24)
    assert sps.token_ids == ar.token_ids
    mt = mtad_decode(model, model, tok, ids, MtadOptions(gamma=4, beam_width=2, tau=0.5, temperature=1.0, top_k=10),
                     max_new_tokens=20, seed=0)
    assert mt.extra["accepted"] == mt.extra["drafted"] and len(mt.token_ids) == 20


MODELS = Path(__file__).resolve().parents[1] / "models"
PUBLISHED = sorted(p for p in MODELS.glob("*") if (p / "adapter_config.json").is_file())
GATED = [p for p in PUBLISHED if (p / "cllm_gate.json").is_file()]
DRAFTS = sorted(p for p in MODELS.glob("*") if (p / DRAFT_WEIGHTS).is_file())


def test_every_published_model_is_an_adapter_or_a_draft():
    assert {p for p in MODELS.glob("*") if p.is_dir()} == set(PUBLISHED) | set(DRAFTS)
    for folder in (*PUBLISHED, *DRAFTS):
        assert (folder / "README.md").is_file(), f"{folder.name} has no model card"


@pytest.mark.parametrize("draft_dir", DRAFTS, ids=[p.name for p in DRAFTS])
def test_published_draft_loads_beside_the_default_model_and_sps_stays_exact(smollm, draft_dir):
    """Every draft under models/ is at most 30 MiB, loads as `--draft` does (embeddings and LM head borrowed from
    the default model), and greedy SpS with it returns the target's greedy output in fp32, accepting some drafts."""
    from cllm.decoding import speculative_decode
    from cllm.models import load_draft

    model, tok, _ = smollm
    assert sum(f.stat().st_size for f in draft_dir.iterdir()) <= 30 * 2**20
    draft = load_draft(str(draft_dir), model, tok)
    ids = format_prompt(tok, load_dataset_prompts("gsm8k", "test", limit=1)[0].prompt)
    ar = ar_decode(model, tok, ids, max_new_tokens=32)
    sps = speculative_decode(model, draft, tok, ids, SpeculativeOptions(gamma=4), max_new_tokens=32)
    assert sps.token_ids == ar.token_ids
    assert sps.extra["accepted"] > 0


@pytest.mark.parametrize("adapter", [p for p in PUBLISHED if p not in GATED],
                         ids=[p.name for p in PUBLISHED if p not in GATED])
def test_published_adapter_loads_changes_the_model_and_keeps_jacobi_exact(smollm, adapter):
    """Every adapter under models/ is at most 20 MiB, loads onto the default model as `--adapter` does, changes its
    output, and its Jacobi decoding stays token-identical to its own greedy AR in fp32."""
    base, tok, _ = smollm
    assert sum(f.stat().st_size for f in adapter.iterdir()) <= 20 * 2**20
    model, _ = load_model("smollm2-135m", dtype="fp32", adapter=str(adapter))
    ids = format_prompt(tok, load_dataset_prompts("gsm8k", "test", limit=1)[0].prompt)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x).logits - base(x).logits).abs().max() > 1e-2  # the adapter is not a no-op
    ar = ar_decode(model, tok, ids, max_new_tokens=48)
    jac = jacobi_decode(model, tok, ids, JacobiOptions(block_size=16), max_new_tokens=48)
    assert jac.token_ids == ar.token_ids


@pytest.mark.parametrize("adapter", GATED, ids=[p.name for p in GATED])
def test_published_gated_adapter_leaves_the_base_exact_and_gated_decoding_lossless(smollm, adapter):
    """Every gated adapter under models/ is at most 20 MiB, records the alias as its base, loads switched off (the
    base bit for bit), changes the model at gate 1, and gated decoding returns the base's greedy output in fp32
    on two GSM8K test prompts, committing more than one token per forward on average; with LoRA on the top layers
    only, also with the layers below shared between the guess and its draft copy (`share_below`); with the
    draft's 2 runners-up at the guess's first position verified too (`draft_topk` 3); with a sampler head, also
    with it over the whole vocabulary and with it off; with the datastore published beside it, its branches
    too (both rules)."""
    import json

    from cllm.decoding import registry
    from cllm.decoding.gate import gate_state, gated
    from cllm.decoding.sampler_head import sampler_of

    base, tok, _ = smollm
    assert sum(f.stat().st_size for f in adapter.iterdir()) <= 20 * 2**20
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    model, _ = load_model("smollm2-135m", dtype="fp32", adapter=str(adapter))
    prompts = [format_prompt(tok, r.prompt) for r in load_dataset_prompts("gsm8k", "test", limit=2)]
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        want = base(x).logits
        assert torch.equal(model(x).logits, want)
        with gated(model, torch.ones(1, x.shape[1])):
            assert (model(x).logits - want).abs().max() > 1e-2
    settings = [{}, {"draft_topk": 3}] + ([{"share_below": True}] if gate_state(model).below else [])
    if sampler_of(model) is not None:  # the head over the whole vocabulary, and the draft without it
        settings += [{"sampler_candidates": 0}, {"sampler_tokens": 0}]
    if (adapter / "datastore.npz").is_file():  # its retrieval branches, two per forward (whole, then the tree rule)
        store = {"datastore": str(adapter / "datastore.npz"), "datastore_candidates": 2}
        settings += [store, {**store, "datastore_share": 0.1}]
    tokens = forwards = 0
    for ids in prompts:
        ar = ar_decode(base, tok, ids, max_new_tokens=64)
        for options in settings:
            [res] = registry.decode("gated", model, tok, [ids], [0], registry.DecodeConfig(max_new_tokens=64, **options))
            assert res.token_ids == ar.token_ids, options
            tokens, forwards = tokens + res.n_new_tokens, forwards + res.n_forwards
    assert tokens / forwards > 1.2
