"""Trajectory records as training reads them: from `cllm gen` folders or JSONL files, checked against the model and
block size, looping responses left out, the first n prompts taken. Every objective reads its data through here."""

from __future__ import annotations

from pathlib import Path

from cllm.data.datasets import read_jsonl
from cllm.data.trajectories import data_id_order, first_ids, load_trajectories
from cllm.errors import CllmError

REQUIRED_KEYS = ("data_id", "block_index", "prompt_ids", "prompt_len", "states", "fixed_point")


def read_records(source: str | Path | list) -> list[dict]:
    """Records from a `cllm gen` folder (all committed shards), or from JSONL files / folders of part files."""
    sources = source if isinstance(source, (list, tuple)) else [source]
    records: list[dict] = []
    for s in sources:
        p = Path(s)
        if p.is_dir() and (p / "manifest.json").is_file():
            records.extend(load_trajectories(p))
        elif p.is_file():
            records.extend(read_jsonl(p, "trajectory file"))
        else:
            raise CllmError(f"trajectory data not found: {s} (a `cllm gen` output folder or .jsonl files)")
    if not records:
        raise CllmError(f"no trajectory records in {source}")
    return records


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
        raise CllmError(f"{where}: blocks have {max(lengths)} tokens but block_size is {block_size}")
