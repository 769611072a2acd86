"""One registry of decoding methods, each with its own options dataclass, and the one config that carries them.

Each method is registered once: `name -> Method(fn, options=XOptions, needs_draft, supports_batch, streams)`.
The options class (`cllm.decoding.options`, or the new method's own file) is the single source of the method's
settings: `add_arguments` makes one CLI flag per option name, `DecodeConfig` accepts the same names as keywords and
YAML keys, `NAME:OPTION=VALUE...` runs a method with some of its options changed, and `DecodeConfig.options_for`
gives the options object the decoder receives and the report records (`asdict`). A new method is one decoder file
plus one `register` call (tests/test_registry.py registers a toy one with two options).

Importing this module imports no torch: the built-in methods import their decoder when first called, so `--help`
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Callable

from cllm.decoding import options as o
from cllm.errors import CllmError

# fn(model, tokenizer, prompt_ids (B lists of ids), seeds (B ints), max_new_tokens, options, draft, on_commit)
#   -> B DecodeResults
DecodeFn = Callable[..., list]


@dataclass(frozen=True)
class Method:
    fn: DecodeFn
    options: type = o.NoOptions  # a dataclass of the method's options with `check()` (see cllm.decoding.options)
    needs_draft: bool = False
    supports_batch: bool = False  # False: `decode` calls fn one prompt at a time
    streams: bool = False  # fn's on_commit(row, token_ids) is called as tokens are committed
    help: str = ""

    @property
    def sampling(self) -> bool:
        """Honours temperature / top-k / top-p (greedy-only otherwise)."""
        return issubclass(self.options, o.SamplingOptions)


_METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
    if name in _METHODS:
        raise CllmError(f"decoding method {name!r} is registered twice")
    table = option_table()
    for key, (field, _) in _option_fields(method.options).items():
        if key in table and table[key].type != field.type:
            raise CllmError(f"method {name!r}: option {key!r} has another type than the registered one")
    _METHODS[name] = method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


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


# ------------------------------------------------------------------------------------------------- option names

def _option_fields(cls) -> dict[str, tuple[dataclasses.Field, type]]:
    """{option key: (field, options class)} of one options class; the key is `<prefix>_<field>` where the class
    has a prefix. Fields with flag=False are code's, not the user's."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag", True):
            out[f"{cls.prefix}_{f.name}" if cls.prefix else f.name] = (f, cls)
    return out


def option_table() -> dict[str, dataclasses.Field]:
    """{option key: its field (of the first method registering it)} over every registered method."""
    table: dict[str, dataclasses.Field] = {}
    for m in _METHODS.values():
        for key, (field, _) in _option_fields(m.options).items():
            table.setdefault(key, field)
    return table


def option_type(key: str) -> tuple[type, bool]:
    """(the option's base type, whether None is allowed)."""
    cls = next(cls for m in _METHODS.values() for k, (_, cls) in _option_fields(m.options).items() if k == key)
    field = next(f for f in dataclasses.fields(cls) if key in (f.name, f"{cls.prefix}_{f.name}"))
    hint = typing.get_type_hints(cls)[field.name]
    args = typing.get_args(hint) or (hint,)
    return next(a for a in args if a is not type(None)), type(None) in args


def option_keys(name: str) -> dict[str, str]:
    """{option key: field name} of a method (variants allowed)."""
    return {key: f.name for key, (f, _) in _option_fields(get(name).options).items()}


def _defaults(key: str) -> str:
    seen: dict[str, list[str]] = {}
    for name, m in _METHODS.items():
        for k, (f, _) in _option_fields(m.options).items():
            if k == key:
                seen.setdefault(repr(f.default), []).append(name)
    if len(seen) == 1:
        return f"default: {next(iter(seen))}"
    return "defaults: " + ", ".join(f"{v} ({'/'.join(ms)})" for v, ms in seen.items())


def options_dataclass() -> type:
    """A dataclass with one field per option key of the registered methods, each `type | None = None` (None: the
    method's default): what config files and `cllm.config` check option keys and values against."""
    fields = []
    for key, field in option_table().items():
        kind, _ = option_type(key)
        meta = {"help": field.metadata["help"], "choices": field.metadata.get("choices")}
        fields.append((key, kind | None, dataclasses.field(default=None, metadata=meta)))
    return dataclasses.make_dataclass("DecodingOptions", fields)


