"""One registry of decoding methods, and the one config they read.

Each method is registered once: `name -> Method(fn, needs_draft, supports_batch, sampling, check)`. `cllm decode`,
`cllm eval` and the pipeline build a `DecodeConfig` (flags or YAML) and call `decode(name, ...)` with keywords, so
a new method is one decoder file plus one `register` call (tests/test_registry.py registers a toy one).

Importing this module imports no torch: the built-in methods import their decoder when first called, so `--help`
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable

from cllm.config import opt as _opt
from cllm.errors import CllmError


@dataclass
class DecodeConfig:
    """What every method reads; a method ignores the fields that are not its own."""

    block_size: int = _opt(16, "Jacobi block size n")
    max_new_tokens: int = _opt(256, "new tokens per prompt, at most")
    init: str = _opt("prompt", "Jacobi initial guess", ("prompt", "repeat", "pad"))
    temperature: float = _opt(0.0, "ar/sps/mtad: 0 = greedy, > 0 samples")
    top_k: int | None = _opt(None, "sampling: keep the k most likely tokens")
    top_p: float | None = _opt(None, "sampling: nucleus mass in (0, 1]")
    gamma: int = _opt(4, "sps/mtad: draft tokens per iteration")
    adaptive_gamma: bool = _opt(False, "sps: +2 after a fully accepted round, -1 otherwise")
    beam_width: int = _opt(4, "mtad: beams of the draft's beam sampling")
    beam_replacement: bool = _opt(False, "mtad: draw beams with replacement")
    tau: float = _opt(0.5, "mtad: acceptance threshold on P/Q, > 0")
    beam_weights: str = _opt("joint", "mtad: beam weights w = s / sum(s), proportional to the joint draft probability "
                                      "(the paper), or the released code's log_softmax of s (near uniform)",
                             ("joint", "released"))
    n_blocks: int = _opt(2, "multiblock: blocks in flight K")
    spawn_ratio: float = _opt(0.85, "multiblock: a new block enters once the newest has this share r of its n "
                                    "tokens accepted")
    n_recycle: int = _opt(2, "multiblock: rejected tails verified as extra rows per forward, 0 = off")
    lookup_tokens: int = _opt(10, "hf_prompt_lookup, gated: candidate tokens copied from the prompt per forward")
    lookahead_window: int = _opt(5, "lookahead: window W (columns of the 2D Jacobi window)")
    lookahead_ngram: int = _opt(4, "lookahead: n-gram size N (the window has N-1 levels)")
    lookahead_guesses: int = _opt(5, "lookahead: G, n-grams verified per forward (and kept per key in the pool)")
    draft_input: str | None = _opt(None, "gated: what the draft copy reads, the guess or mask tokens (default: what "
                                         "the adapter was trained on)", ("guess", "mask"))
    pool_candidates: int = _opt(2, "gated: pooled n-grams (prompt and committed text) verified per forward")
    pool_ngram: int = _opt(4, "gated: n-gram size of the pool")

    @classmethod
    def from_args(cls, args, **changes) -> "DecodeConfig":
        """The config from an argparse namespace (or any object with these attributes), with `changes` applied."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **changes})

    def greedy(self) -> "DecodeConfig":
        return dataclasses.replace(self, temperature=0.0, top_k=None, top_p=None)

    def validate(self, methods: list[str], batch_size: int = 1, has_draft: bool = True) -> None:
        """Check the settings for these methods before any model is loaded."""
        from cllm.decoding.sampling import check_sampling_args

        if self.block_size < 1:
            raise CllmError(f"--block-size must be >= 1, got {self.block_size}")
        if self.max_new_tokens < 1:
            raise CllmError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        for name in methods:
            m = get(name)
            base, over = split_variant(name)
            if over:  # a variant: the method's checks on the config with its own options
                DecodeConfig.validate(dataclasses.replace(self, **over), [base], batch_size, has_draft)
                continue
            if not m.supports_batch and batch_size != 1:
                raise CllmError(f"{name} decodes one prompt at a time: use --batch-size 1")
            if m.needs_draft and not has_draft:
                raise CllmError(f"{name} needs --draft MODEL")
            if self.temperature > 0 and not m.sampling:
                sampling = ", ".join(n for n in names() if _METHODS[n].sampling)
                raise CllmError(f"{name} is greedy-only: --temperature {self.temperature:g} would be ignored; "
                                f"drop it or use a sampling method ({sampling})")
            if m.check is not None:
                m.check(self)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `DecodeConfig` field, with its default and help (shared by `cllm decode` and `cllm eval`)."""
    import typing

    hints = typing.get_type_hints(DecodeConfig)
    for f in dataclasses.fields(DecodeConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + " (default: %(default)s)"
        if f.default is False:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = next(a for a in typing_args(hints[f.name]) if a is not type(None))  # int | None -> int
        p.add_argument(flag, type=kind, default=f.default, choices=f.metadata["choices"], help=help_text)


# fn(model, tokenizer, prompt_ids (B lists of ids), seeds (B ints), cfg, draft) -> B DecodeResults
DecodeFn = Callable[..., list]


@dataclass(frozen=True)
class Method:
    fn: DecodeFn
    needs_draft: bool = False
    supports_batch: bool = False  # False: `decode` calls fn one prompt at a time
    sampling: bool = False  # honours temperature / top-k / top-p (greedy-only otherwise)
    check: Callable[[DecodeConfig], None] | None = None  # extra validation of the config
    streams: bool = False  # fn takes on_commit(row, token_ids), called as tokens are committed
    help: str = ""


_METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
    if name in _METHODS:
        raise CllmError(f"decoding method {name!r} is registered twice")
    _METHODS[name] = method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def split_variant(name: str) -> tuple[str, dict]:
    """`mtad:tau=0.3:beam_width=2` -> ("mtad", {"tau": 0.3, "beam_width": 2}): a method run with some decoding
    options of its own, so that one interleaved run compares settings (a tau sweep, block sizes)."""
    import typing

    base, *pairs = name.split(":")
    hints = typing.get_type_hints(DecodeConfig)
    over = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in hints:
            raise CllmError(f"method {name!r}: {pair!r} is not OPTION=VALUE of a decoding option "
                            f"({', '.join(hints)})")
        over[key] = _parse_option(name, key, raw, hints[key])
    return base, over


def _parse_option(name: str, key: str, raw: str, hint) -> object:
    kinds = [a for a in typing_args(hint) if a is not type(None)]
    if raw.lower() == "none" and type(None) in typing_args(hint):
        return None
    kind = kinds[0]
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError(raw)
            return raw.lower() == "true"
        return kind(raw)
    except ValueError:
        raise CllmError(f"method {name!r}: {key}={raw!r} is not a {kind.__name__}") from None


def typing_args(hint) -> tuple:
    import typing

    return typing.get_args(hint) or (hint,)


def get(name: str) -> Method:
    base, _ = split_variant(name)
    if base not in _METHODS:
        raise CllmError(f"unknown method {base!r}; choose from {', '.join(_METHODS)}")
    return _METHODS[base]


def names() -> tuple[str, ...]:
    """The registered methods (each may also run as a variant, `NAME:OPTION=VALUE...`)."""
    return tuple(_METHODS)


def known(name: str) -> bool:
    """Whether `name` is a registered method or a variant of one (a bad variant raises, naming the option)."""
    return split_variant(name)[0] in _METHODS


def decode(name: str, model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], cfg: DecodeConfig,
           draft=None, on_commit=None) -> list:
    """Decode a batch of prompts with the named method; one `DecodeResult` per prompt, in order.

    `on_commit(row, token_ids)` streams the tokens as they are committed where the method `streams`; for the
    others it is called once per prompt with all of its tokens when that prompt is done."""
    m = get(name)
    over = split_variant(name)[1]
    cfg = dataclasses.replace(cfg, **over) if over else cfg
    extra = {"on_commit": on_commit} if m.streams and on_commit is not None else {}
    if m.supports_batch or len(prompt_ids) == 1:
        results = m.fn(model, tokenizer, prompt_ids, seeds, cfg, draft, **extra)
    else:
        results = [m.fn(model, tokenizer, [p], [s], cfg, draft)[0] for p, s in zip(prompt_ids, seeds)]
    if on_commit is not None and not extra:
        for row, res in enumerate(results):
            on_commit(row, res.token_ids)
    return results


# The built-in methods. Each wrapper imports its decoder when called (this module stays torch-free).

def _ar(model, tok, prompts, seeds, c, draft, on_commit=None):
    from cllm.decoding.ar import ar_decode

    return ar_decode(model, tok, prompts, c.max_new_tokens, c.temperature, c.top_k, c.top_p, seeds,
                     on_commit=on_commit)


def _jacobi(model, tok, prompts, seeds, c, draft, on_commit=None):
    from cllm.decoding.jacobi import jacobi_decode

    return jacobi_decode(model, tok, prompts, c.block_size, c.max_new_tokens, c.init, seeds, on_commit=on_commit)


def _multiblock(model, tok, prompts, seeds, c, draft):
    from cllm.decoding.multiblock import multiblock_decode

    return [multiblock_decode(model, tok, prompts[0], c.block_size, c.max_new_tokens, c.n_blocks, c.spawn_ratio,
                              c.n_recycle, c.init, seeds[0])]


def _lookahead(model, tok, prompts, seeds, c, draft, on_commit=None):
    from cllm.decoding.lookahead import lookahead_decode

    return [lookahead_decode(model, tok, prompts[0], c.max_new_tokens, c.lookahead_window, c.lookahead_ngram,
                             c.lookahead_guesses, seeds[0], on_commit=on_commit)]


def _sps(model, tok, prompts, seeds, c, draft):
    from cllm.decoding.speculative import speculative_decode

    return [speculative_decode(model, draft, tok, prompts[0], c.max_new_tokens, c.gamma, c.adaptive_gamma,
                               c.temperature, c.top_k, c.top_p, seeds[0])]


def _mtad(model, tok, prompts, seeds, c, draft):
    from cllm.decoding.mtad import mtad_decode

    return [mtad_decode(model, draft, tok, prompts[0], c.max_new_tokens, c.gamma, c.beam_width, c.tau,
                        c.temperature, c.top_k, c.top_p, seeds[0], c.beam_replacement, beam_weights=c.beam_weights)]


def _gated(model, tok, prompts, seeds, c, draft, on_commit=None):
    from cllm.decoding.gate import gate_state
    from cllm.decoding.gated import GatedOptions, gated_decode

    state = gate_state(model)
    meta = state.meta if state is not None else {}
    opts = GatedOptions(block_size=c.block_size, draft_input=c.draft_input or meta.get("draft_input", "guess"),
                        pool_candidates=c.pool_candidates, pool_ngram=c.pool_ngram, lookup_tokens=c.lookup_tokens,
                        mask_token_id=meta.get("mask_token_id", 0))
    return [gated_decode(model, tok, prompts[0], c.max_new_tokens, opts, seeds[0], on_commit=on_commit)]


def _check_gated(c: DecodeConfig) -> None:
    from cllm.decoding.gated import GatedOptions

    GatedOptions(block_size=c.block_size, draft_input=c.draft_input or "guess", pool_candidates=c.pool_candidates,
                 pool_ngram=c.pool_ngram, lookup_tokens=c.lookup_tokens).check()


def _hf(mode: str):
    def run(model, tok, prompts, seeds, c, draft):
        from cllm.decoding.hf import hf_generate

        return [hf_generate(model, tok, prompts[0], c.max_new_tokens, mode, c.temperature, c.top_k, c.top_p,
                            seeds[0], c.lookup_tokens, draft, c.gamma)]

    return run


def _check_prompt_lookup(c: DecodeConfig) -> None:
    if c.lookup_tokens < 1:
        raise CllmError(f"--lookup-tokens must be >= 1, got {c.lookup_tokens}")


def _check_multiblock(c: DecodeConfig) -> None:
    from cllm.decoding.multiblock import check_multiblock_args

    check_multiblock_args(c.block_size, c.n_blocks, c.spawn_ratio, c.n_recycle)


def _check_lookahead(c: DecodeConfig) -> None:
    from cllm.decoding.lookahead import check_lookahead_args

    check_lookahead_args(c.lookahead_window, c.lookahead_ngram, c.lookahead_guesses)


def _check_sps(c: DecodeConfig) -> None:
    from cllm.decoding.speculative import check_draft_args

    check_draft_args(c.gamma)


def _check_mtad(c: DecodeConfig) -> None:
    from cllm.decoding.mtad import check_mtad_args

    _check_sps(c)
    check_mtad_args(c.tau, c.beam_width, c.temperature)


register("ar", Method(_ar, supports_batch=True, sampling=True, streams=True,
                      help="autoregressive, one token per forward"))
register("jacobi", Method(_jacobi, supports_batch=True, streams=True, help="Jacobi decoding of blocks of n guesses"))
register("multiblock", Method(_multiblock, check=_check_multiblock,
                              help="multi-block Jacobi decoding with rejection recycling"))
register("sps", Method(_sps, needs_draft=True, sampling=True, check=_check_sps, help="speculative sampling"))
register("mtad", Method(_mtad, needs_draft=True, sampling=True, check=_check_mtad,
                        help="multi-token assisted decoding"))
register("hf", Method(_hf("greedy"), sampling=True, help="Hugging Face generate with its own cache (the yardstick)"))
register("hf_prompt_lookup", Method(_hf("prompt_lookup"), check=_check_prompt_lookup,
                                    help="Hugging Face generate with prompt lookup decoding"))
register("hf_assisted", Method(_hf("assisted"), needs_draft=True, sampling=True, check=_check_sps,
                               help="Hugging Face assisted generation with the draft model"))
register("lookahead", Method(_lookahead, check=_check_lookahead, streams=True,
                             help="lookahead decoding: Jacobi n-grams collected and verified in one forward"))
register("gated", Method(_gated, check=_check_gated, streams=True,
                         help="lossless: a gated adapter drafts, the base verifies (with pooled n-grams), one forward"))
