"""Hugging Face `generate` as decoding methods, so the yardstick users know runs in the same harness: plain greedy
(or sampled) generation with its own cache, prompt lookup decoding and assisted generation with a draft model.

`generate` reports no per-forward statistics, so a forward hook on the target records the position of every
forward's first input token; consecutive starts give the tokens each forward committed (prefill included), the
number of forwards and the accepted-length histogram, as the project's own decoders report them.
"""

from __future__ import annotations

import contextlib
import time

import torch

from cllm.decoding.common import DecodeResult, check_lengths, eos_ids
from cllm.decoding.options import AssistedOptions, PromptLookupOptions, SamplingOptions
from cllm.decoding.pruned_draft import PrunedVocabDraft
from cllm.errors import CllmError

MODES = ("greedy", "prompt_lookup", "assisted")


class _ForwardStarts:
    """Records position_ids[0, 0] of every forward of `model` while active (a context manager)."""

    def __init__(self, model):
        self.model, self.starts, self.handle = model, [], None

    def _hook(self, module, args, kwargs):
        pos = kwargs.get("position_ids")
        self.starts.append(int(pos[0, 0]) if pos is not None else None)

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def accept_lengths_from_starts(starts: list[int], prompt_len: int, n_new: int) -> list[int]:
    """Tokens committed by each forward, from the first input position of each: forward i commits up to the token
    forward i+1 starts at (that token is fed back, not yet cached), the last one up to the end. A pure function."""
    ends = [s + 1 for s in starts[1:]] + [prompt_len + n_new]
    out, done = [], prompt_len
    for end in ends:
        out.append(end - done)
        done = end
    if any(a < 0 for a in out) or sum(out) != n_new:
        raise CllmError(f"generate's forwards do not add up (starts {starts}, prompt {prompt_len}, new {n_new})")
    return out


@torch.inference_mode()
def hf_generate(model, tokenizer, prompt_ids: list[int], options=None, max_new_tokens: int = 256, seed: int = 0,
                mode: str = "greedy", draft=None) -> DecodeResult:
    """Decode one prompt with `model.generate`; `mode` picks plain generation (`SamplingOptions`), prompt lookup
    (`PromptLookupOptions`) or assisted generation (`AssistedOptions`)."""
    if mode not in MODES:
        raise CllmError(f"mode must be one of {MODES}, got {mode!r}")
    opts = options or {"greedy": SamplingOptions, "prompt_lookup": PromptLookupOptions,
                       "assisted": AssistedOptions}[mode]()
    opts.check()
    check_lengths(max_new_tokens)
    temperature = getattr(opts, "temperature", 0.0)
    stop = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)  # (1, P)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "eos_token_id": sorted(stop) or None,
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=opts.top_k or 0, top_p=opts.top_p or 1.0)
        torch.manual_seed(seed)  # generate samples from torch's global generator
    if mode == "prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = opts.lookup_tokens
    elif mode == "assisted":
        if draft is None:
            raise CllmError("assisted generation needs a draft model")
        # generate() needs a PreTrainedModel with the full vocabulary: a pruned-head draft drafts with the head
        # it wraps here (recorded in the result's extra)
        draft = draft.draft if isinstance(draft, PrunedVocabDraft) else draft
        draft.generation_config.num_assistant_tokens = opts.gamma
        draft.generation_config.num_assistant_tokens_schedule = "constant"  # gamma fixed, as --method sps
        kwargs["assistant_model"] = draft
    t0 = time.perf_counter()
    drafting = _ForwardStarts(draft) if mode == "assisted" else contextlib.nullcontext()
    with _ForwardStarts(model) as target, drafting as drafted:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    wall = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    finish = "eos" if new and new[-1] in stop else "length"
    extra = {"draft_forwards": len(drafted.starts), "draft_head": "full"} if mode == "assisted" else {}
    return DecodeResult(token_ids=new, text=tokenizer.decode(new, skip_special_tokens=True),
                        n_forwards=len(target.starts),
                        accept_lengths=accept_lengths_from_starts(target.starts, len(prompt_ids), len(new)),
                        finish_reason=finish, wall_time_s=wall, extra=extra)
