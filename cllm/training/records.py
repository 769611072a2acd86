"""Trajectory records as training reads them: from `cllm gen` folders or JSONL files, checked against the model and
block size, looping responses left out, the first n prompts taken. Every objective reads its data through here."""

from __future__ import annotations

from pathlib import Path

from cllm.data.datasets import read_jsonl
from cllm.data.trajectories import data_id_order, first_ids, load_trajectories
from cllm.errors import CllmError

REQUIRED_KEYS = ("data_id", "block_index", "prompt_ids", "prompt_len", "states", "fixed_point")


def read_records(source: str | Path | list) -> list[dict]:
    """Records from a `cllm gen` folder (all committed shards), or from JSONL files / folders of part files.

    Two collections number their prompts alike (each from 0: CoSQA and the stdlib prompts): a source whose data_ids
    an earlier source already used gets them qualified with its folder or file name ("c00000/12"), since every
    objective groups a response's blocks by data_id and would otherwise mix two prompts' blocks."""
    sources = source if isinstance(source, (list, tuple)) else [source]
    records: list[dict] = []
    seen: set = set()
    for s in sources:
        part = _read_source(Path(s))
        ids = {r.get("data_id") for r in part} - {None}  # a record without one: check_records names it
        if ids & seen:
            part = [{**r, "data_id": f"{Path(s).name}/{r['data_id']}"} if "data_id" in r else r for r in part]
            ids = {r.get("data_id") for r in part} - {None}
            if ids & seen:
                raise CllmError(f"trajectory data {s}: its prompts' data_ids are already used by another source, "
                                "also under its folder name: give the sources distinct names")
        seen |= ids
        records.extend(part)
    if not records:
        raise CllmError(f"no trajectory records in {source}")
    return records


def _read_source(p: Path) -> list[dict]:
    if p.is_dir() and (p / "manifest.json").is_file():
        return load_trajectories(p)
    if p.is_file():
        return read_jsonl(p, "trajectory file")
    raise CllmError(f"trajectory data not found: {p} (a `cllm gen` output folder or .jsonl files)")


def drop_looping(records: list[dict]) -> tuple[list[dict], list]:
    """(the records of the responses that do not loop, the data_ids left out). A response is a data_id's blocks; it
    loops when its answer (the last block's context after the prompt, then its fixed point) has a repeating span
    (`is_degenerate`, the eval's repeat-rate rule). The collection's own filter (`repeat_threshold`, the released
    CLLM cleaning) drops only blocks with one token repeated, so period-2..20 loops stay in the data."""
    from cllm.data.trajectories import is_degenerate

    last: dict = {}
    for r in records:
        if r["data_id"] not in last or r["block_index"] > last[r["data_id"]]["block_index"]:
            last[r["data_id"]] = r
    looping = {d for d, r in last.items() if is_degenerate(r["prompt_ids"][r["prompt_len"]:] + r["fixed_point"])}
    return [r for r in records if r["data_id"] not in looping], sorted(looping, key=data_id_order)


def first_prompts(records: list[dict], n: int) -> list[dict]:
    """The records of the n first prompts by data_id."""
    keep = first_ids((r["data_id"] for r in records), n)
    return [r for r in records if r["data_id"] in keep]


def split_blocks(records: list[dict], m: int, where: str = "data") -> list[dict]:
    """The records cut into blocks of m >= 1 tokens (the data's block size must be a multiple of m).

    Jacobi iteration is causal, so the first m positions of an n-token trajectory are the m-token trajectory itself.
    Piece s > 0 keeps only the states whose pieces before it already equal the fixed point: from there on its
    positions iterate on committed text, so each kept state is a state of an m-token trajectory (the first one its
    initial guess). States equal to the piece's fixed point are left out (noise 0: the objectives add the fixed
    point themselves); a piece with none left keeps its fixed point as its one state, so records stay well formed."""
    n = max(len(r["fixed_point"]) for r in records)
    if n % m:
        raise CllmError(f"{where}: blocks of {n} tokens cannot be cut into blocks of {m} (not a multiple)")
    out, k = [], n // m
    for r in records:
        fp = r["fixed_point"]
        for s in range(-(-len(fp) // m)):
            lo, piece = s * m, fp[s * m:(s + 1) * m]
            states = [st[lo:lo + m] for st in r["states"] if st[:lo] == fp[:lo]]
            states = [st for i, st in enumerate(states) if st != piece and (i == 0 or st != states[i - 1])]
            out.append({**r, "block_index": r["block_index"] * k + s, "prompt_ids": [*r["prompt_ids"], *fp[:lo]],
                        "states": states or [list(piece)], "fixed_point": piece})
    return out


def check_records(records: list[dict], block_size: int, vocab_size: int, where: str = "data") -> None:
    """Refuse data of the wrong format, another vocabulary or another block size, naming the first bad record."""
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise CllmError(f"{where}: record {i} is not a trajectory record (missing {', '.join(missing)})")
        fp = r["fixed_point"]
        if len(fp) > block_size or (len(fp) < block_size and not r["states"]) or not fp:
            raise CllmError(f"{where}: record {i} has a {len(fp)}-token fixed point but block_size is {block_size}")
        if any(len(s) != len(fp) for s in r["states"]):
            raise CllmError(f"{where}: record {i} has states of another length than its fixed point")
        ids = [*r["prompt_ids"], *fp, *(t for s in r["states"] for t in s), *r.get("label_ids", [])]
        if ids and (max(ids) >= vocab_size or min(ids) < 0):
            raise CllmError(f"{where}: record {i} has token id {max(ids)} outside the model's vocabulary of "
                            f"{vocab_size} (trajectories of another model?)")
    lengths = {len(r["fixed_point"]) for r in records}
    if max(lengths) != block_size:
        hint = " (--split-blocks cuts them)" if max(lengths) > block_size and not max(lengths) % block_size else ""
        raise CllmError(f"{where}: blocks have {max(lengths)} tokens but block_size is {block_size}{hint}")
