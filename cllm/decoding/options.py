"""The options of each built-in decoding method, one dataclass per method (torch-free, so the registry and `--help`
import no torch).

A field is one option: its help and choices (`cllm.config.opt`), its default (the method's own), validated by
`check()`. The registry makes one CLI flag, YAML key and `NAME:OPTION=VALUE` variant key per option name from these
classes and records `asdict(options)` in every report; the decoders receive the object. An options class with a
`prefix` names its flags `--<prefix>-<field>` (lookahead's `window` is `--lookahead-window`); fields of the same
name in several methods share one flag (`--block-size` sets Jacobi's, multi-block's and gated's). A field with
`flag=False` is set by code, never by the user (Jacobi's trajectory recording).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cllm.config import opt
from cllm.errors import CllmError

INIT_STRATEGIES = ("prompt", "repeat", "pad")
DRAFT_INPUTS = ("guess", "mask")
BEAM_WEIGHTS = ("joint", "released")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CllmError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class NoOptions:
    """A method without options of its own (plain greedy decoders)."""

    prefix: ClassVar[str] = ""

    def check(self) -> None:
        pass


@dataclass
class SamplingOptions:
    prefix: ClassVar[str] = ""
    temperature: float = opt(0.0, "0 = greedy, > 0 samples")
    top_k: int | None = opt(None, "sampling: keep the k most likely tokens")
    top_p: float | None = opt(None, "sampling: nucleus mass in (0, 1]")

    def check(self) -> None:
        if self.temperature < 0:
            raise CllmError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise CllmError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise CllmError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class BlockOptions:
    """A Jacobi block: its size and initial guess (shared by the Jacobi decoders)."""

    prefix: ClassVar[str] = ""
    block_size: int = opt(16, "Jacobi block size n")
    init: str = opt("prompt", "Jacobi initial guess", INIT_STRATEGIES)

    def check(self) -> None:
        _positive("block_size", self.block_size)
        if self.init not in INIT_STRATEGIES:
            raise CllmError(f"unknown init strategy {self.init!r}; choose one of {INIT_STRATEGIES}")


@dataclass
class JacobiOptions(BlockOptions):
    record_trajectory: bool = opt(False, "keep every Jacobi state (data generation)", flag=False)


@dataclass
class MultiblockOptions(BlockOptions):
    n_blocks: int = opt(2, "multiblock: blocks in flight K")
    spawn_ratio: float = opt(0.85, "multiblock: a new block enters once the newest has this share r of its n "
                                   "tokens accepted")
    n_recycle: int = opt(2, "multiblock: rejected tails verified as extra rows per forward, 0 = off")

    def check(self) -> None:
        super().check()
        _positive("n_blocks (K)", self.n_blocks)
        if not 0.0 < self.spawn_ratio <= 1.0:
            raise CllmError(f"spawn_ratio (r) must be in (0, 1], got {self.spawn_ratio!r}")
        if not isinstance(self.n_recycle, int) or self.n_recycle < 0:
            raise CllmError(f"n_recycle must be an integer >= 0, got {self.n_recycle!r}")


@dataclass
class LookaheadOptions:
    prefix: ClassVar[str] = "lookahead"
    window: int = opt(5, "lookahead: window W (columns of the 2D Jacobi window)")
    ngram: int = opt(4, "lookahead: n-gram size N (the window has N-1 levels)")
    guesses: int = opt(5, "lookahead: G, n-grams verified per forward (and kept per key in the pool)")

    def check(self) -> None:
        _positive("lookahead window W", self.window)
        if not isinstance(self.ngram, int) or self.ngram < 2:
            raise CllmError(f"lookahead n-gram size N must be an integer >= 2, got {self.ngram!r}")
        if not isinstance(self.guesses, int) or self.guesses < 0:
            raise CllmError(f"lookahead guesses G must be an integer >= 0, got {self.guesses!r}")


@dataclass
class SpeculativeOptions(SamplingOptions):
    gamma: int = opt(4, "sps/mtad/hf_assisted: draft tokens per iteration")
    adaptive_gamma: bool = opt(False, "sps: +2 after a fully accepted round, -1 otherwise")

    def check(self) -> None:
        super().check()
        _positive("gamma (draft length)", self.gamma)


@dataclass
class MtadOptions(SamplingOptions):
    temperature: float = opt(1.0, "0 = greedy, > 0 samples")
    gamma: int = opt(4, "sps/mtad/hf_assisted: draft tokens per iteration")
    beam_width: int = opt(4, "mtad: beams of the draft's beam sampling")
    beam_replacement: bool = opt(False, "mtad: draw beams with replacement")
    tau: float = opt(0.5, "mtad: acceptance threshold on P/Q, > 0")
    beam_weights: str = opt("joint", "mtad: beam weights w = s / sum(s), proportional to the joint draft probability "
                                     "(the paper), or the released code's log_softmax of s (near uniform)",
                            BEAM_WEIGHTS)

    def check(self) -> None:
        super().check()
        _positive("gamma (draft length)", self.gamma)
        _positive("beam width", self.beam_width)
        if not self.tau > 0:
            raise CllmError(f"tau must be > 0, got {self.tau}")
        if self.temperature <= 0:
            raise CllmError("mtad samples from the joint distribution: give a temperature > 0 (e.g. --temperature 1)")
        if self.beam_weights not in BEAM_WEIGHTS:
            raise CllmError(f"beam_weights must be one of {BEAM_WEIGHTS}, got {self.beam_weights!r}")


@dataclass
class PromptLookupOptions:
    prefix: ClassVar[str] = ""
    lookup_tokens: int = opt(10, "hf_prompt_lookup, gated: candidate tokens copied from the prompt per forward")

    def check(self) -> None:
        _positive("--lookup-tokens", self.lookup_tokens)


@dataclass
class AssistedOptions(SamplingOptions):
    gamma: int = opt(4, "sps/mtad/hf_assisted: draft tokens per iteration")

    def check(self) -> None:
        super().check()
        _positive("gamma (draft length)", self.gamma)


@dataclass
class GatedOptions(SamplingOptions):
    """Greedy by default; temperature > 0 samples, verified by the speculative rule (`cllm.decoding.gated`)."""

    prefix: ClassVar[str] = ""
    block_size: int = opt(16, "Jacobi block size n (gated: the guess and the draft copy hold n - 1 tokens each)")
    draft_input: str | None = opt(None, "gated: what the draft copy reads, the guess or mask tokens (default: what "
                                        "the adapter was trained on)", DRAFT_INPUTS)
    pool_candidates: int = opt(2, "gated: pooled n-grams (prompt and committed text) verified per forward")
    pool_ngram: int = opt(4, "gated: n-gram size of the pool")
    lookup_tokens: int = opt(10, "hf_prompt_lookup, gated: candidate tokens copied from the prompt per forward "
                                 "(gated: 0 = off)")
    datastore: str | None = opt(None, "gated: a `cllm datastore` file of the base's own responses; the continuations "
                                      "of the committed text's longest suffix found there are verified as branches "
                                      "(REST, He et al. 2024)")
    datastore_tokens: int = opt(10, "gated with a datastore: tokens per retrieved branch")
    datastore_candidates: int = opt(1, "gated with a datastore: retrieved branches per forward, most frequent first")
    datastore_share: float | None = opt(None, "gated with a datastore: follow the tree of continuations token by "
                                              "token and cut a branch where fewer than this share of the suffix's "
                                              "occurrences still agree (None: whole most frequent continuations)")
    draft_topk: int = opt(1, "gated: verify the draft's k most likely tokens at the guess's first position, each "
                             "as a branch continuing with the rest of the guess (1 = the guess only)")
    topk_tokens: int = opt(0, "gated, draft_topk > 1: tokens per runner-up branch (1 = the runner-up alone; 0 = as "
                              "many as the guess: the runner-up, then the rest of the guess, or with a sampler head "
                              "the head's tokens after the runner-up)")
    sampler_tokens: int = opt(-1, "gated, an adapter with a sampler head: how many of the next guess's tokens the head "
                                  "redrafts, each given the token before it (-1 = all, 0 = off: the draft's own)")
    sampler_candidates: int = opt(64, "gated, sampler head: score only the draft row's K most likely tokens (0 = "
                                      "the whole vocabulary: each redrafted token then costs an LM-head product)")
    share_below: bool = opt(False, "gated, guess-reading draft, batch 1: the layers below the adapter's lowest "
                                  "(--lora-layers top:K) run once for the guess and its draft copy")
    mask_token_id: int = opt(0, "the token the draft copy reads with draft_input=mask (from the adapter)", flag=False)

    def check(self) -> None:
        super().check()
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise CllmError(f"gated decoding needs a block size >= 2, got {self.block_size!r}")
        if self.draft_input is not None and self.draft_input not in DRAFT_INPUTS:
            raise CllmError(f"draft input must be one of {', '.join(DRAFT_INPUTS)}, got {self.draft_input!r}")
        if not isinstance(self.draft_topk, int) or self.draft_topk < 1:
            raise CllmError(f"gated draft_topk must be an integer >= 1, got {self.draft_topk!r}")
        if not isinstance(self.topk_tokens, int) or self.topk_tokens < 0:
            raise CllmError(f"gated topk_tokens must be an integer >= 0, got {self.topk_tokens!r}")
        if not isinstance(self.sampler_tokens, int) or self.sampler_tokens < -1:
            raise CllmError(f"gated sampler_tokens must be -1 (all), 0 (off) or a count, got {self.sampler_tokens!r}")
        if not isinstance(self.sampler_candidates, int) or self.sampler_candidates < 0:
            raise CllmError(f"gated sampler_candidates must be >= 0, got {self.sampler_candidates!r}")
        if not isinstance(self.datastore_tokens, int) or self.datastore_tokens < 1:
            raise CllmError(f"gated datastore_tokens must be an integer >= 1, got {self.datastore_tokens!r}")
        if not isinstance(self.datastore_candidates, int) or self.datastore_candidates < 1:
            raise CllmError(f"gated datastore_candidates must be an integer >= 1, got {self.datastore_candidates!r}")
        if self.datastore_share is not None and not (isinstance(self.datastore_share, (int, float))
                                                     and 0 <= self.datastore_share <= 1):
            raise CllmError(f"gated datastore_share must be a fraction in [0, 1], got {self.datastore_share!r}")
        if self.datastore is not None:
            from pathlib import Path

            if not Path(self.datastore).is_file():
                raise CllmError(f"datastore file not found: {self.datastore} (write one with `cllm datastore`)")
        if self.pool_candidates < 0 or self.pool_ngram < 2 or self.lookup_tokens < 0:
            raise CllmError(f"pool: candidates >= 0 and n-gram size >= 2, got {self.pool_candidates}, "
                            f"{self.pool_ngram}; lookup tokens >= 0, got {self.lookup_tokens}")