def add_arguments(p: argparse.ArgumentParser, max_new_tokens: bool = True) -> None:
    """(`--max-new-tokens` and) one flag per option key of the registered methods (shared by `cllm decode`, `eval`,
    `serve` and `chat`); a flag not given leaves each method its own default."""
    g = p.add_argument_group("decoding options (each applies to the methods that have it)")
    if max_new_tokens:
        g.add_argument("--max-new-tokens", type=int, default=argparse.SUPPRESS,
                       help="new tokens per prompt, at most (default: 256)")
    for key, field in option_table().items():
        flag = "--" + key.replace("_", "-")
        help_text = f"{field.metadata['help']} ({_defaults(key)})"
        kind, _ = option_type(key)
        if kind is bool:
            g.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            g.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS,
                           choices=field.metadata.get("choices"), help=help_text)


def split_variant(name: str) -> tuple[str, dict]:
    """`mtad:tau=0.3:beam_width=2` -> ("mtad", {"tau": 0.3, "beam_width": 2}): a method run with some options of
    its own, so that one interleaved run compares settings (a tau sweep, block sizes)."""
    base, *pairs = name.split(":")
    keys = {k: f for m in ([_METHODS[base]] if base in _METHODS else []) for k, (f, _) in
            _option_fields(m.options).items()}
    over = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or (base in _METHODS and key not in keys):
            raise CllmError(f"method {name!r}: {pair!r} is not OPTION=VALUE of an option of {base} "
                            f"({', '.join(keys) or 'it has none'})")
        over[key] = _parse_option(name, key, raw) if base in _METHODS else raw
    return base, over


def _parse_option(name: str, key: str, raw: str) -> object:
    kind, optional = option_type(key)
    if raw.lower() == "none" and optional:
        return None
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError(raw)
            return raw.lower() == "true"
        return kind(raw)
    except ValueError:
        raise CllmError(f"method {name!r}: {key}={raw!r} is not a {kind.__name__}") from None


# ------------------------------------------------------------------------------------------------- the config

