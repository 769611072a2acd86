"""A datastore of the base model's own responses, read as verify candidates (REST: retrieval-based speculative
decoding, He et al. 2024).

The file holds token sequences (the base's greedy responses to training prompts: the fixed points `cllm gen`
collected, `cllm datastore` writes it). Given the committed text, the store finds the longest suffix of it, at most
`max_ngram` tokens, that occurs in the responses and proposes the most frequent continuations after it. The
decoder verifies them with the base like any other branch, so they change how many tokens a forward commits,
never which: a wrong proposal costs its rows and nothing else.

Lookup: one dict per suffix length k from the k tokens before each position to the positions that follow them
(never across two responses); a key's top continuations are counted the first time it is asked and kept. Two
rules pick them: the most frequent whole continuations (`min_share` None), or paths down the tree of continuations
(`min_share` a fraction): branch i starts with the i-th most frequent next token and then takes the most frequent
next token among the occurrences that still agree, while at least `min_share` of the suffix's occurrences do. The
tree rule cuts a branch where the responses stop agreeing, so it spends rows only where tokens are likely to be
accepted (a branch the share rules out at its first token is left out).
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from cllm.errors import CllmError

SEPARATOR = -1  # between two responses in the stored token array


class Datastore:
    """Responses (lists of token ids) indexed by the suffixes of length 1..max_ngram before each position."""

    def __init__(self, responses: list[list[int]], max_ngram: int = 8, meta: dict | None = None):
        self.meta = dict(meta or {})
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        for r in responses:
            self.tokens += [*r, SEPARATOR]
        self.index: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(max_ngram + 1)]  # [k][key]: positions
        toks = self.tokens
        for i in range(1, len(toks)):
            if toks[i] == SEPARATOR:
                continue
            for k in range(1, max_ngram + 1):
                if i - k < 0 or toks[i - k] == SEPARATOR:
                    break
                self.index[k].setdefault(tuple(toks[i - k : i]), []).append(i)
        # (k, key, length) -> ranked whole continuations; (k, key, length, min_share) -> the tree rule's paths
        self._top: dict[tuple, list[tuple[int, ...]]] = {}

    def continuations(self, text: list[int], count: int, length: int, max_ngram: int | None = None,
                      min_share: float | None = None) -> list[list[int]]:
        """Up to `count` distinct continuations of up to `length` tokens after the longest suffix of `text` (at most
        `max_ngram` tokens) that the responses hold, most frequent first (ties: first seen); [] when none matches.
        With `min_share`, paths down the tree of continuations instead (the module's doc)."""
        top = min(max_ngram or self.max_ngram, self.max_ngram, len(text))
        for k in range(top, 0, -1):
            key = tuple(text[-k:])
            positions = self.index[k].get(key)
            if positions:
                if min_share is None:
                    return [list(c) for c in self._ranked(k, key, positions, length)[:count]]
                return [list(c) for c in self._paths(k, key, positions, length, min_share)[:count]]
        return []

    def _paths(self, k: int, key: tuple[int, ...], positions: list[int], length: int,
               min_share: float) -> list[tuple[int, ...]]:
        cached = self._top.get((k, key, length, min_share))
        if cached is None:
            need = max(1, math.ceil(min_share * len(positions) - 1e-9))  # occurrences that must still agree
            firsts = Counter(self.tokens[p] for p in positions if self.tokens[p] != SEPARATOR)
            cached = []
            for first, n in firsts.most_common():
                if n < need:
                    break
                alive = [p + 1 for p in positions if self.tokens[p] == first]
                cached.append((first, *self._follow(alive, length - 1, need)))
            self._top[(k, key, length, min_share)] = cached
        return cached

    def _follow(self, alive: list[int], length: int, need: int) -> list[int]:
        """The most frequent next token of the occurrences `alive` (positions of their next token), step by step,
        while at least `need` of them agree."""
        out = []
        for _ in range(length):
            nxt = Counter(self.tokens[p] for p in alive if self.tokens[p] != SEPARATOR)
            if not nxt:
                break
            t, n = nxt.most_common(1)[0]
            if n < need:
                break
            out.append(t)
            alive = [p + 1 for p in alive if self.tokens[p] == t]
        return out

    def _ranked(self, k: int, key: tuple[int, ...], positions: list[int], length: int) -> list[tuple[int, ...]]:
        ranked = self._top.get((k, key, length))
        if ranked is None:
            counts = Counter(tuple(self._after(p, length)) for p in positions)
            ranked = self._top[(k, key, length)] = [c for c, _ in counts.most_common() if c]
        return ranked

    def _after(self, pos: int, length: int) -> list[int]:
        out = []
        for t in self.tokens[pos : pos + length]:
            if t == SEPARATOR:
                break
            out.append(t)
        return out

    def save(self, path: str | Path) -> None:
        arr = np.asarray(self.tokens, dtype=np.int32)  # (N,) responses joined by SEPARATOR
        meta = {**self.meta, "max_ngram": self.max_ngram}
        with open(path, "wb") as f:
            np.savez_compressed(f, tokens=arr, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def split_responses(tokens: np.ndarray) -> list[list[int]]:
    """The responses of a stored token array (SEPARATOR after each)."""
    out, cur = [], []
    for t in tokens.tolist():
        if t == SEPARATOR:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + ([cur] if cur else [])


@functools.lru_cache(maxsize=4)
def load_datastore(path: str) -> Datastore:
    """The datastore in `path` (a `cllm datastore` file), indexed once per process."""
    p = Path(path)
    if not p.is_file():
        raise CllmError(f"datastore file not found: {path} (write one with `cllm datastore`)")
    try:
        with np.load(p) as z:
            tokens, meta = z["tokens"], json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError) as e:
        raise CllmError(f"{path}: not a cllm datastore file ({e})") from e
    return Datastore(split_responses(tokens), int(meta.get("max_ngram", 8)), meta)