class DecodeConfig:
    """What a decode run sets: `max_new_tokens` and option values by key (flags, YAML keys or keywords:
    `DecodeConfig(max_new_tokens=64, block_size=8)`). Each method takes the options it has, and keeps its own
    defaults for the rest (`options_for`)."""

    def __init__(self, max_new_tokens: int = 256, **options):
        self.max_new_tokens = max_new_tokens
        self.options = {k: v for k, v in options.items() if v is not None}  # None: the method's default
        unknown = sorted(set(self.options) - set(option_table()))
        if unknown:
            raise CllmError(f"unknown decoding option(s) {', '.join(unknown)}; known: {', '.join(option_table())}")

    def __repr__(self) -> str:
        return f"DecodeConfig(max_new_tokens={self.max_new_tokens}, {self.options})"

    def __eq__(self, other) -> bool:
        return isinstance(other, DecodeConfig) and (self.max_new_tokens, self.options) == (
            other.max_new_tokens, other.options)

    @classmethod
    def from_args(cls, args, **changes) -> "DecodeConfig":
        """The config from an argparse namespace (or any object with these attributes), with `changes` applied;
        an option not given is left out, so each method keeps its default."""
        keys = ["max_new_tokens", *option_table()]
        values = {k: getattr(args, k) for k in keys if hasattr(args, k)}
        return cls(**{**values, **changes})

    def replace(self, **changes) -> "DecodeConfig":
        values = {**self.options, **changes}
        return DecodeConfig(values.pop("max_new_tokens", self.max_new_tokens), **values)

    def greedy(self) -> "DecodeConfig":
        return self.replace(temperature=0.0, top_k=None, top_p=None)

    def options_for(self, name: str):
        """The options object of a method (or variant): its defaults, the config's values of its options, the
        variant's own; checked."""
        base, over = split_variant(name)
        m = get(base)
        keys = option_keys(base)
        given = {**{k: v for k, v in self.options.items() if k in keys}, **over}
        opts = m.options(**{keys[k]: v for k, v in given.items()})
        opts.check()
        return opts

    def settings(self, name: str) -> dict:
        """The method's options as the report records them (every user option, defaults included)."""
        opts = self.options_for(name)
        return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.metadata.get("flag", True)}

    def validate(self, methods: list[str], batch_size: int = 1, has_draft: bool = True) -> None:
        """Check the settings for these methods before any model is loaded."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise CllmError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.options.get("block_size", 1) < 1:
            raise CllmError(f"--block-size must be >= 1, got {self.options['block_size']}")
        sampling_set = any(self.options.get(k) not in (None, 0, 0.0) for k in ("temperature",))
        o.SamplingOptions(**{k: self.options[k] for k in ("temperature", "top_k", "top_p")
                             if k in self.options}).check()
        for name in methods:
            m = get(name)
            if not m.supports_batch and batch_size != 1:
                raise CllmError(f"{name} decodes one prompt at a time: use --batch-size 1")
            if m.needs_draft and not has_draft:
                raise CllmError(f"{name} needs --draft MODEL")
            if sampling_set and not m.sampling:
                sampling = ", ".join(n for n in names() if _METHODS[n].sampling)
                raise CllmError(f"{name} is greedy-only: --temperature {self.options['temperature']:g} would be "
                                f"ignored; drop it or use a sampling method ({sampling})")
            self.options_for(name)


def decode(name: str, model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], cfg: DecodeConfig,
           draft=None, on_commit=None) -> list:
    """Decode a batch of prompts with the named method; one `DecodeResult` per prompt, in order.

    `on_commit(row, token_ids)` streams the tokens as they are committed where the method `streams`; for the
    others it is called once per prompt with all of its tokens when that prompt is done."""
    m = get(name)
    opts = cfg.options_for(name)
    stream = on_commit if m.streams else None
    if m.supports_batch or len(prompt_ids) == 1:
        results = m.fn(model, tokenizer, prompt_ids, seeds, cfg.max_new_tokens, opts, draft, stream)
    else:
        results = [m.fn(model, tokenizer, [p], [s], cfg.max_new_tokens, opts, draft, None)[0]
                   for p, s in zip(prompt_ids, seeds)]
    if on_commit is not None and stream is None:
        for row, res in enumerate(results):
            on_commit(row, res.token_ids)
    return results


# The built-in methods. Each wrapper imports its decoder when called (this module stays torch-free).

def _ar(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
    from cllm.decoding.ar import ar_decode

    return ar_decode(model, tok, prompts, opts, max_new, seeds, on_commit=on_commit)


def _jacobi(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
    from cllm.decoding.jacobi import jacobi_decode

    return jacobi_decode(model, tok, prompts, opts, max_new, seeds, on_commit=on_commit)


def _multiblock(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
    from cllm.decoding.multiblock import multiblock_decode

    return [multiblock_decode(model, tok, prompts[0], opts, max_new, seeds[0])]


def _lookahead(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
    from cllm.decoding.lookahead import lookahead_decode

    return [lookahead_decode(model, tok, prompts[0], opts, max_new, seeds[0], on_commit=on_commit)]


def _sps(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
    from cllm.decoding.speculative import speculative_decode

    return [speculative_decode(model, draft, tok, prompts[0], opts, max_new, seeds[0])]


def _mtad(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
    from cllm.decoding.mtad import mtad_decode

    return [mtad_decode(model, draft, tok, prompts[0], opts, max_new, seeds[0])]


def _gated(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
    from cllm.decoding.gated import gated_decode, resolve_options

    return [gated_decode(model, tok, prompts[0], resolve_options(model, opts), max_new, seeds[0],
                         on_commit=on_commit)]


def _hf(mode: str):
    def run(model, tok, prompts, seeds, max_new, opts, draft, on_commit):
        from cllm.decoding.hf import hf_generate

        return [hf_generate(model, tok, prompts[0], opts, max_new, seeds[0], mode=mode, draft=draft)]

    return run


register("ar", Method(_ar, o.SamplingOptions, supports_batch=True, streams=True,
                      help="autoregressive, one token per forward"))
register("jacobi", Method(_jacobi, o.JacobiOptions, supports_batch=True, streams=True,
                          help="Jacobi decoding of blocks of n guesses"))
register("multiblock", Method(_multiblock, o.MultiblockOptions,
                              help="multi-block Jacobi decoding with rejection recycling"))
register("sps", Method(_sps, o.SpeculativeOptions, needs_draft=True, help="speculative sampling"))
register("mtad", Method(_mtad, o.MtadOptions, needs_draft=True, help="multi-token assisted decoding"))
register("hf", Method(_hf("greedy"), o.SamplingOptions,
                      help="Hugging Face generate with its own cache (the yardstick)"))
register("hf_prompt_lookup", Method(_hf("prompt_lookup"), o.PromptLookupOptions,
                                    help="Hugging Face generate with prompt lookup decoding"))
register("hf_assisted", Method(_hf("assisted"), o.AssistedOptions, needs_draft=True,
                               help="Hugging Face assisted generation with the draft model"))
register("lookahead", Method(_lookahead, o.LookaheadOptions, streams=True,
                             help="lookahead decoding: Jacobi n-grams collected and verified in one forward"))
register("gated", Method(_gated, o.GatedOptions, streams=True,
                         help="lossless: a gated adapter drafts, the base verifies (with pooled n-grams), one forward"))
